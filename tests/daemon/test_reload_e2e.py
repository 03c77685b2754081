"""Reload of a real ``meshd`` process (no systemd): ``meshctl reload`` and SIGHUP while a
stream runs through its API to a slow fake llama-server, the command-line flags still
winning over the file.  The systemd form is ``tests/daemon/test_systemd_reload.py``."""

from __future__ import annotations

import http.client
import json
import signal
import time

import pytest
import toml

from tests.harness.daemon import Meshd, fake_llama_bin_dir
from tests.harness.localhub import gguf_bytes

pytestmark = pytest.mark.timeout(180)

CHUNKS = 200
CHUNK_MS = 50  # 10 s of stream, more than the reloads below take


def _stream(port: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {
        "model": "tiny",
        "stream": True,
        "max_tokens": CHUNKS,
        "messages": [{"role": "user", "content": "hi"}],
    }
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200
    return response


def _chunks(response: http.client.HTTPResponse, count: int | None) -> tuple[int, bool]:
    """Read ``count`` chunks (None: to [DONE]); returns (chunks read, done)."""
    read = 0
    while count is None or read < count:
        line = response.readline()
        assert line, f"the stream ended after {read} more chunks, without [DONE]"
        if line.startswith(b"data: [DONE]"):
            return read, True
        if line.startswith(b"data: {"):
            read += 1
    return read, False


def _wait_log(d: Meshd, text: str, since: int, timeout_s: float = 20) -> str:
    return d.wait_for(
        lambda n: text in n.log()[since:] and n.log()[since:], f"{text!r} in the log", timeout_s
    )


def test_reload_and_sighup_apply_while_a_stream_runs_and_a_broken_file_changes_nothing(tmp_path):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf_bytes(name="tiny"))
    bin_dir = fake_llama_bin_dir(tmp_path, "--chunk-delay-ms", str(CHUNK_MS))
    d = Meshd(
        tmp_path / "node",
        {"llama": {"bin_dir": bin_dir}, "log": {"level": "info"}, "policy": {"plugins_dir": ""}},
    )
    d.start("--model", str(model))
    try:
        d.wait_model_warm("tiny", timeout=60)
        started = time.monotonic()
        response = _stream(d.api_port)
        assert _chunks(response, 3) == (3, False)

        since = len(d.log())
        d.config["log"]["level"] = "debug"
        d.config["mesh"]["heartbeat_s"] = 3.0
        d.config_path.write_text(toml.dumps(d.config))
        out = d.ctl("reload").stdout.splitlines()
        assert "applied: [log] level 'info' -> 'debug'" in out
        assert "needs a restart: [mesh] heartbeat_s 2.0 -> 3.0 (systemctl restart meshd)" in out
        # the file serves nothing, but --model still wins over it: no change there
        assert not any("[models] serve" in line for line in out)
        assert "DEBUG meshd.daemon.reload: reload: logging at debug now" in d.log()[since:]

        d.config_path.write_text("[log]\nlevel = 'loud'\n")
        broken = d.ctl("reload", check=False)
        assert broken.returncode == 3
        assert "[log] level: 'loud' is not one of debug, info, warning, error" in broken.stderr

        d.config_path.write_text(toml.dumps(d.config))
        since = len(d.log())
        d.signal(signal.SIGHUP)
        log = _wait_log(d, "reloaded ", since)
        assert "SIGHUP: reloading" in log
        assert "0 change(s) applied, 1 needing a restart" in log  # the broken file changed nothing

        assert time.monotonic() - started < CHUNKS * CHUNK_MS / 1000, (
            "the reloads took longer than the stream: make it longer"
        )
        rest, done = _chunks(response, None)
        assert done and 3 + rest == CHUNKS
        assert "Traceback" not in d.log()
    finally:
        d.stop()
