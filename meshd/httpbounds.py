"""HTTP request bodies within bounds: refused before they are read, never spooled to disk.

twisted.web stores a request body above 100 kB in a temporary file before any
resource sees the request, so a door that checks size (or credentials) in
``render`` has already written whatever the client sent: a 1 GiB unauthenticated
POST to the console became a 1 GiB file.  A :class:`BoundedSite` checks while
the body arrives, as ``meshd.serving.api`` does for the client API:

- the head (method, path, headers) is checked first -- a door's credentials and
  refusals that need no body (:data:`BeforeBody`) -- as soon as the headers are in
  and before a byte of the body is accepted;
- a ``Content-Length`` over ``max_body_bytes`` is answered 413 at once; a body
  without a length (chunked) is cut off with 413 the moment it passes the bound;
- the body is kept in memory (it is bounded), never in a temporary file.

A refusal is written straight to the connection with ``Connection: close`` and no
``100 Continue`` is sent for it; the rest of the body is read and thrown away
for at most ``linger_s`` (so the client reads the answer, not a reset), then the
connection closes.  The error body is the door's own shape (``error_body``).

Deadlines (slowloris): twisted.web's idle timeout restarts on every byte, so a
client sending one header byte a second holds a connection for ever.  A
:class:`BoundedChannel` gives a request's head ``head_timeout_s`` from its first
byte and its body ``body_timeout_s`` from the head's end, neither reset by
arriving bytes; past either it answers 408 (in the door's shape) and closes.  On
a keep-alive connection the next head's deadline starts at its first byte (a
silent keep-alive connection is twisted.web's idle timeout's).
"""

from __future__ import annotations

import hmac
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers

from meshd import sendnow
from meshd.states import RequestPhase

log = logging.getLogger("meshd.httpbounds")

# after a refusal the rest of the body is read and discarded for at most this long
LINGER_S = 5.0
# a request's head must be in this long after its first byte, its body this long after the head
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
# headers a request may carry; more is a 400 (twisted.web's own limit is 500)
MAX_HEADERS = 100


@dataclass(frozen=True)
class Refusal:
    """An answer given before the body is read: status, message and machine code."""

    status: int
    message: str
    code: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


# the door's check of a request's head: (request, method, path without the query)
BeforeBody = Callable[[server.Request, bytes, bytes], "Refusal | None"]
# the door's error body for (status, message, code): its usual JSON shape
ErrorBody = Callable[[int, str, str], bytes]


def api_key_matches(request: server.Request, api_key: bytes) -> bool:
    """``Authorization: Bearer KEY`` (OpenAI's SDKs) or ``x-api-key: KEY`` (Anthropic's),
    compared in constant time."""
    auth = request.getHeader(b"authorization")
    if auth is not None:
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), api_key):
            return True
    header = request.getHeader(b"x-api-key")
    return header is not None and hmac.compare_digest(header.strip(), api_key)


def write_refusal(transport: Any, refusal: Refusal, body: bytes) -> None:
    """The whole answer to a request refused before it was read, straight to the
    connection (twisted.web has no Request to answer with yet): it closes after."""
    phrase = http.RESPONSES.get(refusal.status, b"Error")
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in refusal.headers)
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (refusal.status, phrase, len(body), extra, body))


class BoundedRequest(server.Request):
    """A request whose head is checked before its body, and whose body is held in
    memory up to the site's ``max_body_bytes``."""

    refused: Refusal | None = None
    # the door's head check (``before_body``) ran and passed: the resource need not repeat it
    head_checked = False
    _received = 0
    _head: tuple[bytes, bytes] = (b"", b"")
    content: Any  # an io.BytesIO once the length is known (twisted.web: None until then)

    @property
    def bounded_site(self) -> BoundedSite:
        return cast(BoundedSite, cast(Any, self.channel).site)

    def head_received(self, method: bytes, uri: bytes) -> None:
        """The request line, known before the headers end (set by :class:`BoundedChannel`)."""
        self._head = (method, uri.split(b"?", 1)[0])

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        self.content = io.BytesIO()  # never a temporary file: the bound bounds memory
        if length == 0:
            return  # nothing to read: the resource makes every check as usual
        site = self.bounded_site
        if site.before_body is not None:
            refusal = site.before_body(self, *self._head)
            if refusal is not None:
                self._refuse(refusal)
                return
            self.head_checked = True
        if length is not None and length > site.max_body_bytes:
            self._refuse(site.too_large(f"Content-Length {length}"))

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.refused is not None:
            return
        self._received += len(data)
        site = self.bounded_site
        if self._received > site.max_body_bytes:
            self.content = io.BytesIO()
            self._refuse(site.too_large("body"))
            return
        self.content.write(data)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer at once, discard the rest of the body, then close the connection."""
        self.refused = refusal
        site = self.bounded_site
        transport: Any = self.channel.transport
        write_refusal(transport, refusal, site.refusal_body(self._head[1], refusal))
        site.refused(self, refusal)
        site.reactor.callLater(site.linger_s, transport.loseConnection)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self.refused is not None:
            transport: Any = self.channel.transport
            transport.loseConnection()
            return
        # twisted.web parses every POST's Content-Type with the email package (about
        # 0.1 ms) to find a form; only a body that can be one is worth it
        ctype = self.requestHeaders.getRawHeaders(b"content-type")
        if not (ctype and _may_be_form(ctype[0])):
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)


_FORMS = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _may_be_form(content_type: bytes) -> bool:
    """Whether twisted.web's form parsing could find a form in a body of this type."""
    return content_type.lstrip().lower().startswith(_FORMS)


class BoundedChannel(http.HTTPChannel):
    """The plain HTTP/1.1 channel, telling the request its request line before the
    headers end, sending no ``100 Continue`` for a body already refused, and
    cutting a head or a body that takes longer than the site's deadline."""

    _phase = RequestPhase.IDLE
    _deadline: IDelayedCall | None = None
    _lost = False
    _held: list[bytes] | None = None  # writes kept by hold_writes, until send_held
    # twisted.web parses 500 headers before its 400: a flood of them cost 0.85 ms a
    # request, four times any other junk; the SDKs, curl and browsers send under 30
    maxHeaders = MAX_HEADERS

    @property
    def bounded_site(self) -> BoundedSite:
        return cast(BoundedSite, cast(Any, self).site)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        # the first byte of a head starts its deadline (a pipelined head's when
        # twisted.web replays it, through here, after the request before it)
        if data and self._phase is RequestPhase.IDLE:
            self._phase = RequestPhase.HEAD
            self._arm(self.bounded_site.head_timeout_s, "head")
        super().dataReceived(data)
        if self._phase is RequestPhase.HEAD and getattr(self, "_HTTPChannel__first_line", False) \
                and not getattr(self, "_buffer", b""):
            # only the blank line some clients send after a body: no head has begun
            self._phase = RequestPhase.IDLE
            self._disarm()

    def allHeadersReceived(self) -> None:  # noqa: N802 - Twisted's name
        self._phase = RequestPhase.BODY
        self._disarm()
        if self.length != 0:
            self._arm(self.bounded_site.body_timeout_s, "body")
        request = self.requests[-1]
        if isinstance(request, BoundedRequest):
            request.head_received(self._command, self._path)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802 - Twisted's name
        self._phase = RequestPhase.HANDLING
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:  # noqa: N802 - Twisted's name
        if self.persistent:
            self._phase = RequestPhase.IDLE
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._phase = RequestPhase.CLOSED
        self._lost = True
        self._disarm()
        site = getattr(self, "site", None)
        if isinstance(site, BoundedSite):
            site.channels.discard(self)
        super().connectionLost(reason)

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        # a response's head and its first chunks leave in separate sends (meshd.sendnow):
        # with Nagle's algorithm the second waited for the client's ACK of the first
        sendnow.no_delay(self.transport)
        super().connectionMade()

    # -- writes: sent at once where nothing is queued (meshd.sendnow), not at the next turn

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes,  # noqa: N802
                     headers: Any) -> None:
        if not isinstance(headers, Headers):  # not from a Request: twisted.web's own path
            super().writeHeaders(version, code, reason, headers)
            return
        # twisted.web's head, byte for byte (Headers sanitized every name and value)
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._send(b"".join(head))

    def write(self, data: bytes) -> None:
        self._send(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:  # noqa: N802 - Twisted's name
        self._send(b"".join(iovec))

    # what one upstream read makes us write (a head, its first chunks, maybe the
    # body's end) leaves in one send, not one each: the proxy holds the writes
    # while it handles that read (meshd.serving.api.Forward)
    def hold_writes(self) -> None:
        """Keep this channel's writes until :meth:`send_held` (or a close)."""
        if self._held is None:
            self._held = []

    def send_held(self) -> None:
        held, self._held = self._held, None
        if held:
            sendnow.write(self.transport, b"".join(held))

    def _send(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            sendnow.write(self.transport, data)

    def loseConnection(self) -> None:  # noqa: N802 - Twisted's name
        self.send_held()  # before the close: sent now, not queued behind it
        super().loseConnection()

    def _send100Continue(self) -> None:  # noqa: N802 - Twisted's name
        if self.requests and getattr(self.requests[-1], "refused", None) is not None:
            return
        super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802 - Twisted's name
        # bad framing in a body being discarded after a refusal: the refusal (with
        # "Connection: close") was the answer, a 400 after it would be a second one
        if self.requests and getattr(self.requests[-1], "refused", None) is not None:
            self.loseConnection()
            return
        super()._respondToBadRequestAndDisconnect()

    # -- deadlines ---------------------------------------------------------------

    def _arm(self, delay: float, part: str) -> None:
        self._disarm()
        self._deadline = cast(Any, self).callLater(delay, self._timed_out, part, delay)

    def _disarm(self) -> None:
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()

    def _timed_out(self, part: str, delay: float) -> None:
        self._deadline = None
        self._phase = RequestPhase.CLOSED
        site = self.bounded_site
        transport: Any = self.transport
        if self._lost or getattr(transport, "disconnecting", False):
            return  # already closing (a 400 for a bad head, say)
        request = self.requests[-1] if self.requests else None
        path = getattr(self, "_path", b"").split(b"?", 1)[0]
        site.cut(self, part, delay)
        if getattr(request, "refused", None) is None:  # a refusal already answered
            key = "head_timeout_s" if part == "head" else "body_timeout_s"
            refusal = Refusal(408, f"the request {part} took longer than {delay:g} s "
                                   f"({site.deadline_name(key)})", "request_timeout")
            write_refusal(transport, refusal, site.refusal_body(path, refusal))
        # stop parsing: whatever else this client sends is not read
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        transport.loseConnection()
        # a client that does not read the 408 either is dropped after abortTimeout
        cast(Any, self).callLater(self.abortTimeout or 15, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self._lost:
            cast(Any, self.transport).abortConnection()


class BoundedSite(server.Site):
    """A Site whose requests are :class:`BoundedRequest`; no access log (operators do
    not need one; each door logs what matters)."""

    requestFactory = BoundedRequest
    protocol = BoundedChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, root: resource.Resource, *, max_body_bytes: int, error_body: ErrorBody,
                 what: str, before_body: BeforeBody | None = None,
                 reactor: IReactorTime | None = None, linger_s: float = LINGER_S,
                 head_timeout_s: float = HEAD_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S):
        super().__init__(root, reactor=reactor)
        # open connections (each leaves in its connectionLost), for unsent(): a stop
        # waits for what they have not sent yet
        self.channels: set[BoundedChannel] = set()
        self.max_body_bytes = max_body_bytes
        self.error_body = error_body
        self.before_body = before_body
        self.what = what
        self.linger_s = linger_s
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        channel = super().buildProtocol(addr)
        if channel is not None:
            self.channels.add(channel)
        return channel

    def unsent(self) -> int:
        """Bytes of answers this door's connections hold that their sockets have not
        taken yet (a slow client's): gone if the process exits now."""
        # (writes held for a read are sent when that read is handled: not counted)
        return sum(sendnow.unsent(c.transport) for c in self.channels)

    # what a door may say its own way (the API: its error shapes, its metrics)

    def too_large(self, what: str) -> Refusal:
        return Refusal(413, f"request body too large ({what} exceeds {self.max_body_bytes} "
                            "bytes)", "body_too_large")

    def refusal_body(self, path: bytes, refusal: Refusal) -> bytes:
        """The refusal's body for a request to ``path`` (query left out)."""
        return self.error_body(refusal.status, refusal.message, refusal.code)

    def refused(self, request: server.Request, refusal: Refusal) -> None:
        """A request was refused before its body: the door's log line (and counters)."""
        log.info("%s: refused a request before its body (%d %s)", self.what, refusal.status,
                 refusal.message)

    def deadline_name(self, key: str) -> str:
        """How a deadline is named in a 408's message (the API: its config key)."""
        return key.removesuffix("_timeout_s") + " deadline"

    def cut(self, channel: http.HTTPChannel, part: str, delay: float) -> None:
        """A request's head or body missed its deadline: the door's log line."""
        transport: Any = channel.transport
        log.info("%s: cut a connection from %s: the request %s took longer than %g s",
                 self.what, _peer(transport), part, delay)

    def log(self, request: http.Request) -> None:
        pass


def _peer(transport: Any) -> str:
    try:
        peer = transport.getPeer()
    except Exception:  # noqa: BLE001 - a transport without a peer address
        return "?"
    return str(getattr(peer, "host", peer))
