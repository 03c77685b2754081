#!/usr/bin/env python3
"""A fast fake llama-server: OpenAI-shaped answers, SSE streams as fast as it can.

Why asyncio and not Twisted: asyncio's transport sends each ``write`` at once
when its buffer is empty, so every SSE chunk leaves in its own ``send()`` the
way llama-server's tokens do, instead of being coalesced per reactor turn; it
also runs in its own thread next to a test's Twisted reactor without touching
it.

As a program it stands in for llama-server (``[llama] bin_dir``): it accepts
and ignores llama-server's other flags::

    python tests/harness/fakebackend.py --host 127.0.0.1 --port P [--chunks 500] [-m MODEL.gguf] ...

``--close-while PATH`` reads every POST and closes without answering while PATH
exists (a test makes a host fail before any byte, then heal, by touching and
removing a file); ``--chunk-delay-ms`` makes each stream slow (a pause before every chunk, so
requests overlap); ``--request-log FILE`` appends one line per POST, so a test
can count which of several fake backends answered; ``--hold`` reads every
completion request and never answers it, so a test can know for certain that
a request is in flight there (it waits for the request log's line) when it
kills the host.

In a test, :class:`FakeBackend` runs in a thread and can misbehave on purpose:
``mode`` "close" reads the request and closes without answering, "break"
sends ``break_after`` SSE chunks (or part of a JSON body) and closes; ``gate``
(a threading.Event) holds the last chunk back until the test sets it;
``errors`` (path -> status) answers that path with llama-server's error shape.

Besides chat, completions and embeddings it answers every other POST path
llama-server serves to clients (:data:`ECHO_PATHS`) with a JSON echo naming the
path, this backend's model and the request's ``X-Meshd-Model`` header, streamed
as SSE when the body asks ``"stream": true``; ``paths`` and ``headers`` record
what each request carried, so a test can tell which backend got what.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from pathlib import Path

SSE_CHUNK = (
    'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":0,'
    '"model":"%s","choices":[{"index":0,"delta":{"content":"t%d "},"finish_reason":null}]}\n\n'
)


# llama-server's other client POST paths: answered with an echo of what was asked
ECHO_PATHS = frozenset({
    "/v1/responses", "/v1/rerank", "/v1/reranking", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/chat/completions/input_tokens", "/v1/responses/input_tokens", "/v1/audio/transcriptions",
    "/tokenize", "/detokenize", "/apply-template", "/infill", "/v1/systemone", "/completion",
    "/completions", "/chat/completions", "/embedding", "/embeddings", "/responses", "/rerank",
    "/reranking", "/chat/completions/input_tokens", "/responses/input_tokens",
    "/audio/transcriptions",
})


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class FakeBackend:
    """One fake server; counters are read by tests (``requests``, ``peer_closed``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, chunks: int = 500,
                 model: str = "fake-model", yield_every: int = 1, chunk_delay_s: float = 0.0,
                 request_log: str | None = None, first_delay_s: float | None = None):
        self.host = host
        self.chunk_delay_s = chunk_delay_s
        # the pause before the first chunk (default: chunk_delay_s, like every other)
        self.first_delay_s = chunk_delay_s if first_delay_s is None else first_delay_s
        self.request_log = request_log
        self.port = port
        self.chunks = chunks
        self.model = model
        self.yield_every = max(1, yield_every)
        self.mode = "ok"
        self.break_after = 2
        self.gate: threading.Event | None = None
        self.hold = False  # completion requests are read and never answered
        self.close_while: str | None = None  # POSTs closed unanswered while this file exists
        self.requests = 0  # requests read completely
        self.streams_done = 0  # streams sent to the end
        self.peer_closed = 0  # streams the peer closed before their end
        self.bodies: list[bytes] = []
        self.paths: list[str] = []  # the path of each request read
        self.headers: list[dict[str, str]] = []  # its headers, names lower-cased
        self.errors: dict[str, int] = {}  # path -> status of an error answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._cache: dict[int, list[bytes]] = {}

    # -- running -------------------------------------------------------------------

    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> int:
        """Serve in a background thread; returns the port."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fakebackend", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake backend did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    # -- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                self.requests += 1
                self.bodies.append(body)
                self.paths.append(path)
                self.headers.append(headers)
                if self.request_log and method == "POST":
                    with open(self.request_log, "a") as f:
                        f.write(f"{method} {path}\n")
                keep = await self._respond(method, path.split("?")[0], body, reader, writer,
                                           headers)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: bytes, reader, writer,
                       headers: dict[str, str]) -> bool:
        if self.mode == "close" and method == "POST":
            return False
        if method == "POST" and self.close_while and os.path.exists(self.close_while):
            return False
        if method == "POST" and path in self.errors:
            return self._json(writer, self.errors[path], {"error": {
                "code": self.errors[path], "message": f"fake error on {path}",
                "type": "invalid_request_error"}})
        if method == "GET" and path == "/health":
            return self._json(writer, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            return self._json(writer, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "fake"}]})
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions",
                                         "/v1/embeddings"):
            try:
                doc = json.loads(body)
            except ValueError:
                return self._json(writer, 400, {"error": {"message": "bad json", "type": "x",
                                                          "code": 400}})
            n = doc.get("max_tokens") or self.chunks
            if self.hold:
                await asyncio.Event().wait()  # until the process is killed or stop()
            if path == "/v1/embeddings":
                return self._json(writer, 200, {"object": "list", "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}]})
            if doc.get("stream"):
                return await self._stream(n, reader, writer)
            return self._completion(writer, n)
        if method == "POST" and path in ECHO_PATHS:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = {}  # a multipart form
            if isinstance(doc, dict) and doc.get("stream"):
                return await self._stream(doc.get("max_tokens") or self.chunks, reader, writer)
            return self._json(writer, 200, {"object": "fake.echo", "path": path,
                                            "model": self.model,
                                            "x_meshd_model": headers.get("x-meshd-model")})
        return self._json(writer, 404, {"error": {"message": "not found", "type": "x", "code": 404}})

    def _json(self, writer, status: int, doc) -> bool:
        body = json.dumps(doc).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
        return True

    def _completion(self, writer, n: int) -> bool:
        text = "".join(f"t{i} " for i in range(n))
        body = json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
        }).encode()
        if self.mode == "break":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body[: len(body) // 2]))
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    def _chunks(self, n: int) -> list[bytes]:
        chunks = self._cache.get(n)
        if chunks is None:
            chunks = [_chunked((SSE_CHUNK % (self.model, i)).encode()) for i in range(n)]
            self._cache[n] = chunks
        return chunks

    async def _stream(self, n: int, reader, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunks = self._chunks(n)
        every = self.yield_every
        transport = writer.transport
        try:
            for i, chunk in enumerate(chunks):
                if self.mode == "break" and i == self.break_after:
                    return False
                if i == n - 1 and self.gate is not None:
                    while not self.gate.is_set():
                        if transport.is_closing() or reader.at_eof():
                            self.peer_closed += 1
                            return False
                        await asyncio.sleep(0.002)
                if transport.is_closing():
                    self.peer_closed += 1
                    return False
                delay = self.chunk_delay_s if i else self.first_delay_s
                if delay:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                if i % every == 0:
                    await writer.drain()
                    await asyncio.sleep(0)
            writer.write(_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self.peer_closed += 1
            return False
        self.streams_done += 1
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--chunks", type=int, default=500, help="SSE chunks per stream")
    parser.add_argument("--yield-every", type=int, default=1,
                        help="yield to other streams after this many chunks")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause this long before each SSE chunk")
    parser.add_argument("--first-delay-ms", type=float, default=None,
                        help="pause this long before the first chunk (default: --chunk-delay-ms)")
    parser.add_argument("--request-log", default=None, help="append one line per POST here")
    parser.add_argument("--hold", action="store_true",
                        help="never answer a completion request (it stays in flight)")
    parser.add_argument("--close-while", default=None,
                        help="close POSTs unanswered while this file exists")
    parser.add_argument("-m", "--model", default="", help="a GGUF path: its stem is the model id")
    parser.add_argument("-a", "--alias", default="")
    args, _ignored = parser.parse_known_args(argv)
    model = args.alias or (Path(args.model).stem if args.model else "fake-model")
    fake = FakeBackend(args.host, args.port, chunks=args.chunks, model=model,
                       yield_every=args.yield_every, chunk_delay_s=args.chunk_delay_ms / 1000,
                       request_log=args.request_log,
                       first_delay_s=None if args.first_delay_ms is None
                       else args.first_delay_ms / 1000)
    fake.hold = args.hold
    fake.close_while = args.close_while

    async def run() -> None:
        await fake.serve()
        print(f"fake backend on {args.host}:{fake.port} serving {model}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
