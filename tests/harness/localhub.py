"""A Hugging Face hub stand-in for tests, and tiny GGUF files to serve from it.

``LocalHub`` answers what ``huggingface_hub`` (2.x, read from its
``file_download.py``) asks when it fetches one repo file:

- ``HEAD /{owner}/{repo}/resolve/{revision}/{file}`` with
  ``Accept-Encoding: identity``: 200 with ``X-Repo-Commit``, ``ETag`` and
  ``X-Linked-Etag`` (the sha256, as the hub gives for LFS files),
  ``X-Linked-Size`` and ``Content-Length``; or, with ``cdn_redirect=True``, a
  302 to another host name (``localhost`` instead of ``127.0.0.1``) carrying
  those headers, as the real hub redirects LFS files to its CDN;
- ``GET`` of the same URL (or the CDN URL), honouring ``Range: bytes=N-``
  with a 206 and ``Content-Range``;
- 404 with ``X-Error-Code: RepoNotFound`` / ``EntryNotFound`` (what
  ``hf_raise_for_status`` turns into its typed errors).

Every request is logged (method, path, file, Range, Authorization) so a test
can assert what was, and was not, asked for.  A test can make the next GET of
a file stop after N bytes and drop the connection (``cut_next_get``), stop and
wait until released (``hold_next_get``, for killing a client mid-transfer), or
answer with an error status (``fail_next_gets``).
"""

from __future__ import annotations

import hashlib
import re
import socket
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
CDN_RE = re.compile(r"^/_cdn/(?P<sha>[0-9a-f]{64})$")
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
# bounds so a forgotten release never hangs a test run
HOLD_MAX_S = 60.0


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    repo: str | None
    file: str | None
    range: str | None
    authorization: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    hub: LocalHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, head=True)

    def do_GET(self) -> None:
        self.server.hub._handle(self, head=False)


class LocalHub:
    """A local HTTP server serving repo files from a dict, with a request log and faults."""

    def __init__(self, *, cdn_redirect: bool = False):
        self.files: dict[tuple[str, str], bytes] = {}
        self.log: list[LoggedRequest] = []
        self.cdn_redirect = cdn_redirect
        self._lock = threading.Lock()
        # per file, what the next GETs do, one action each: ("cut", n), ("hold", n, reached,
        # release) or ("status", code)
        self._next: dict[str, list[tuple[Any, ...]]] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="localhub",
                                        daemon=True)

    # -- set-up -----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, file: str, data: bytes) -> str:
        """Serve ``data`` as ``file`` of ``repo``; returns its sha256."""
        self.files[(repo, file)] = data
        return hashlib.sha256(data).hexdigest()

    # Faults queue up per file: each GET of the file takes the next one, then GETs are normal.

    def cut_next_get(self, file: str, after_bytes: int) -> None:
        """A GET of ``file`` sends the body up to byte ``after_bytes``, then drops the connection."""
        self._next.setdefault(file, []).append(("cut", after_bytes))

    def hold_next_get(self, file: str, after_bytes: int) -> tuple[threading.Event, threading.Event]:
        """A GET of ``file`` sends up to byte ``after_bytes``, then waits for ``release`` before
        sending the rest; returns (reached, release)."""
        reached, release = threading.Event(), threading.Event()
        self._next.setdefault(file, []).append(("hold", after_bytes, reached, release))
        return reached, release

    def fail_next_gets(self, file: str, status: int = 503, times: int = 1) -> None:
        """GETs of ``file`` answer ``status`` (``times`` of them)."""
        self._next.setdefault(file, []).extend([("status", status)] * times)

    def requests(self, file: str | None = None, method: str | None = None) -> list[LoggedRequest]:
        """Logged requests for repo files (optionally one file, one method), in order.

        Requests for anything else are left out: huggingface_hub 2.x also asks
        ``/api/agent-harnesses`` (its coding-agent detection) on its own.  ``log``
        has everything.
        """
        with self._lock:
            return [r for r in self.log if r.file is not None
                    and (file is None or r.file == file) and (method is None or r.method == method)]

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        for actions in self._next.values():
            for action in actions:
                if action[0] == "hold":
                    action[3].set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving ------------------------------------------------------------------

    def _lookup(self, path: str) -> tuple[str | None, str | None, bytes | None, str | None]:
        """(repo, file, data, error code) for a request path."""
        m = CDN_RE.match(path)
        if m:
            for (repo, file), data in self.files.items():
                if hashlib.sha256(data).hexdigest() == m["sha"]:
                    return repo, file, data, None
            return None, None, None, "EntryNotFound"
        m = RESOLVE_RE.match(path)
        if not m:
            return None, None, None, "RepoNotFound"
        repo, file = m["repo"], unquote(m["file"])
        if not any(r == repo for r, _ in self.files):
            return repo, file, None, "RepoNotFound"
        data = self.files.get((repo, file))
        return repo, file, data, None if data is not None else "EntryNotFound"

    def _handle(self, h: _Handler, head: bool) -> None:
        path = urlsplit(h.path).path
        repo, file, data, error = self._lookup(path)
        with self._lock:
            self.log.append(LoggedRequest(
                "HEAD" if head else "GET", path, repo, file,
                h.headers.get("Range"), h.headers.get("Authorization"),
            ))
        if error is not None or data is None:
            h.send_response(404)
            h.send_header("X-Error-Code", error or "EntryNotFound")
            h.send_header("X-Error-Message", "Repository not found" if error == "RepoNotFound"
                          else "Entry not found")
            if error == "EntryNotFound":
                h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        assert file is not None
        sha = hashlib.sha256(data).hexdigest()
        action: tuple[Any, ...] = ("normal",)
        if not head and self._next.get(file):
            action = self._next[file].pop(0)
        if action[0] == "status":
            h.send_response(action[1])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.cdn_redirect and not path.startswith("/_cdn/"):
            h.send_response(302)
            h.send_header("Location", f"http://localhost:{self.port}/_cdn/{sha}")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start, end = 0, len(data) - 1
        range_header = h.headers.get("Range")
        status = 200
        if range_header and not head:
            m = RANGE_RE.match(range_header.strip())
            if m is None or int(m[1]) >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start = int(m[1])
            end = min(int(m[2]), end) if m[2] else end
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{sha}"')
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if head:
            return
        body = data[start:end + 1]
        try:
            if action[0] == "cut":
                h.wfile.write(body[: max(action[1] - start, 0)])
                h.wfile.flush()
                self._drop(h)
            elif action[0] == "hold":
                _, after, reached, release = action
                h.wfile.write(body[: max(after - start, 0)])
                h.wfile.flush()
                reached.set()
                if release.wait(HOLD_MAX_S):
                    h.wfile.write(body[max(after - start, 0):])
                else:
                    self._drop(h)
            else:
                h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    @staticmethod
    def _drop(h: _Handler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# -- tiny GGUF files --------------------------------------------------------------


def gguf_bytes(arch: str = "llama", *, name: str = "tiny", context_length: int = 2048,
               file_type: int = 15, tensors: int = 2, padding: bytes = b"",
               extra: dict[str, Any] | None = None) -> bytes:
    """A small valid GGUF (header, a few float32 tensors), plus ``padding`` appended.

    Readers look only at the header, so padding makes a file as big as a test
    needs (a download that spans several of huggingface_hub's 10 MiB chunks)
    without building big tensors.
    """
    import numpy as np
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        w = GGUFWriter(str(path), arch)
        w.add_name(name)
        w.add_context_length(context_length)
        w.add_file_type(file_type)
        w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
        for key, value in (extra or {}).items():
            if isinstance(value, str):
                w.add_string(key, value)
            else:
                w.add_uint32(key, value)
        for i in range(tensors):
            w.add_tensor(f"t{i}", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes() + padding
