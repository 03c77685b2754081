"""The HTTP tunnel with in-memory transports: the TUNNEL exchange, the splice, backpressure,
closing together, and what a failed open does (suspect the peer, or just fail over).

A ``FakePeer`` stands in for an authenticated ``meshd.peer.PeerProtocol`` after
OPEN (``take_over``, ``closed``, a transport); two of them are joined by
``pump`` so the requesting side and the host side talk to each other.  No
socket, no clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from meshd import wire
from meshd.proxy import ConnectionPool, UpstreamConnection
from meshd.routing import Upstream
from meshd.tunnel import (
    HOLD_WHILE_CONNECTING_BYTES,
    HostSplice,
    TunnelEndpoint,
    TunnelFailed,
    TunnelRefused,
    TunnelServer,
    TunnelTransport,
)
from meshd.wire import FrameType


class FakePeer:
    """An open peer connection after authentication: bytes in via ``feed``, out on ``transport``."""

    def __init__(self, node_id: str = "node-b"):
        self.node_id = node_id
        self.transport = StringTransport()
        self.closed: defer.Deferred[str] = defer.Deferred()
        self._raw = None
        self.close_reasons: list[str] = []

    def take_over(self, receiver) -> None:
        self._raw = receiver

    def feed(self, data: bytes) -> None:
        assert self._raw is not None, "nobody took the connection over"
        self._raw(data)

    def close(self, reason: str, *, notify: bool = True, abort: bool = False) -> None:
        self.close_reasons.append(reason)
        self.transport.loseConnection()

    def lost(self, reason: str = "connection closed by the peer") -> None:
        if not self.closed.called:
            self.closed.callback(reason)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data


def frames(data: bytes) -> list[wire.Frame]:
    return list(wire.Decoder().feed(data))


def tunnel_frame(body: dict[str, Any]) -> bytes:
    return wire.encode_json(FrameType.TUNNEL, body)


class LocalEndpoint:
    """The host's llama-server endpoint: each connection gets a StringTransport."""

    def __init__(self, *, fire: bool = True):
        self.fire = fire
        self.pending: list[tuple[defer.Deferred, Protocol]] = []
        self.protocols: list[Protocol] = []

    def connect(self, factory: Factory) -> defer.Deferred:
        proto = factory.buildProtocol(None)
        d: defer.Deferred = defer.Deferred()
        if self.fire:
            self._made(proto)
            d.callback(proto)
        else:
            self.pending.append((d, proto))
        return d

    def _made(self, proto: Protocol) -> None:
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)

    def finish(self) -> Protocol:
        d, proto = self.pending.pop(0)
        self._made(proto)
        d.callback(proto)
        return proto


def host(lookup=None, *, local: LocalEndpoint | None = None) -> tuple[FakePeer, HostSplice, LocalEndpoint]:
    local = local or LocalEndpoint()
    peer = FakePeer("node-a")
    server = TunnelServer(lookup or (lambda model: local))
    server.handle(peer)
    (splice,) = server.splices or [None]
    return peer, splice, local


# -- the host's side ------------------------------------------------------------------------


def test_host_answers_ok_and_splices_to_the_local_llama_server():
    peer, splice, local = host()
    peer.feed(tunnel_frame({"model": "m1"}) + b"POST /v1/x HTTP/1.1\r\n")
    (ok,) = frames(peer.sent())
    assert ok.type == FrameType.TUNNEL and ok.json() == {"ok": True}
    (proto,) = local.protocols
    assert proto.transport.value() == b"POST /v1/x HTTP/1.1\r\n"  # what came with the header
    peer.feed(b"more")
    assert proto.transport.value().endswith(b"more")
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert peer.sent() == b"HTTP/1.1 200 OK\r\n"
    assert splice.state == HostSplice.OPEN


def test_host_registers_each_side_as_the_producer_of_the_other():
    peer, _, local = host()
    peer.feed(tunnel_frame({"model": "m1"}))
    (proto,) = local.protocols
    # the tunnel's socket is full: stop reading llama-server
    assert peer.transport.producer is proto.transport
    peer.transport.producer.pauseProducing()
    assert proto.transport.producerState == "paused"
    # llama-server's socket is full: stop reading the tunnel
    assert proto.transport.producer is peer.transport
    proto.transport.producer.pauseProducing()
    assert peer.transport.producerState == "paused"


def test_host_refuses_a_model_it_does_not_serve_before_any_http_byte():
    def lookup(model):
        raise TunnelRefused(f"this node does not serve {model}")

    peer, splice, local = host(lookup)
    peer.feed(tunnel_frame({"model": "other"}) + b"POST / HTTP/1.1\r\n")
    (answer,) = frames(peer.sent())
    assert answer.json() == {"error": "this node does not serve other"}
    assert peer.transport.disconnecting
    assert local.protocols == []


@pytest.mark.parametrize("header", [
    wire.encode_json(FrameType.ANNOUNCE, {"model": "m1"}),
    tunnel_frame({"no": "model"}),
    wire.encode(FrameType.TUNNEL, b"not json"),
    b"\x00\x00\x00\x00garbage",
])
def test_host_refuses_a_bad_header(header):
    peer, _, local = host()
    peer.feed(header)
    (answer,) = frames(peer.sent())
    assert "bad tunnel header" in answer.json()["error"]
    assert peer.transport.disconnecting and local.protocols == []


def test_host_waits_for_a_header_split_across_reads():
    peer, _, local = host()
    data = tunnel_frame({"model": "m1"})
    peer.feed(data[:3])
    peer.feed(data[3:7])
    assert peer.sent() == b"" and local.protocols == []
    peer.feed(data[7:])
    assert frames(peer.sent())[0].json() == {"ok": True}


def test_host_holds_bytes_while_connecting_and_pauses_the_peer_past_the_limit():
    local = LocalEndpoint(fire=False)
    peer, splice, _ = host(local=local)
    peer.feed(tunnel_frame({"model": "m1"}))
    assert splice.state == HostSplice.CONNECTING
    peer.feed(b"x" * (HOLD_WHILE_CONNECTING_BYTES + 1))
    assert peer.transport.producerState == "paused"
    proto = local.finish()
    assert frames(peer.sent())[0].json() == {"ok": True}
    assert proto.transport.value() == b"x" * (HOLD_WHILE_CONNECTING_BYTES + 1)
    assert peer.transport.producerState == "producing"


def test_host_answers_an_error_when_the_local_llama_server_is_unreachable():
    class Refusing:
        def connect(self, factory):
            return defer.fail(ConnectionRefusedError("refused"))

    peer, _, _ = host(lambda model: Refusing())
    peer.feed(tunnel_frame({"model": "m1"}))
    (answer,) = frames(peer.sent())
    assert "cannot reach this node's llama-server for m1" in answer.json()["error"]
    assert peer.transport.disconnecting


def test_llama_server_closing_closes_the_tunnel():
    peer, splice, local = host()
    peer.feed(tunnel_frame({"model": "m1"}))
    (proto,) = local.protocols
    proto.connectionLost(Failure(ConnectionError("closed")))
    assert peer.transport.disconnecting and peer.transport.producer is None
    assert splice.state == HostSplice.CLOSED


def test_the_tunnel_closing_closes_the_llama_server_connection():
    server = TunnelServer(lambda model: LocalEndpoint())
    peer = FakePeer()
    local = LocalEndpoint()
    server.lookup = lambda model: local
    server.handle(peer)
    peer.feed(tunnel_frame({"model": "m1"}))
    (proto,) = local.protocols
    peer.lost()
    assert proto.transport.disconnecting and proto.transport.producer is None
    assert server.splices == set()


def test_the_tunnel_closing_while_connecting_cancels_the_local_connect():
    local = LocalEndpoint(fire=False)
    peer, splice, _ = host(local=local)
    peer.feed(tunnel_frame({"model": "m1"}))
    peer.lost()
    (d, _), = local.pending
    assert d.called  # cancelled: the endpoint aborts the half-made connection
    assert splice.state == HostSplice.CLOSED


# -- the requesting side -----------------------------------------------------------------------


class FakeMesh:
    def __init__(self):
        self.dials: list[tuple[str, str, defer.Deferred]] = []
        self.unreachable: list[tuple[str, str]] = []

    def connect_peer(self, node_id: str, purpose: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.dials.append((node_id, purpose, d))
        return d

    def peer_unreachable(self, node_id: str, reason: str) -> None:
        self.unreachable.append((node_id, reason))


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data):  # noqa: N802
        self.data += data

    def connectionLost(self, reason=None):  # noqa: N802
        self.lost.append(reason)


def open_client(mesh: FakeMesh | None = None):
    mesh = mesh or FakeMesh()
    ep = TunnelEndpoint(mesh, "node-b", "m2")
    results: list[Any] = []
    d = ep.connect(Factory.forProtocol(Recorder))
    d.addBoth(results.append)
    return mesh, d, results


def test_client_dials_for_http_and_names_the_model():
    mesh, _, results = open_client()
    (node_id, purpose, dial) = mesh.dials[0]
    assert (node_id, purpose) == ("node-b", "http")
    peer = FakePeer("node-b")
    dial.callback(peer)
    (frame,) = frames(peer.sent())
    assert frame.type == FrameType.TUNNEL and frame.json() == {"model": "m2"}
    assert results == []  # not until the host said ok


def test_client_hands_the_protocol_a_tunnel_transport_once_the_host_says_ok():
    mesh, _, results = open_client()
    peer = FakePeer("node-b")
    mesh.dials[0][2].callback(peer)
    peer.sent()
    peer.feed(tunnel_frame({"ok": True}) + b"HTTP/1.1 200")
    (proto,) = results
    assert isinstance(proto, Recorder) and isinstance(proto.transport, TunnelTransport)
    assert proto.data == b"HTTP/1.1 200"
    proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    assert peer.sent() == b"GET / HTTP/1.1\r\n\r\n"
    proto.transport.pauseProducing()
    assert peer.transport.producerState == "paused"
    proto.transport.resumeProducing()
    assert peer.transport.producerState == "producing"
    peer.lost()
    assert len(proto.lost) == 1
    assert mesh.unreachable == []


def test_client_fails_over_without_suspicion_when_the_host_refuses():
    mesh, _, results = open_client()
    peer = FakePeer("node-b")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"error": "this node does not serve m2"}))
    (failure,) = results
    assert failure.check(TunnelRefused)
    assert "does not serve m2" in str(failure.value)
    assert mesh.unreachable == []
    assert peer.transport.disconnecting
    peer.lost()  # the close that follows changes nothing
    assert mesh.unreachable == []


def test_client_suspects_the_peer_when_the_tunnel_cannot_open():
    mesh, _, results = open_client()
    mesh.dials[0][2].errback(Failure(ConnectionRefusedError("connection refused")))
    (failure,) = results
    assert failure.check(TunnelFailed)
    assert [n for n, _ in mesh.unreachable] == ["node-b"]


def test_client_suspects_the_peer_when_it_closes_before_answering():
    mesh, _, results = open_client()
    peer = FakePeer("node-b")
    mesh.dials[0][2].callback(peer)
    peer.lost("connection lost")
    (failure,) = results
    assert failure.check(TunnelFailed)
    assert "before answering" in str(failure.value)
    assert [n for n, _ in mesh.unreachable] == ["node-b"]


def test_client_cancelled_by_its_connect_timeout_drops_the_attempt_and_suspects_the_peer():
    mesh, d, results = open_client()
    peer = FakePeer("node-b")
    mesh.dials[0][2].callback(peer)
    d.cancel()
    (failure,) = results
    assert failure.check(defer.CancelledError)
    assert peer.close_reasons and [n for n, _ in mesh.unreachable] == ["node-b"]


def test_client_cancelled_before_the_dial_finished_closes_the_late_connection():
    mesh, d, results = open_client()
    d.cancel()
    peer = FakePeer("node-b")
    mesh.dials[0][2].callback(peer)
    assert peer.close_reasons == ["tunnel no longer wanted"]


# -- both sides together, with the API's HTTP client ------------------------------------------------


class Sink:
    def __init__(self):
        self.events: list[tuple] = []

    def response_head(self, status, headers, length):
        self.events.append(("head", status))

    def response_data(self, data):
        self.events.append(("data", data))

    def response_end(self):
        self.events.append(("end",))

    def response_failed(self, reason, started):
        self.events.append(("failed", started))


def pump(a: FakePeer, b: FakePeer) -> None:
    """Deliver what each side wrote to the other until both are quiet (bounded)."""
    for _ in range(20):
        da, db = a.sent(), b.sent()
        if not da and not db:
            return
        if da:
            b.feed(da)
        if db:
            a.feed(db)
    raise AssertionError("the two sides never went quiet")


def test_an_sse_stream_crosses_the_tunnel_chunk_by_chunk_with_keep_alive():
    local = LocalEndpoint()
    server = TunnelServer(lambda model: local)
    client_peer, host_peer = FakePeer("node-b"), FakePeer("node-a")
    mesh = FakeMesh()
    up = Upstream(name="node-b", endpoint=lambda: TunnelEndpoint(mesh, "node-b", "m2"),
                  pool_key="tunnel:node-b:m2")
    conn = UpstreamConnection(up, ConnectionPool(Clock()))
    got: list[Any] = []
    up.endpoint().connect(_Fixed(conn)).addBoth(got.append)
    mesh.dials[0][2].callback(client_peer)
    server.handle(host_peer)
    pump(client_peer, host_peer)
    assert got == [conn]
    (llama,) = local.protocols
    for _exchange in range(2):  # two exchanges over one tunnel: keep-alive
        sink = Sink()
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n", b"{}", sink)
        pump(client_peer, host_peer)
        assert llama.transport.value().endswith(b"\r\n\r\n{}")
        llama.transport.clear()
        llama.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        pump(client_peer, host_peer)
        for n in range(3):
            llama.dataReceived(b"9\r\ndata: t%d\n\r\n" % n)
            pump(client_peer, host_peer)
            assert sink.events[-1] == ("data", b"data: t%d\n" % n)  # one chunk, as it came
        llama.dataReceived(b"0\r\n\r\n")
        pump(client_peer, host_peer)
        assert sink.events[0] == ("head", 200) and sink.events[-1] == ("end",)
    # the API's client stops reading: the tunnel's socket is paused
    conn.send(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"", Sink())
    conn.pauseProducing()
    assert client_peer.transport.producerState == "paused"


class _Fixed(Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):  # noqa: N802
        return self.proto
