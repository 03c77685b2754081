"""A host that stops (SIGTERM) finishes the streams peers sent it through tunnels.

Two real meshd daemons with the fake backend: B serves ``m-slow`` (slow streams),
A serves nothing, so A's requests cross a tunnel to B.  B is stopped while the
streams run: it drains them (``[api] drain_s``), then closes its tunnels.  The
last bytes of a stream that finished within the drain are still on their way
when the tunnels close (in the TLS layer's buffer or the socket's); a close
that aborts drops them, and the client gets an SSE ``error`` event instead of
the end of a complete answer.  Each client here must get every chunk and the
stream's end.
"""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir

pytestmark = pytest.mark.e2e

CHUNKS = 40
STREAMS = 4


def test_sigterm_on_the_host_finishes_the_tunnelled_streams(tmp_path, gemma_model_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gemma_model_path, models / "m-slow.gguf")
    bin_dir = fake_llama_bin_dir(tmp_path / "b", "--chunks", str(CHUNKS), "--chunk-delay-ms", "25")
    b = Meshd(tmp_path / "b", {
        "node": {"models_dir": str(models)},
        "models": {"serve": ["m-slow"], "min_free_gb": 0.0},
        "llama": {"bin_dir": bin_dir},
        "api": {"drain_s": 30.0},
    }, name="b")
    a = None
    b.start()
    try:
        b.wait_model_warm("m-slow")
        token = b.ctl("token").stdout.strip().splitlines()[-1]
        a = Meshd(tmp_path / "a", {"mesh": {"join": [token]}, "llama": {"bin_dir": bin_dir}},
                  name="a")
        a.start()
        a.wait_for(lambda n: any(m["name"] == "m-slow" and m["state"] == "warm"
                                 for m in n.status()["models"]), "m-slow seen from a", 60)
        api = openai.OpenAI(base_url=f"{a.api}/v1", api_key="x", max_retries=0, timeout=60)
        got: list[list[str]] = [[] for _ in range(STREAMS)]
        errors: list[BaseException] = []
        started = threading.Barrier(STREAMS + 1)

        def read(i: int) -> None:
            try:
                stream = api.chat.completions.create(
                    model="m-slow", stream=True,
                    messages=[{"role": "user", "content": "Count."}])
                first = True
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got[i].append(chunk.choices[0].delta.content)
                        if first:
                            first = False
                            started.wait(30)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                started.abort()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(STREAMS)]
        for t in readers:
            t.start()
        started.wait(30)  # every stream has its first chunk: all are in flight on b
        b.signal(signal.SIGTERM)
        for t in readers:
            t.join(60)
        assert not any(t.is_alive() for t in readers)
        assert not errors, errors
        assert [len(g) for g in got] == [CHUNKS] * STREAMS
        assert b.wait_exit(60) == 0
        assert "waiting up to" in b.log()  # the streams were in flight when b stopped
    finally:
        if a is not None:
            a.stop()
        b.stop()
