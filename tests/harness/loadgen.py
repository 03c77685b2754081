"""Many concurrent HTTP clients in one asyncio loop, for the load tests and benches.

Why its own client and not ``openai``/``urllib`` threads: a thousand concurrent
streams need a thousand sockets, not a thousand threads, and the client must
cost little next to the proxy it measures.  Each :class:`Client` is one request
on its own connection (``Connection: close``); it records the status, when the
first SSE event (or the first body byte of a plain answer) came, when the
connection ended, how many ``data:`` events arrived and whether the answer was
complete (the chunked terminator, or the whole ``Content-Length``).

A client can misbehave on purpose (``behaviour``): "stall" stops reading after
the first event for ``stall_s`` and then closes, "drop" closes right after the
first event.  Only 127.0.0.1 is ever dialled; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise this process's soft descriptor limit to its hard limit (children inherit it):
    a thousand streams need more than the common 1,024.  Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def chat_request(
    model: str,
    *,
    stream: bool,
    max_tokens: int | None = None,
    extra: str = "",
    content: str = "Count from one to ten.",
) -> bytes:
    """One ``/v1/chat/completions`` request with ``Connection: close``."""
    tokens = f', "max_tokens": {max_tokens}' if max_tokens else ""
    body = (
        f'{{"model": "{model}", "stream": {"true" if stream else "false"}{tokens}{extra}, '
        f'"messages": [{{"role": "user", "content": "{content}"}}]}}'
    )
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: load\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


class Dechunk:
    """A chunked-transfer decoder (the client's own, not meshd's)."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = -1  # payload bytes to come in the current chunk; -1: a size line next
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while not self.done:
            if self.left < 0:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    break
                size = int(self.buf[:nl].split(b";", 1)[0] or b"0", 16)
                self.buf = self.buf[nl + 2 :]
                if size == 0:
                    self.done = True
                    break
                self.left = size
            if len(self.buf) < self.left + 2:
                break
            out.append(self.buf[: self.left])
            self.buf = self.buf[self.left + 2 :]
            self.left = -1
        return b"".join(out)


class Client(asyncio.Protocol):
    """One request on its own connection; see the module docstring."""

    def __init__(self, request: bytes, behaviour: str = "read", stall_s: float = 0.0):
        self.request = request
        self.behaviour = behaviour
        self.stall_s = stall_s
        self.finished: asyncio.Future | None = None
        self.t0 = 0.0
        self.t_first = 0.0
        self.t_end = 0.0
        self.status = 0
        self.events = 0
        self.complete = False
        self.error = ""  # why the connection failed or ended, if it did not end cleanly
        self.body = b""  # the de-chunked body's first 64 KiB (error answers, plain answers)
        self.last = b""  # and its last 512 bytes (an SSE error event ends a long stream)
        self._head = b""
        self._in_body = False
        self._length = -1
        self._received = 0
        self._dechunk: Dechunk | None = None
        self._tail = b""
        self._transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._in_body = True
            lines = head.decode("latin-1").split("\r\n")
            try:
                self.status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self.error = f"bad status line {lines[0]!r}"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    self._dechunk = Dechunk()
                elif name == "content-length":
                    self._length = int(value)
        if self._dechunk is not None:
            payload = self._dechunk.feed(data)
            if self._dechunk.done:
                self.complete = True
        else:
            payload = data
            self._received += len(data)
            if self._length >= 0 and self._received >= self._length:
                self.complete = True
        if payload and not self.t_first:
            self.t_first = now
        if len(self.body) < 65536:
            self.body += payload
        if payload:
            self.last = (self.last + payload)[-512:]
        buf = self._tail + payload
        n = buf.count(b"data: ")
        self.events += n
        self._tail = buf[-5:]
        if n and self.behaviour == "drop":
            self._transport.close()
        elif n and self.behaviour == "stall":
            self.behaviour = "stalled"
            self._transport.pause_reading()
            asyncio.get_running_loop().call_later(self.stall_s, self._transport.close)
        if self.complete:
            self._transport.close()

    def connection_lost(self, exc) -> None:
        self.t_end = time.perf_counter()
        if exc is not None and not self.error:
            self.error = f"{type(exc).__name__}: {exc}"
        elif not self.complete and not self.error and self.behaviour == "read":
            self.error = "closed before the answer was complete"
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(self)

    # -- figures ---------------------------------------------------------------------

    @property
    def ttfc(self) -> float:
        """Seconds from the connect call to the first body byte (the first SSE event)."""
        return self.t_first - self.t0 if self.t_first else float("nan")

    def errored(self) -> bool:
        """The request failed, as opposed to a client that misbehaved on purpose."""
        return (
            self.status != 200
            or bool(self.error)
            or (self.behaviour == "read" and not self.complete)
        )


async def run_clients(
    port: int, clients: list[Client], *, ramp_s: float = 0.0, timeout_s: float = 300.0
) -> list[Client]:
    """Start every client (spread evenly over ``ramp_s``) and wait for all to end, at most
    ``timeout_s`` in all; one still open then is closed and counted as an error."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout_s

    async def one(i: int, c: Client) -> None:
        if ramp_s:
            await asyncio.sleep(max(0.0, start + ramp_s * i / len(clients) - loop.time()))
        c.finished = loop.create_future()
        c.t0 = time.perf_counter()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: c, "127.0.0.1", port),
                max(0.1, deadline - loop.time()),
            )
            await asyncio.wait_for(asyncio.shield(c.finished), max(0.1, deadline - loop.time()))
        except (TimeoutError, OSError) as e:
            c.error = c.error or f"{type(e).__name__}: {e}"
            if c._transport is not None:
                c._transport.abort()
            c.t_end = c.t_end or time.perf_counter()

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return clients


def peak_concurrency(clients: list[Client]) -> int:
    """The most clients whose connections were open at the same instant."""
    edges = sorted(
        [(c.t0, 1) for c in clients] + [(c.t_end, -1) for c in clients], key=lambda e: (e[0], e[1])
    )
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when empty."""
    xs = sorted(v for v in values if v == v)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def median(values: list[float]) -> float:
    xs = [v for v in values if v == v]
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Sample:
    rss_kb: int
    fds: int
    cpu_s: float


def sample(pid: int) -> Sample:
    """RSS, open descriptors and CPU seconds (user + system) of ``pid``, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return Sample(rss, fds, (int(fields[11]) + int(fields[12])) / TICKS)


def tcp_counters() -> dict[str, int]:
    """The kernel's ListenOverflows and TCPSynRetrans (this network namespace, every
    process): a listen backlog too short for a burst of connects shows in both, as
    connects retried after a second."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
            return {k: row.get(k, 0) for k in ("ListenOverflows", "TCPSynRetrans")}
    return {"ListenOverflows": 0, "TCPSynRetrans": 0}
