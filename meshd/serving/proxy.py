"""The upstream half of the data path: a small HTTP/1.1 client and its connection pool.

Why not ``twisted.web.client.Agent``: the proxy must pass an SSE stream
through byte for byte with the least work per chunk, pause the upstream socket
when our client stops reading, and know exactly whether the upstream had sent
*any* response byte when it failed (the failover rule: retry only before the
first byte).  A raw :class:`~twisted.internet.protocol.Protocol` does all three
in a few lines; each upstream read costs one framing step and one call into the
sink.

One :class:`UpstreamConnection` carries one exchange at a time.  The caller
gives it the request bytes and a :class:`ResponseSink`; the connection calls
the sink with the response head, each piece of body as it arrives (never
buffered, never re-split), and the end or the failure.  A chunked body is
decoded for the sink, or, once the sink asks (``pass_framing``: its own client
reads chunked framing too), handed on in the upstream's own chunk framing with
only the size lines parsed (``ChunkedDecoder.frame``).  Clean keep-alive
connections go back to the :class:`ConnectionPool` under the upstream's
``pool_key``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from meshd import sendnow
from meshd.serving.routing import Upstream

log = logging.getLogger("meshd.serving.api")

# a response head larger than this is not an llama-server talking
MAX_HEAD_BYTES = 64 * 1024
# idle keep-alive connections kept per pool key; llama-server closes idle
# connections after 5 s, so ours are dropped a little before that
MAX_IDLE_PER_KEY = 16
IDLE_TIMEOUT_S = 4.0


class ResponseSink(TypingProtocol):
    """Where an upstream response goes (the API's per-request forwarder)."""

    def response_head(self, status: int, headers: dict[bytes, bytes], length: int | None) -> None:
        """Status line and headers arrived; ``length`` is the Content-Length, if any."""

    def response_data(self, data: bytes) -> None:
        """A piece of the (de-chunked) body, exactly as it arrived."""

    def response_framed(self, pieces: list[bytes], payload: int) -> None:
        """Pieces of a chunked body still in its chunked framing, once the sink asked
        for them (:meth:`UpstreamConnection.pass_framing`); ``payload``: the body
        bytes they carry.  Every call ends on a chunk boundary."""

    def response_end(self) -> None:
        """The body ended cleanly."""

    def read_begins(self) -> None:
        """The upstream read that holds the response head is being handled: what the
        sink writes for it (the head, the first chunks, maybe the end) may wait for
        :meth:`read_ends` and leave in one send."""

    def read_ends(self) -> None:
        """That read is handled (the exchange may have ended or failed meanwhile)."""

    def response_failed(self, reason: str, started: bool) -> None:
        """The exchange failed; ``started``: the upstream had sent at least one response byte."""


class UpstreamError(Exception):
    """The upstream broke the HTTP protocol (bad head, bad chunk framing)."""


class ChunkedDecoder:
    """``Transfer-Encoding: chunked``, read incrementally: decoded (:meth:`feed`) or
    passed on in its own framing (:meth:`frame`), with no copy of whole chunks.

    ``feed`` returns the payload bytes contained in ``data`` (joined, possibly
    empty); a partial chunk's payload is returned at once, not held back.
    ``frame`` returns the same body still chunked, for a writer whose client
    reads chunked framing too.  One body may switch from ``feed`` to ``frame``
    part-way (a held answer that turned out long).  ``done``: the terminating
    chunk and trailers were seen.
    """

    __slots__ = ("_left", "_crlf", "_line", "_trailers", "_own", "done")

    def __init__(self) -> None:
        self._left = 0  # payload bytes still to come in the current chunk
        self._crlf = 0  # bytes of the CRLF after a chunk's payload still to skip
        self._line = b""  # a partial size or trailer line
        self._trailers = False
        # the current chunk's size line was not passed on (frame: its payload
        # goes out in chunks framed here)
        self._own = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._own = True  # nothing fed is passed on in its framing
        out = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out.append(data if take == end else data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._crlf = 2
                continue
            if self._crlf:
                take = min(self._crlf, end - pos)
                pos += take
                self._crlf -= take
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise UpstreamError("chunk size line too long")
                break
            line = (self._line + data[pos:nl]).rstrip(b"\r")
            self._line = b""
            pos = nl + 1
            if self._trailers:
                if not line:
                    self.done = True
                    if pos < end:
                        raise UpstreamError("data after the end of a chunked body")
                    break
                continue
            size = _chunk_size(line)
            if size == 0:
                self._trailers = True
            else:
                self._left = size
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def frame(self, data: bytes) -> tuple[list[bytes], int]:
        """The chunked body in ``data`` as pieces to write on, and the payload bytes they carry.

        Why: a proxy whose client reads chunked framing need not decode a
        chunk and frame it again; it only has to know where chunks end (to
        find the end of the body, count its bytes, and end it with a chunk of
        its own).  Chunks wholly inside ``data`` are passed as they came, size
        lines included: consecutive ones as one slice of ``data`` (most often
        ``data`` itself), only their size lines parsed.

        Whatever comes back ends on a chunk boundary, so the writer can always
        follow it with a chunk of its own (an error event) or the last chunk:
        when a read ends inside a chunk, the part that came goes out as a
        chunk framed here, and so does each later part of it; a CRLF still to
        come is written ahead and skipped when it arrives.  The terminating
        chunk and trailers are not passed on: the writer ends its own body.
        """
        out: list[bytes] = []
        pos = 0
        end = len(data)
        raw = -1  # where the span passed as it came starts; -1: none open
        hdr = 0  # where the current chunk's size line starts
        payload = 0
        left, crlf, own = self._left, self._crlf, self._own
        while pos < end:
            if left:
                avail = end - pos
                if own:
                    take = left if left < avail else avail
                    out += (b"%x\r\n" % take, data if take == end else data[pos : pos + take],
                            b"\r\n")
                    pos += take
                    left -= take
                    payload += take
                    if not left:
                        crlf = 2
                    continue
                if left <= avail:
                    pos += left
                    payload += left
                    left = 0
                    crlf = 2
                    continue
                # the read ends inside a chunk passed as it came: what precedes
                # its size line goes as it is, what came of it as a chunk of ours
                if hdr > raw >= 0:
                    out.append(data[raw:hdr])
                raw = -1
                out += (b"%x\r\n" % avail, data[pos:], b"\r\n")
                payload += avail
                left -= avail
                own = True
                break
            if crlf:
                # inside a span passed as it came, or already written by us
                take = crlf if crlf < end - pos else end - pos
                pos += take
                crlf -= take
                continue
            if not self._line and not self._trailers:
                # the common case, whole chunks one after another: one size
                # line parsed per chunk, nothing else looked at
                run = pos
                while True:
                    nl = data.find(b"\n", pos)
                    if nl < 0:
                        break
                    try:
                        size = int(data[pos:nl], 16)
                    except ValueError:
                        break  # an extension, or not a size: the step below decides
                    after = nl + size + 3  # the size line's LF, the payload, its CRLF
                    if size <= 0 or after > end:
                        break
                    payload += size
                    pos = after
                if pos > run:
                    own = False
                    if raw < 0:
                        raw = run
                    continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                if raw >= 0:
                    out.append(data[raw:pos])
                    raw = -1
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise UpstreamError("chunk size line too long")
                break
            start = pos
            pos = nl + 1
            spanned = bool(self._line)  # the size line began in an earlier read
            if spanned:
                line = self._line + data[start:nl]
                self._line = b""
            else:
                line = data[start:nl]
            if self._trailers:
                if not line.rstrip(b"\r"):
                    self.done = True
                    if pos < end:
                        raise UpstreamError("data after the end of a chunked body")
                    break
                continue
            try:
                size = int(line, 16)  # the common case: no chunk extension
            except ValueError:
                size = _chunk_size(line.rstrip(b"\r"))
            if size <= 0:
                if size < 0:
                    raise UpstreamError("negative chunk size")
                if raw >= 0:
                    out.append(data[raw:start])
                    raw = -1
                self._trailers = True
                continue
            if spanned:
                own = True
                left = size
                continue
            own = False
            if raw < 0:
                raw = start
            hdr = start
            if pos + size + 2 <= end:
                # all of the chunk and its CRLF are here: the common case, one step
                pos += size + 2
                payload += size
            else:
                left = size
        if raw >= 0:
            if left:  # the read ended right after a size line: that chunk goes out framed here
                if hdr > raw:
                    out.append(data[raw:hdr])
                own = True
            else:
                out.append(data if raw == 0 else data[raw:])
                if crlf:  # the read ended between a chunk's payload and its CRLF
                    out.append(b"\r\n"[2 - crlf :])
        self._left, self._crlf, self._own = left, crlf, own
        return out, payload


def _chunk_size(line: bytes) -> int:
    """A chunk size line's size (extensions after ``;`` ignored); raises :class:`UpstreamError`."""
    size_text = line.split(b";", 1)[0].strip()
    try:
        size = int(size_text, 16)
    except ValueError:
        raise UpstreamError(f"bad chunk size {size_text[:20]!r}") from None
    if size < 0:
        raise UpstreamError("negative chunk size")
    return size


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes], bool]:
    """Status, headers (lower-cased names, last one wins) and whether it is HTTP/1.1."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    # a status is three digits (RFC 9112); a longer run of digits is no status, and
    # int() refuses one over 4300 digits with a ValueError, not an UpstreamError
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise UpstreamError(f"bad status line {lines[0][:60]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise UpstreamError(f"bad header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, parts[0] == b"HTTP/1.1"


# connection states
_IDLE, _HEAD, _BODY, _CLOSED = range(4)
# body framings
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)


class _Socket(TypingProtocol):
    """What an upstream connection uses of its TCP transport."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to an upstream; one exchange at a time."""

    def __init__(self, upstream: Upstream, pool: ConnectionPool | None = None):
        self.upstream = upstream
        self.pool = pool
        self._traffic = upstream.traffic  # counted per read: looked up once here
        self.sink: ResponseSink | None = None
        self.state = _IDLE
        self.started = False  # any response byte seen in the current exchange
        self.reusable = False
        self.exchanges = 0  # how many requests this connection has carried
        self.paused = False
        self._buf = b""
        self._framing = _LENGTH
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._framed = False  # the sink takes the chunked body in its framing

    @property
    def sock(self) -> _Socket:
        """The transport as the TCP connection it is (set before ``connectionMade``)."""
        return cast(_Socket, self.transport)

    def connectionMade(self) -> None:
        # a request written on a reused connection must not wait for a delayed ACK
        sendnow.no_delay(self.transport)

    # -- driving an exchange -------------------------------------------------

    def send(self, head: bytes, body: bytes, sink: ResponseSink) -> None:
        """Write one request; the response goes to ``sink``."""
        self.sink = sink
        self.state = _HEAD
        self.started = False
        self.exchanges += 1
        self._buf = b""
        head = authorized(head, self.upstream)
        sendnow.write(self.sock, head + body if body else head)

    def abort(self) -> None:
        """Drop the exchange and the connection (our client went away)."""
        self.sink = None
        self.reusable = False
        if self.state != _CLOSED and self.transport is not None:
            self.state = _CLOSED
            self.sock.abortConnection()

    # IPushProducer, registered with the API's request: the client's socket
    # buffer fills -> we stop reading the upstream socket, and the upstream
    # (llama-server) blocks in send() in turn.
    def pauseProducing(self) -> None:
        if not self.paused and self.state != _CLOSED:
            self.paused = True
            self.sock.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused and self.state != _CLOSED:
            self.paused = False
            self.sock.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    def pass_framing(self) -> bool:
        """From now on give the sink this body's chunks in their own framing
        (``response_framed``), not decoded; False when the body is not chunked.

        For a sink whose client reads chunked framing too: it writes the
        upstream's bytes on instead of decoding and re-encoding every chunk.
        """
        if self.state != _BODY or self._framing != _CHUNKED:
            return False
        self._framed = True
        return True

    # -- the response --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # the per-chunk path: keep it short
        if self._traffic is not None:
            self._traffic.reads += 1
        if self.state == _BODY:
            # in _BODY there is a sink (and, for chunked framing, a decoder)
            sink = cast(ResponseSink, self.sink)
            framing = self._framing
            if framing == _CHUNKED:
                decoder = cast(ChunkedDecoder, self._decoder)
                if self._framed:
                    try:
                        pieces, nbytes = decoder.frame(data)
                    except UpstreamError as e:
                        self._fail(str(e))
                        return
                    if decoder.done:  # the last chunks and the body's end: one send
                        self._last_read(lambda: sink.response_framed(pieces, nbytes)
                                        if pieces else None)
                    elif pieces:
                        sink.response_framed(pieces, nbytes)
                else:
                    try:
                        payload = decoder.feed(data)
                    except UpstreamError as e:
                        self._fail(str(e))
                        return
                    if decoder.done:
                        self._last_read(lambda: sink.response_data(payload) if payload else None)
                    elif payload:
                        sink.response_data(payload)
            elif framing == _LENGTH:
                if len(data) > self._left:
                    self._fail("upstream sent more than its Content-Length")
                    return
                self._left -= len(data)
                if self._left:
                    sink.response_data(data)
                else:
                    self._last_read(lambda: sink.response_data(data))
            else:
                sink.response_data(data)
            return
        if self.state == _HEAD:
            self.started = True
            sink = cast(ResponseSink, self.sink)  # _HEAD: an exchange is in progress
            sink.read_begins()
            try:
                self._head_received(data)
            finally:
                sink.read_ends()
        elif self.state == _IDLE:
            # a keep-alive connection must be silent between exchanges
            self.reusable = False
            self.sock.loseConnection()

    def _last_read(self, deliver: Callable[[], None]) -> None:
        """The read that ends the body: what it brings and the end the sink writes
        for it (a chunked body's last chunk) leave in one send, as a head's read does."""
        sink = cast(ResponseSink, self.sink)
        sink.read_begins()
        try:
            deliver()
            if self.sink is not None:
                self._finish()
        finally:
            sink.read_ends()

    def _head_received(self, data: bytes) -> None:
        buf = self._buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._fail("response head too large")
                else:
                    self._buf = buf
                return
            try:
                status, headers, http11 = parse_head(buf[:end])
            except UpstreamError as e:
                self._fail(str(e))
                return
            buf = buf[end + 4 :]
            if 100 <= status < 200:
                continue  # 100 Continue and friends: the real head follows
            break
        self._buf = b""
        connection = headers.get(b"connection", b"").lower()
        self.reusable = (b"close" not in connection) if http11 else (b"keep-alive" in connection)
        length: int | None = None
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._framing = _CHUNKED
            self._decoder = ChunkedDecoder()
            self._framed = False
        elif b"content-length" in headers:
            text = headers[b"content-length"].strip()
            if not text.isdigit() or len(text) > 18:  # digits only: no sign, no 4,300-digit int
                self._fail("bad Content-Length")
                return
            length = int(text)
            self._framing = _LENGTH
            self._left = length
        elif status in (204, 304):
            self._framing = _LENGTH
            self._left = length = 0
        else:
            self._framing = _UNTIL_CLOSE
            self.reusable = False
        self.state = _BODY
        sink = cast(ResponseSink, self.sink)  # an exchange is in progress
        sink.response_head(status, headers, length)
        if self.sink is not sink or self.state != _BODY:
            return  # the sink gave up during the head
        if self._framing == _LENGTH and not self._left:
            self._finish()
            if buf:
                self.reusable = False
        elif buf:
            self.dataReceived(buf)

    def _finish(self) -> None:
        sink = cast(ResponseSink, self.sink)  # called only with an exchange in progress
        self.sink = None
        self.state = _IDLE
        self._decoder = None
        self._framed = False
        if self.paused:
            self.paused = False
            self.sock.resumeProducing()
        sink.response_end()
        if self.pool is not None and self.reusable and self.state == _IDLE:
            self.pool.release(self)
        elif self.state != _CLOSED:
            self.sock.loseConnection()

    def _fail(self, reason: str) -> None:
        sink = self.sink
        self.sink = None
        self.reusable = False
        if self.state != _CLOSED:
            self.state = _CLOSED
            self.sock.abortConnection()
        if sink is not None:
            sink.response_failed(reason, self.started)

    def connectionLost(self, reason: Failure | None = None) -> None:
        state = self.state
        self.state = _CLOSED
        if self.pool is not None:
            self.pool.forget(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if state == _BODY and self._framing == _UNTIL_CLOSE:
            sink.response_end()
            return
        what = reason.getErrorMessage() if reason is not None else "connection closed"
        if state == _HEAD and not self.started:
            sink.response_failed(f"connection closed before any response ({what})", False)
        else:
            sink.response_failed(f"connection lost mid-response ({what})", True)


class _Call(TypingProtocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Clock(TypingProtocol):
    """What the pool needs of the reactor (``IReactorTime``; ``task.Clock`` in tests)."""

    # f is positional-only: IReactorTime and task.Clock name it ``callable``
    def callLater(self, delay: float, f: Callable[..., object], /, *args: object) -> _Call: ...


class _Idle:
    __slots__ = ("conn", "call")

    def __init__(self, conn: UpstreamConnection, call: _Call):
        self.conn = conn
        self.call = call


class _OneConnection(Factory):
    """``endpoints.connectProtocol`` without its cost: that one defines a new factory
    class for every call, and its factory logs "Starting factory" and "Stopping
    factory" for each connection, together about 0.13 ms of a request's CPU (a
    thousand streams set up at once wait for all of them)."""

    noisy = False

    def __init__(self, conn: UpstreamConnection):
        self.conn = conn

    def buildProtocol(self, addr: object) -> UpstreamConnection:  # noqa: N802 - Twisted's name
        return self.conn


class ConnectionPool:
    """Fresh or idle keep-alive connections per ``Upstream.pool_key``.

    An empty ``pool_key`` means "never share" (e.g. a tunnel that carries one
    exchange): each request gets a fresh connection, closed afterwards.
    """

    def __init__(self, reactor: _Clock, connect_timeout_s: float = 10.0,
                 *, max_idle_per_key: int = MAX_IDLE_PER_KEY,
                 idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.reactor = reactor
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[_Idle]] = {}

    def acquire(self, upstream: Upstream) -> defer.Deferred:
        """Fires with ``(connection, reused)``; a reused one may turn out stale."""
        idle = self._idle.get(upstream.pool_key) if upstream.pool_key else None
        while idle:
            entry = idle.pop()
            if entry.call.active():
                entry.call.cancel()
            if entry.conn.state == _IDLE:
                return defer.succeed((entry.conn, True))
        return self.connect(upstream).addCallback(lambda conn: (conn, False))

    def connect(self, upstream: Upstream) -> defer.Deferred:
        conn = UpstreamConnection(upstream, self if upstream.pool_key else None)
        d: defer.Deferred = upstream.endpoint().connect(_OneConnection(conn))
        d.addTimeout(self.connect_timeout_s, cast(Any, self.reactor))  # a _Clock is enough
        return d

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.upstream.pool_key, [])
        if len(idle) >= self.max_idle_per_key:
            conn.sock.loseConnection()
            return
        call = self.reactor.callLater(self.idle_timeout_s, self._expire, conn)
        idle.append(_Idle(conn, call))

    def _expire(self, conn: UpstreamConnection) -> None:
        self.forget(conn)
        conn.sock.loseConnection()

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.upstream.pool_key)
        if not idle:
            return
        for entry in idle:
            if entry.conn is conn:
                idle.remove(entry)
                if entry.call.active():
                    entry.call.cancel()
                break

    def idle_count(self, pool_key: str) -> int:
        return len(self._idle.get(pool_key, ()))

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        for idle in list(self._idle.values()):
            for entry in list(idle):
                if entry.call.active():
                    entry.call.cancel()
                entry.conn.sock.loseConnection()
        self._idle.clear()


def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                 body_length: int) -> bytes:
    """The request line and headers of an upstream request."""
    lines = [method, b" ", path, b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: ",
             b"%d" % body_length, b"\r\n"]
    for name, value in headers:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


def authorized(head: bytes, upstream: Upstream) -> bytes:
    """``head`` with the bearer key of ``upstream``'s llama-server, when it wants one.

    Added per connection, not in :func:`request_head`: one head is tried on several
    upstreams in turn, and only a local llama-server takes this node's key (a tunnel's
    far end adds its own).  Any ``Authorization`` already in ``head`` is not ours to
    pass on and is dropped.
    """
    key = upstream.api_key() if upstream.api_key is not None else ""
    if not key:
        return head
    line_end = head.index(b"\r\n") + 2
    rest = head[line_end:]
    if b"authorization:" in rest.lower():
        rest = b"".join(line for line in rest.splitlines(keepends=True)
                        if not line.lower().startswith(b"authorization:"))
    return b"".join((head[:line_end], b"Authorization: Bearer ", key.encode(), b"\r\n", rest))


Connector = Callable[[Upstream], defer.Deferred]
