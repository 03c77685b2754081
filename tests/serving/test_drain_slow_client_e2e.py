"""A node that stops (SIGTERM) lets a slow client read the rest of its answer.

An answer that is not streamed (up to 4 MiB) is held whole and written at once
when its upstream is done; a client slower than that write leaves the part its
socket could not take in meshd's transport. The drain used to end when the last
request's upstream was done, and that part went with the process: the client got
an answer cut short. Now the drain also waits (within ``[api] drain_s``) until the
clients' sockets took it all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir

pytestmark = pytest.mark.e2e

TOKENS = 450_000  # a non-streamed answer of about 3.5 MB: more than the socket buffers hold
WAITING = "waiting for clients to read the last"


def test_sigterm_lets_a_slow_client_read_the_whole_answer(tmp_path, gemma_model_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gemma_model_path, models / "m.gguf")
    node = Meshd(tmp_path / "n", {
        "node": {"models_dir": str(models)},
        "models": {"serve": ["m"], "min_free_gb": 0.0},
        "llama": {"bin_dir": fake_llama_bin_dir(tmp_path / "n")},
        "api": {"drain_s": 60.0, "client_stall_timeout_s": 60.0},
    }, name="n")
    node.start()
    try:
        node.wait_model_warm("m")
        body = json.dumps({"model": "m", "max_tokens": TOKENS,
                           "messages": [{"role": "user", "content": "go"}]}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", node.api_port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        data = s.recv(4096)  # the head: the answer is complete on meshd's side
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]
        node.signal(signal.SIGTERM)
        # the client reads nothing until meshd either says it waits for it or has exited
        # (before the fix it exited, and what its socket had not taken was gone)
        end = time.monotonic() + 30
        while time.monotonic() < end and WAITING not in node.log() and node.proc.poll() is None:
            time.sleep(0.05)
        end = time.monotonic() + 60  # bounded: read it all, 8 KB every 2 ms
        while time.monotonic() < end:
            chunk = s.recv(8192)
            if not chunk:
                break
            data += chunk
            time.sleep(0.002)
        s.close()
        head, _, raw = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        assert len(raw) == length, f"the answer was cut short: {len(raw)} of {length} bytes"
        answer = json.loads(raw)
        assert answer["usage"]["completion_tokens"] == TOKENS
        assert node.proc.wait(timeout=60) == 0
        assert WAITING in node.log()
    finally:
        node.stop()
