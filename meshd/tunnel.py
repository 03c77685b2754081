"""HTTP tunnels: a request for a model served on another node, carried over mTLS.

A tunnel is one peer connection (``meshd.peer``: TLS 1.3 with certificates
both ways, HELLO with a session-bound proof of the mesh secret -- exactly the
control channel's authentication, so there is no unauthenticated side door)
opened with purpose ``"http"`` and then switched to raw bytes.  Its life:

1. The requesting node dials the host (``mesh.connect_peer(node_id, "http")``)
   and, once the connection is open, sends one ``TUNNEL`` frame
   ``{"model": name}`` (the frame format of ``meshd.wire``).
2. The host connects to its own llama-server for that model and answers with
   one ``TUNNEL`` frame: ``{"ok": true}``, or ``{"error": reason}`` and closes
   (it does not serve that model, or its llama-server is not reachable).  The
   requesting node learns this before it sends a single HTTP byte, so a stale
   routing table costs a failover, never a failed request.
3. From then on both ends splice bytes: the requesting node's HTTP client
   (``meshd.proxy``) writes HTTP/1.1 into the tunnel as if it were a TCP
   connection to the llama-server, keep-alive included, so the API pools
   tunnels like any upstream connection (pool key per peer and model).

Backpressure runs through the whole path, the way
``twisted/protocols/portforward.py`` wires it: each side of a splice is
registered as the streaming producer of the other side's transport, so a
slow API client pauses the tunnel's socket, whose TCP window pauses the
host's TLS writes, which pause the host's read of llama-server's socket.
Either end closing closes the other.

A tunnel that cannot be opened (dial, TLS, HELLO, or the host vanishing
before it answered) is reported with ``mesh.peer_unreachable(node_id,
reason)``: the mesh probes the control connection at once and, if that is
dead too, removes the node and broadcasts PEER_DOWN (the death path).  The
API then fails over to the next host.

This module is protocol only: which model goes where is ``meshd.router``'s
business; the host side asks a ``lookup(model)`` callable for the local
endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd import wire
from meshd.wire import FrameType

log = logging.getLogger("meshd.tunnel")

PURPOSE = "http"
# the TUNNEL frames are a few dozen bytes; anything bigger is not a tunnel
MAX_TUNNEL_FRAME_BYTES = 64 * 1024
# bytes of the request the host holds while it connects to llama-server
# before it stops reading the tunnel
HOLD_WHILE_CONNECTING_BYTES = 256 * 1024


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


def _set_nodelay(transport: Any) -> None:
    """Each SSE chunk leaves at once; a tunnel must not wait for delayed ACKs."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, NotImplementedError, OSError):
        pass


def _tunnel_frame(body: dict[str, Any]) -> bytes:
    return wire.encode_json(FrameType.TUNNEL, body, max_frame_bytes=MAX_TUNNEL_FRAME_BYTES)


# -- the host's side ------------------------------------------------------------------------

Lookup = Callable[[str], IStreamClientEndpoint]
"""``lookup(model)``: an endpoint to this node's llama-server for ``model``; raises
``TunnelRefused(reason)`` when this node does not serve it (or not right now)."""


class TunnelServer:
    """Accepts ``"http"`` connections from peers and splices each to a local llama-server.

    ``attach(mesh)`` registers it; ``splices`` are the tunnels open now.
    """

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self.splices: set[HostSplice] = set()
        self.opened = 0  # tunnels that reached a llama-server, since start

    def attach(self, mesh: Any) -> None:
        mesh.register_purpose(PURPOSE, self.handle)

    def handle(self, peer: Any) -> None:
        """An authenticated peer connection with purpose ``"http"``: take it over."""
        splice = HostSplice(peer, self.lookup, done=self.splices.discard)
        self.splices.add(splice)
        splice.start()
        if splice.state == HostSplice.CLOSED:
            self.splices.discard(splice)

    def close_all(self) -> None:
        """Shut every open tunnel (the node stops)."""
        for splice in list(self.splices):
            splice.close("this node is stopping")


class _LocalSide(Protocol):
    """The host's connection to its llama-server: bytes go to the splice."""

    def __init__(self, splice: HostSplice):
        self.splice = splice

    def connectionMade(self) -> None:  # noqa: N802
        _set_nodelay(self.transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.splice.peer.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self.splice.local_lost(reason)


class HostSplice:
    """One tunnel on the host: header, connect to llama-server, then bytes both ways.

    States: HEADER (waiting for the TUNNEL frame) -> CONNECTING (dialling the
    local llama-server, holding what the peer already sent) -> OPEN
    (splicing) -> CLOSED.  Any state can go to CLOSED.
    """

    HEADER, CONNECTING, OPEN, CLOSED = "header", "connecting", "open", "closed"

    def __init__(self, peer: Any, lookup: Lookup, *, done: Callable[[HostSplice], Any] | None = None):
        self.peer = peer
        self.lookup = lookup
        self.state = self.HEADER
        self.model: str | None = None
        self.local: _LocalSide | None = None
        self._done = done
        self._decoder: wire.Decoder | None = wire.Decoder(MAX_TUNNEL_FRAME_BYTES)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._peer_paused = False
        self._connecting: defer.Deferred | None = None

    @property
    def who(self) -> str:
        return getattr(self.peer, "node_id", None) or "?"

    def start(self) -> None:
        self.peer.take_over(self.peer_data)
        self.peer.closed.addCallback(self.peer_lost)
        _set_nodelay(self.peer.transport)

    # -- bytes from the peer --------------------------------------------------------------

    def peer_data(self, data: bytes) -> None:
        if self.state == self.OPEN:
            self.local.transport.write(data)
        elif self.state == self.HEADER:
            self._header_data(data)
        elif self.state == self.CONNECTING:
            self._hold(data)

    def _header_data(self, data: bytes) -> None:
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
        try:
            endpoint = self.lookup(model)
        except TunnelRefused as e:
            self._refuse(e.reason)
            return
        self.state = self.CONNECTING
        if rest:
            self._hold(rest)
        d = self._connecting = endpoint.connect(_OneProtocol(_LocalSide(self)))
        d.addCallbacks(self._local_connected, self._local_failed)

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_WHILE_CONNECTING_BYTES and not self._peer_paused:
            self._peer_paused = True
            self.peer.transport.pauseProducing()

    # -- the local llama-server ----------------------------------------------------------------

    def _local_connected(self, local: _LocalSide) -> None:
        self._connecting = None
        if self.state != self.CONNECTING:  # the peer went away meanwhile
            local.transport.loseConnection()
            return
        self.local = local
        self.state = self.OPEN
        peer_t = self.peer.transport
        peer_t.write(_tunnel_frame({"ok": True}))
        held, self._held, self._held_bytes = self._held, [], 0
        if held:
            local.transport.writeSequence(held)
        # portforward's two lines: each side pauses the other
        peer_t.registerProducer(local.transport, True)
        local.transport.registerProducer(peer_t, True)
        if self._peer_paused:
            self._peer_paused = False
            peer_t.resumeProducing()
        log.debug("tunnel from %s open to the local llama-server of %s", self.who, self.model)

    def _local_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state != self.CONNECTING:
            return
        self._refuse(f"cannot reach this node's llama-server for {self.model}: "
                     f"{failure.getErrorMessage()}")

    def local_lost(self, reason: Failure | None) -> None:
        """llama-server closed its side: close the tunnel once its bytes are out."""
        if self.state == self.CLOSED:
            return
        self._close_state()
        peer_t = self.peer.transport
        if peer_t is not None:
            peer_t.unregisterProducer()
            peer_t.loseConnection()

    # -- endings ---------------------------------------------------------------------------

    def peer_lost(self, reason: str) -> str:
        """The tunnel connection closed: close the llama-server side too."""
        if self.state != self.CLOSED:
            self._close_state()
            if self._connecting is not None:
                self._connecting.cancel()
            if self.local is not None and self.local.transport is not None:
                self.local.transport.unregisterProducer()
                self.local.transport.loseConnection()
        return reason

    def close(self, reason: str) -> None:
        if self.state == self.CLOSED:
            return
        log.debug("closing the tunnel from %s: %s", self.who, reason)
        self.peer.transport.abortConnection()

    def _refuse(self, reason: str) -> None:
        log.warning("refused a tunnel from node %s%s: %s", self.who,
                    f" for {self.model}" if self.model else "", reason)
        self._close_state()
        peer_t = self.peer.transport
        if peer_t is not None:
            peer_t.write(_tunnel_frame({"error": reason[:500]}))
            peer_t.loseConnection()

    def _close_state(self) -> None:
        self.state = self.CLOSED
        self._held = []
        if self._done is not None:
            done, self._done = self._done, None
            done(self)


class _OneProtocol(Factory):
    """A factory that hands out one prepared protocol (for ``endpoint.connect``)."""

    def __init__(self, proto: Protocol):
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._proto


# -- the requesting node's side --------------------------------------------------------------


@implementer(ITransport, IPushProducer, IConsumer)
class TunnelTransport:
    """What the HTTP client sees: a transport over an open tunnel.

    Writes, producers and pausing go to the peer connection's TLS transport
    (whose pause stops reading the socket); closing it closes the tunnel.
    """

    def __init__(self, peer: Any, node_id: str, model: str):
        self._peer = peer
        self._t = peer.transport
        self.node_id = node_id
        self.model = model
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._t.write(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self._t.writeSequence(data)

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True
        self._t.loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        self.disconnecting = True
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

    def unregisterProducer(self) -> None:  # noqa: N802
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
    ``peer_unreachable(node_id, reason)`` (``meshd.mesh.MeshService``).
    """

    def __init__(self, mesh: Any, node_id: str, model: str):
        self.mesh = mesh
        self.node_id = node_id
        self.model = model

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return _ClientOpen(self, factory).start()

    def __repr__(self) -> str:
        return f"<TunnelEndpoint {self.node_id} {self.model}>"


class _ClientOpen:
    """One tunnel being opened, then carried: dial -> TUNNEL exchange -> hand over the protocol."""

    def __init__(self, endpoint: TunnelEndpoint, factory: IProtocolFactory):
        self.ep = endpoint
        self.factory = factory
        self.peer: Any = None
        self.proto: IProtocol | None = None
        self.result: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)
        self._decoder = wire.Decoder(MAX_TUNNEL_FRAME_BYTES)
        self._done = False  # the result has fired

    def start(self) -> defer.Deferred[IProtocol]:
        d = self.ep.mesh.connect_peer(self.ep.node_id, PURPOSE)
        d.addCallbacks(self._opened, self._open_failed)
        return self.result

    # -- opening ----------------------------------------------------------------------------

    def _opened(self, peer: Any) -> None:
        if self._done:  # cancelled meanwhile
            peer.close("tunnel no longer wanted", notify=False, abort=True)
            return
        self.peer = peer
        peer.take_over(self._data)
        peer.closed.addCallback(self._peer_lost)
        _set_nodelay(peer.transport)
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
        proto = self.factory.buildProtocol(peer.transport.getPeer())
        if proto is None:
            self._abandon("the protocol factory refused the connection", suspect=False)
            return
        self.proto = proto
        proto.makeConnection(TunnelTransport(peer, self.ep.node_id, self.ep.model))
        self._done = True
        self.result.callback(proto)
        if rest:
            proto.dataReceived(rest)

    # -- endings ------------------------------------------------------------------------------

    def _peer_lost(self, reason: str) -> str:
        if self.proto is not None:
            clean = reason in ("connection closed by the peer",) or reason.startswith("peer closed")
            exc = error.ConnectionDone() if clean else error.ConnectionLost(reason)
            proto, self.proto = self.proto, None
            proto.connectionLost(Failure(exc))
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
