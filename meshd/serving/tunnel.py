"""HTTP tunnels: requests for a model served on another node, carried over mTLS.

A tunnel is one peer connection (``meshd.mesh.peer``: TLS 1.3 with certificates
both ways, HELLO with a session-bound proof of the mesh secret -- exactly the
control channel's authentication, so there is no unauthenticated side door)
opened with purpose ``"http"`` and then switched to raw bytes.  Its life:

1. The requesting node dials the host (``mesh.connect_peer(node_id, "http")``)
   and, once the connection is open, sends one ``TUNNEL`` frame
   ``{"model": name}`` (the frame format of ``meshd.mesh.wire``).
2. The host checks that it serves that model warm and answers with one
   ``TUNNEL`` frame: ``{"ok": true}``, or ``{"error": reason}`` and closes.
   The requesting node learns this before it sends a single HTTP byte, so a
   stale routing table costs a failover, never a failed request.
3. From then on the tunnel is a persistent HTTP/1.1 keep-alive connection
   between the requesting node's API client (``meshd.serving.proxy``, which pools it
   under ``tunnel:<node>:<model>``) and an HTTP channel of the host's
   tunnel-only API (``meshd.serving.api.ApiServer`` with ``relay=True`` in front of
   ``meshd.serving.router.LocalOnlyRouter``: this node's llama-server, never a third
   node).  That API talks to llama-server with its own pooled client, which
   reconnects after llama-server closes its connection (it does after every
   streamed response), so the tunnel outlives llama-server's connections and
   carries one exchange after another.  A request the host cannot serve any
   more is not answered: the host hangs up, and the requester retries on a
   fresh tunnel (refused at step 2: failover).

Backpressure runs through the whole path: both ends hand their HTTP protocol
a :class:`TunnelTransport`, whose producer registration and pause/resume go
to the peer connection's TLS transport.  A slow API client on the requesting
node pauses the tunnel's socket; its TCP window fills the host's TLS writes,
whose pause reaches the host's HTTP channel and from it the host's read of
llama-server's socket.  Either end closing the tunnel closes the other.

A tunnel that cannot be opened (dial, TLS, HELLO, or the host vanishing
before it answered) is reported with ``mesh.peer_unreachable(node_id,
reason)``: the mesh probes the control connection at once and, if that is
dead too, removes the node and broadcasts PEER_DOWN (the death path).  The
API then fails over to the next host.

This module is protocol only: which model goes where is ``meshd.serving.router``'s
business; the host side asks a ``check(model)`` callable whether it serves
the model and hands the bytes to the tunnel API's site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd.mesh import wire
from meshd.mesh.wire import FrameType
from meshd.states import TUNNEL_MOVES, TunnelState, check_move

log = logging.getLogger("meshd.serving.tunnel")


class _Stream(TypingProtocol):
    """What a tunnel does with the protocol it carries (an ``IProtocol``)."""

    def makeConnection(self, transport: Any) -> None: ...
    def dataReceived(self, data: bytes) -> None: ...
    def connectionLost(self, reason: Failure) -> None: ...


class _StreamFactory(TypingProtocol):
    """What a tunnel needs of the factory it is handed (an ``IProtocolFactory``)."""

    def buildProtocol(self, addr: Any) -> _Stream | None: ...


class PeerLink(TypingProtocol):
    """What a tunnel needs of an authenticated peer connection (``meshd.mesh.peer.PeerProtocol``).

    ``transport`` is the connection's TLS transport: writes, producers and
    ``setTcpNoDelay`` go to it.
    """

    node_id: str | None
    transport: Any
    closed: defer.Deferred[str]
    ended_by_peer: bool

    def take_over(self, receiver: Callable[[bytes], None]) -> None: ...
    def close(self, reason: str, *, notify: bool = ..., abort: bool = ...) -> None: ...


class TunnelMesh(TypingProtocol):
    """What a tunnel needs of the mesh (``meshd.mesh.gossip.MeshService``)."""

    def register_purpose(self, purpose: str, handler: Callable[[Any], None]) -> None: ...
    def connect_peer(self, node_id: str, purpose: str) -> defer.Deferred[Any]: ...
    def peer_unreachable(self, node_id: str, reason: str) -> None: ...


class TunnelApi(TypingProtocol):
    """The tunnel API (``meshd.serving.api.ApiServer``, ``relay=True``): its site makes
    the HTTP channel each tunnel carries; ``drain`` stops new requests, lets these end."""

    draining: bool

    @property
    def site(self) -> IProtocolFactory: ...

    @property
    def in_flight(self) -> int: ...

    def drain(self, timeout_s: float) -> defer.Deferred[Any]: ...


PURPOSE = "http"
# the TUNNEL frames are a few dozen bytes; anything bigger is not a tunnel
MAX_TUNNEL_FRAME_BYTES = 64 * 1024
# how long a stopping node waits for an idle tunnel's last writes to leave
CLOSE_GRACE_S = 2.0


class TunnelError(error.ConnectError):
    """A tunnel could not be opened; ``str()`` is the reason (for logs and the 503)."""

    def __init__(self, reason: str):
        super().__init__(string=reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class TunnelRefused(TunnelError):
    """The host answered, but will not carry this model (stale routing): fail over, no suspicion."""


class TunnelFailed(TunnelError):
    """The host could not be reached or vanished before answering: it is suspect."""


def _tunnel_frame(body: dict[str, Any]) -> bytes:
    return wire.encode_json(FrameType.TUNNEL, body, max_frame_bytes=MAX_TUNNEL_FRAME_BYTES)


# -- the host's side ------------------------------------------------------------------------

Check = Callable[[str], None]
"""``check(model)``: returns when this node serves ``model`` warm; raises
``TunnelRefused(reason)`` when it does not (or not right now)."""


class TunnelHost:
    """Accepts tunnel connections of one purpose from peers; subclasses say what a tunnel
    carries (``channel``) and whom it is for (``refusal``).

    ``attach(mesh)`` registers the handler; ``tunnels`` are the ones open now.
    """

    purpose = PURPOSE

    def __init__(self) -> None:
        self.tunnels: set[HostTunnel] = set()
        self.opened = 0  # tunnels accepted, since start
        # (peer, model) -> the reason its last tunnel was refused: a host probes a worker
        # every few seconds while they disagree, and the warning is news once
        self.last_refusal: dict[tuple[str, str], str] = {}

    def attach(self, mesh: TunnelMesh) -> None:
        mesh.register_purpose(self.purpose, self.handle)

    def handle(self, peer: PeerLink) -> None:
        """An authenticated peer connection with this purpose: take it over."""
        tunnel = HostTunnel(peer, self)
        self.tunnels.add(tunnel)
        tunnel.start()

    def refusal(self, model: str, who: str) -> str:
        """Why a tunnel for ``model`` from node ``who`` is refused; ``""`` to open it."""
        raise NotImplementedError

    def channel(self, addr: Any) -> _Stream | None:
        """The protocol that gets the tunnel's bytes once it is open."""
        raise NotImplementedError

    def close_all(self) -> None:
        """Abort every open tunnel (the tunnels are not for this node any more)."""
        for tunnel in list(self.tunnels):
            tunnel.close("this node is stopping")

    def idle(self, tunnel: HostTunnel) -> bool:
        """Whether ``tunnel`` carries nothing now, so that a close may let what it
        wrote drain first; a raw byte relay never knows, so it is never idle."""
        return False

    def finish_all(self, clock: IReactorTime, grace_s: float = CLOSE_GRACE_S) -> defer.Deferred[Any]:
        """Close every tunnel as the node stops, after the drain: an idle one once
        what it wrote has left (within ``grace_s``), a busy one at once.

        The drain ends in the same turn as the last request's ``finish()``, whose
        last chunk is then still in the TLS layer's buffer or the socket's; an
        abort would drop it and the peer's client would get an SSE ``error``
        instead of the end of a complete answer."""
        return defer.DeferredList(
            [tunnel.finish("this node is stopping", clock, grace_s)
             for tunnel in list(self.tunnels)], consumeErrors=True)


class TunnelServer(TunnelHost):
    """Accepts ``"http"`` connections from peers and serves each with the tunnel API's site.

    ``api`` is the tunnel-only ``meshd.serving.api.ApiServer`` (``relay=True``).
    """

    def __init__(self, check: Check, api: TunnelApi):
        super().__init__()
        self.check = check
        self.api = api

    def refusal(self, model: str, who: str) -> str:
        if self.api.draining:
            return "this node is stopping"
        try:
            self.check(model)
        except TunnelRefused as e:
            return e.reason
        return ""

    def channel(self, addr: Any) -> _Stream | None:
        return cast("_Stream | None", self.api.site.buildProtocol(addr))

    def idle(self, tunnel: HostTunnel) -> bool:
        # twisted.web's channel keeps its unfinished requests in ``requests``
        return tunnel.channel is not None and not getattr(tunnel.channel, "requests", True)

    def drain(self, timeout_s: float) -> defer.Deferred:
        """Refuse new tunnels and requests; fires once the requests carried now ended (or timeout)."""
        return self.api.drain(timeout_s)


class HostTunnel:
    """One tunnel on the host: the TUNNEL header, then an HTTP channel of the tunnel API.

    States (``meshd.states.TunnelState``, moves in ``TUNNEL_MOVES``): HEADER
    (waiting for the TUNNEL frame) -> OPEN (the channel reads the peer's bytes)
    -> CLOSED.  Either state can go to CLOSED.
    """

    HEADER, OPEN, CLOSED = TunnelState.HEADER, TunnelState.OPEN, TunnelState.CLOSED

    def __init__(self, peer: PeerLink, server: TunnelHost):
        self.peer = peer
        self.server = server
        self.state = TunnelState.HEADER
        self.model: str | None = None
        self.channel: _Stream | None = None
        self._decoder: wire.Decoder | None = wire.Decoder(MAX_TUNNEL_FRAME_BYTES)

    @property
    def who(self) -> str:
        return self.peer.node_id or "?"

    def start(self) -> None:
        self.peer.take_over(self._header_data)
        self.peer.closed.addCallback(self.peer_lost)

    def _header_data(self, data: bytes) -> None:
        if self.state != self.HEADER:
            return
        assert self._decoder is not None
        try:
            frame = next(iter(self._decoder.feed(data)), None)
        except wire.FrameError as e:
            self._refuse(f"bad tunnel header: {e}")
            return
        if frame is None:
            return
        rest = self._decoder.take_buffer()
        self._decoder = None
        try:
            if frame.type != FrameType.TUNNEL:
                raise wire.FrameError(f"expected a TUNNEL frame, got type {frame.type}")
            model = frame.json().get("model")
            if not isinstance(model, str) or not model:
                raise wire.FrameError("TUNNEL frame names no model")
        except wire.FrameError as e:
            self._refuse(f"bad tunnel header: {e}")
            return
        self.model = model
        refused = self.server.refusal(model, self.who)
        if refused:
            self._refuse(refused)
            return
        self._open(rest)

    def _open(self, rest: bytes) -> None:
        peer = self.peer
        channel = self.server.channel(peer.transport.getPeer())
        if channel is None:
            self._refuse("the tunnel's protocol refused the connection")
            return
        peer.transport.write(_tunnel_frame({"ok": True}))
        self.channel = channel
        self._move(TunnelState.OPEN)
        self.server.opened += 1
        channel.makeConnection(TunnelTransport(peer, self.who, self.model or "?"))
        peer.take_over(channel.dataReceived)  # from now on the peer's bytes are HTTP
        log.debug("tunnel from %s open for %s", self.who, self.model)
        if rest:
            channel.dataReceived(rest)

    # -- endings ---------------------------------------------------------------------------

    def peer_lost(self, reason: str) -> str:
        """The tunnel connection closed: the channel (and any request on it) ends."""
        channel, self.channel = self.channel, None
        self._close_state()
        if channel is not None:
            channel.connectionLost(_lost(self.peer, reason))
        return reason

    def close(self, reason: str) -> None:
        if self.state == self.CLOSED:
            return
        log.debug("closing the tunnel from %s: %s", self.who, reason)
        self.peer.transport.abortConnection()

    def finish(self, reason: str, clock: IReactorTime, grace_s: float) -> defer.Deferred[None]:
        """Close after what was written has left; abort if that takes ``grace_s``
        (a peer that stopped reading) or if the tunnel is not idle; fires once closed."""
        if self.state == self.CLOSED:
            return defer.succeed(None)
        if not self.server.idle(self):  # idle: an open HTTP channel with no request
            self.close(reason)
            return defer.succeed(None)
        log.debug("closing the tunnel from %s once its writes have left: %s", self.who, reason)
        done: defer.Deferred[None] = defer.Deferred()

        def closed(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            done.callback(None)
            return result

        timer = clock.callLater(grace_s, self.close, f"{reason}; its writes did not leave "
                                                    f"within {grace_s:g} s")
        self.peer.closed.addBoth(closed)
        cast(Any, self.channel).transport.loseConnection()  # its TunnelTransport
        return done

    def _refuse(self, reason: str) -> None:
        seen, key = self.server.last_refusal, (self.who, self.model or "")
        level = logging.DEBUG if seen.get(key) == reason else logging.WARNING
        if len(seen) >= 256:  # bounded: peers and models come and go
            seen.clear()
        seen[key] = reason
        log.log(level, "refused a tunnel from node %s%s: %s", self.who,
                f" for {self.model}" if self.model else "", reason)
        self._close_state()
        peer_t = self.peer.transport
        if peer_t is not None:
            peer_t.write(_tunnel_frame({"error": reason[:500]}))
            peer_t.loseConnection()

    def _move(self, new: TunnelState) -> None:
        check_move("tunnel", TUNNEL_MOVES, self.state, new)
        self.state = new

    def _close_state(self) -> None:
        if self.state != TunnelState.CLOSED:
            self._move(TunnelState.CLOSED)
        self._decoder = None
        self.server.tunnels.discard(self)


def _lost(peer: PeerLink, reason: str) -> Failure:
    """The ``connectionLost`` reason for a tunnel's protocol: done when the other end
    ended it, lost (with the reason) when this end had to."""
    return Failure(error.ConnectionDone() if peer.ended_by_peer else error.ConnectionLost(reason))


# -- the requesting node's side --------------------------------------------------------------


@implementer(ITransport, IPushProducer, IConsumer)
class TunnelTransport:
    """What the HTTP protocol at either end sees: a transport over an open tunnel.

    Writes, producers and pausing go to the peer connection's TLS transport
    (whose pause stops reading the socket); closing it closes the tunnel.
    ``node_id`` is the node at the other end.
    """

    def __init__(self, peer: PeerLink, node_id: str, model: str):
        self._peer = peer
        self._t = peer.transport
        self.node_id = node_id
        self.model = model
        self.disconnecting = False
        self._producer = False  # a producer is registered on the TLS transport through us

    def write(self, data: bytes) -> None:
        self._t.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:  # noqa: N802
        self._t.writeSequence(data)

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True
        # TLS closes only once no producer is registered: nothing is produced after a close
        if self._producer:
            self.unregisterProducer()
        self._t.loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        self.disconnecting = True
        if self._peer.closed.called:
            return  # gone already (a spliced socket's close stops its producer: us)
        self._t.abortConnection()

    def getPeer(self) -> Any:  # noqa: N802
        return self._t.getPeer()

    def getHost(self) -> Any:  # noqa: N802
        return self._t.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        try:
            self._t.setTcpNoDelay(enabled)
        except (AttributeError, NotImplementedError, OSError):
            pass  # not a TCP connection underneath (tests); the tunnel set it when it opened

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self._t.registerProducer(producer, streaming)
        self._producer = True

    def unregisterProducer(self) -> None:  # noqa: N802
        self._producer = False
        self._t.unregisterProducer()

    def pauseProducing(self) -> None:  # noqa: N802
        self._t.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self._t.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        self.abortConnection()

    def __repr__(self) -> str:
        return f"<TunnelTransport to {self.node_id} for {self.model}>"


Unreachable = Callable[[str, str], None]


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A client endpoint whose connections are tunnels to ``node_id``'s llama-server of ``model``.

    ``mesh`` needs ``connect_peer(node_id, purpose)`` and
    ``peer_unreachable(node_id, reason)`` (``meshd.mesh.gossip.MeshService``).
    """

    def __init__(self, mesh: TunnelMesh, node_id: str, model: str, purpose: str = PURPOSE):
        self.mesh = mesh
        self.node_id = node_id
        self.model = model
        self.purpose = purpose

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return _ClientOpen(self, cast(_StreamFactory, factory)).start()

    def __repr__(self) -> str:
        return f"<TunnelEndpoint {self.node_id} {self.model}>"


class _ClientOpen:
    """One tunnel being opened, then carried: dial -> TUNNEL exchange -> hand over the protocol."""

    def __init__(self, endpoint: TunnelEndpoint, factory: _StreamFactory):
        self.ep = endpoint
        self.factory = factory
        self.peer: PeerLink | None = None
        self.proto: _Stream | None = None
        self.result: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)
        self._decoder = wire.Decoder(MAX_TUNNEL_FRAME_BYTES)
        self._done = False  # the result has fired

    def start(self) -> defer.Deferred[IProtocol]:
        d = self.ep.mesh.connect_peer(self.ep.node_id, self.ep.purpose)
        d.addCallbacks(self._opened, self._open_failed)
        return self.result

    # -- opening ----------------------------------------------------------------------------

    def _opened(self, peer: PeerLink) -> None:
        if self._done:  # cancelled meanwhile
            peer.close("tunnel no longer wanted", notify=False, abort=True)
            return
        self.peer = peer
        peer.take_over(self._data)
        peer.closed.addCallback(self._peer_lost)
        peer.transport.write(_tunnel_frame({"model": self.ep.model}))

    def _open_failed(self, failure: Failure) -> None:
        if self._done:
            return
        reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        self._fail(TunnelFailed(f"cannot open a tunnel to node {self.ep.node_id}: {reason}"),
                   suspect=True)

    def _data(self, data: bytes) -> None:
        if self.proto is not None:
            self.proto.dataReceived(data)
            return
        try:
            frame = next(iter(self._decoder.feed(data)), None)
        except wire.FrameError as e:
            self._abandon(f"bad tunnel answer: {e}", suspect=False)
            return
        if frame is None:
            return
        rest = self._decoder.take_buffer()
        try:
            if frame.type != FrameType.TUNNEL:
                raise wire.FrameError(f"expected a TUNNEL frame, got type {frame.type}")
            body = frame.json()
        except wire.FrameError as e:
            self._abandon(f"bad tunnel answer: {e}", suspect=False)
            return
        if body.get("ok") is not True:
            reason = str(body.get("error") or "no reason given")[:500]
            self._abandon(f"node {self.ep.node_id} refused a tunnel for {self.ep.model}: {reason}",
                          suspect=False)
            return
        self._hand_over(rest)

    def _hand_over(self, rest: bytes) -> None:
        peer = self.peer
        assert peer is not None, "handed over before the tunnel opened"
        proto = self.factory.buildProtocol(peer.transport.getPeer())
        if proto is None:
            self._abandon("the protocol factory refused the connection", suspect=False)
            return
        self.proto = proto
        proto.makeConnection(TunnelTransport(peer, self.ep.node_id, self.ep.model))
        self._done = True
        self.result.callback(cast(IProtocol, proto))
        if rest:
            proto.dataReceived(rest)

    # -- endings ------------------------------------------------------------------------------

    def _peer_lost(self, reason: str) -> str:
        if self.proto is not None and self.peer is not None:
            proto, self.proto = self.proto, None
            proto.connectionLost(_lost(self.peer, reason))
        elif not self._done:
            self._fail(TunnelFailed(
                f"node {self.ep.node_id} closed the tunnel before answering: {reason}"), suspect=True)
        return reason

    def _abandon(self, reason: str, *, suspect: bool) -> None:
        self._fail(TunnelRefused(reason) if not suspect else TunnelFailed(reason), suspect=suspect)
        if self.peer is not None:
            self.peer.close(reason, notify=False)

    def _fail(self, exc: TunnelError, *, suspect: bool) -> None:
        if self._done:
            return
        self._done = True
        if suspect:
            log.warning("tunnel to node %s for %s failed: %s", self.ep.node_id, self.ep.model, exc)
            self.ep.mesh.peer_unreachable(self.ep.node_id, str(exc))
        else:
            log.info("tunnel to node %s for %s not opened: %s", self.ep.node_id, self.ep.model, exc)
        self.result.errback(Failure(exc))

    def _cancel(self, d: defer.Deferred) -> None:
        """The caller gave up (its connect timeout): drop the attempt; the peer is suspect."""
        if self._done:
            return
        self._done = True
        reason = f"no tunnel to node {self.ep.node_id} for {self.ep.model} in time"
        log.warning("%s; checking the node", reason)
        self.ep.mesh.peer_unreachable(self.ep.node_id, reason)
        if self.peer is not None:
            self.peer.close(reason, notify=False, abort=True)
        d.errback(Failure(defer.CancelledError(reason)))
