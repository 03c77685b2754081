"""The HTTP tunnel with in-memory transports: the TUNNEL exchange and refusal, the host's
tunnel API carrying exchange after exchange while llama-server closes after each,
backpressure both ways, closing together, and what a failed open does (suspect the peer,
or just fail over).

A ``FakePeer`` stands in for an authenticated ``meshd.mesh.peer.PeerProtocol`` after
OPEN (``take_over``, ``closed``, a transport); two of them are joined by
``pump`` so the requesting side and the host side talk to each other.  The fake
llama-server is a ``StringTransport`` per connection.  No socket; time is a ``Clock``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from meshd.config import ApiConfig
from meshd.mesh import wire
from meshd.mesh.wire import FrameType
from meshd.serving.api import ApiServer
from meshd.serving.proxy import ConnectionPool, UpstreamConnection
from meshd.serving.routing import NotReady, Upstream
from meshd.serving.tunnel import (
    HostTunnel,
    TunnelEndpoint,
    TunnelFailed,
    TunnelRefused,
    TunnelServer,
    TunnelTransport,
)


class FakePeer:
    """An open peer connection after authentication: bytes in via ``feed``, out on ``transport``."""

    def __init__(self, node_id: str = "node-b"):
        self.node_id = node_id
        self.transport = StringTransport()
        self.closed: defer.Deferred[str] = defer.Deferred()
        self._raw = None
        self.close_reasons: list[str] = []
        self.ended_by_peer = False

    def take_over(self, receiver) -> None:
        self._raw = receiver

    def feed(self, data: bytes) -> None:
        assert self._raw is not None, "nobody took the connection over"
        self._raw(data)

    def close(self, reason: str, *, notify: bool = True, abort: bool = False) -> None:
        self.close_reasons.append(reason)
        self.transport.loseConnection()

    def lost(self, reason: str = "connection closed by the peer", *, by_peer: bool = True) -> None:
        """The connection ended: cleanly by the other end (``by_peer``), or lost here."""
        self.ended_by_peer = by_peer
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


class LocalRouter:
    """The host's ``LocalOnlyRouter`` stand-in: ``served`` models go to the fake llama-server."""

    def __init__(self, local: LocalEndpoint, served=("m1",)):
        self.local = local
        self.served = set(served)
        self.upstream = Upstream(name="local", endpoint=lambda: self.local, pool_key="local:m1")

    def check(self, model: str) -> None:
        if model not in self.served:
            raise TunnelRefused(f"this node does not serve {model}")

    def models(self):
        return []

    def upstreams(self, model, client_id):
        if model not in self.served:
            raise NotReady(model, "this node does not serve it")
        return [self.upstream]

    def upstream_failed(self, upstream, reason):
        pass

    def request_started(self, upstream):
        pass

    def request_finished(self, upstream):
        pass


def tunnel_server(local: LocalEndpoint | None = None, served=("m1",)):
    local = local or LocalEndpoint()
    router = LocalRouter(local, served)
    api = ApiServer(router, ApiConfig(), reactor=Clock(), relay=True)
    return TunnelServer(router.check, api), local, router


def host(*, served=("m1",)) -> tuple[FakePeer, HostTunnel, LocalEndpoint, TunnelServer]:
    server, local, _ = tunnel_server(served=served)
    peer = FakePeer("node-a")
    server.handle(peer)
    (tunnel,) = server.tunnels
    return peer, tunnel, local, server


def http_request(model: str = "m1", stream: bool = True) -> bytes:
    body = json.dumps({"model": model, "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def sse_chunk(n: int) -> bytes:
    return b"9\r\ndata: t%d\n\r\n" % n


def llama_answers_and_closes(llama: Protocol, chunks: int = 2) -> None:
    """What llama-server does with a streamed request: answer, then close the connection."""
    llama.dataReceived(SSE_HEAD + b"".join(sse_chunk(n) for n in range(chunks)) + b"0\r\n\r\n")
    llama.connectionLost(Failure(ConnectionDone()))


# -- the host's side ------------------------------------------------------------------------


def test_host_answers_ok_and_serves_the_tunnel_with_its_tunnel_api():
    peer, tunnel, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    (ok,) = frames(peer.sent())  # the ok, and not a byte more yet
    assert ok.type == FrameType.TUNNEL and ok.json() == {"ok": True}
    assert tunnel.state == HostTunnel.OPEN and server.opened == 1
    (llama,) = local.protocols
    sent = llama.transport.value()
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert sent.endswith(b'{"model": "m1", "stream": true}')
    llama.dataReceived(SSE_HEAD + sse_chunk(0))
    out = peer.sent()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: t0\n" in out
    assert b"text/event-stream" in out


def test_host_refuses_a_model_it_does_not_serve_before_any_http_byte():
    peer, tunnel, local, server = host(served=())
    peer.feed(tunnel_frame({"model": "other"}) + http_request("other"))
    (answer,) = frames(peer.sent())
    assert answer.json() == {"error": "this node does not serve other"}
    assert peer.transport.disconnecting
    assert local.protocols == [] and server.tunnels == set() and server.opened == 0


def test_host_refuses_new_tunnels_while_draining():
    server, local, _ = tunnel_server()
    server.drain(5)
    peer = FakePeer("node-a")
    server.handle(peer)
    peer.feed(tunnel_frame({"model": "m1"}))
    (answer,) = frames(peer.sent())
    assert answer.json() == {"error": "this node is stopping"}
    assert peer.transport.disconnecting


@pytest.mark.parametrize("header", [
    wire.encode_json(FrameType.ANNOUNCE, {"model": "m1"}),
    tunnel_frame({"no": "model"}),
    wire.encode(FrameType.TUNNEL, b"not json"),
    b"\x00\x00\x00\x00garbage",
])
def test_host_refuses_a_bad_header(header):
    peer, _, local, _ = host()
    peer.feed(header)
    (answer,) = frames(peer.sent())
    assert "bad tunnel header" in answer.json()["error"]
    assert peer.transport.disconnecting and local.protocols == []


def test_host_waits_for_a_header_split_across_reads():
    peer, _, local, _ = host()
    data = tunnel_frame({"model": "m1"})
    peer.feed(data[:3])
    peer.feed(data[3:7])
    assert peer.sent() == b"" and local.protocols == []
    peer.feed(data[7:])
    assert frames(peer.sent())[0].json() == {"ok": True}


def test_a_tunnel_carries_exchange_after_exchange_while_llama_server_closes_after_each():
    peer, tunnel, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}))
    peer.sent()
    for n in range(2):
        peer.feed(http_request())
        llama = local.protocols[n]  # a fresh connection each time: the last one was closed
        llama_answers_and_closes(llama)
        out = peer.sent()
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"0\r\n\r\n")
        assert b"connection: close" not in out.lower()  # the tunnel stays open: keep-alive
        assert not peer.transport.disconnecting and tunnel.state == HostTunnel.OPEN
    assert len(local.protocols) == 2 and server.opened == 1


def test_tunnel_socket_full_pauses_the_read_of_llama_server():
    peer, _, local, _ = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    (llama,) = local.protocols
    llama.dataReceived(SSE_HEAD + sse_chunk(0))
    # the TLS transport's buffer is full: it pauses the producer registered on it
    peer.transport.producer.pauseProducing()
    assert llama.transport.producerState == "paused"
    peer.transport.producer.resumeProducing()
    assert llama.transport.producerState == "producing"


def test_a_busy_host_stops_reading_the_tunnel_socket():
    peer, _, local, _ = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    assert peer.transport.producerState == "producing"
    # a request is in flight and the requester keeps sending: stop reading the tunnel
    peer.feed(b"x" * (64 * 1024))
    assert peer.transport.producerState == "paused"


def test_a_request_for_a_model_no_longer_served_hangs_up_unanswered():
    peer, _, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}))
    peer.sent()
    server.api.router.served.clear()  # the model was stopped meanwhile
    peer.feed(http_request())
    assert peer.sent() == b""  # no 503 to relay: the requester retries on a fresh tunnel
    assert peer.transport.disconnecting and local.protocols == []


def test_an_unreachable_llama_server_hangs_up_unanswered():
    class Refusing:
        def connect(self, factory):
            return defer.fail(ConnectionRefusedError("refused"))

    peer, _, _, server = host()
    server.api.router.local = Refusing()
    peer.feed(tunnel_frame({"model": "m1"}))
    peer.sent()
    peer.feed(http_request())
    assert peer.sent() == b"" and peer.transport.disconnecting


def test_llama_server_failing_mid_stream_ends_the_stream_with_an_error_and_the_tunnel():
    peer, _, local, _ = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    (llama,) = local.protocols
    llama.dataReceived(SSE_HEAD + sse_chunk(0))
    llama.connectionLost(Failure(ConnectionDone()))
    out = peer.sent()
    assert b"event: error" in out and out.endswith(b"0\r\n\r\n")
    assert peer.transport.disconnecting


def test_the_tunnel_closing_closes_the_llama_server_connection():
    peer, tunnel, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    (llama,) = local.protocols
    llama.dataReceived(SSE_HEAD + sse_chunk(0))
    peer.lost("connection lost", by_peer=False)
    assert llama.transport.disconnecting
    assert tunnel.state == HostTunnel.CLOSED and server.tunnels == set()
    assert server.api.in_flight == 0


def test_closing_every_tunnel_aborts_them():
    peer, _, _, server = host()
    peer.feed(tunnel_frame({"model": "m1"}))
    server.close_all()
    assert peer.transport.disconnecting


def idle_tunnel() -> tuple[FakePeer, TunnelServer]:
    """A host tunnel whose exchange has ended: the answer was written, nothing runs."""
    peer, _, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    llama_answers_and_closes(local.protocols[0])
    assert peer.sent().endswith(b"0\r\n\r\n")
    return peer, server


def test_a_stopping_host_closes_an_idle_tunnel_once_its_writes_have_left():
    peer, server = idle_tunnel()
    clock = Clock()
    done = server.finish_all(clock, grace_s=2.0)
    # a close that lets the TLS layer flush and send its close_notify: not an abort,
    # which would drop the end of the answer just written
    assert peer.transport.disconnecting and not peer.transport.disconnected
    assert not done.called
    peer.lost()
    assert done.called and server.tunnels == set()
    clock.advance(5)
    assert not peer.transport.disconnected  # the grace timer was cancelled


def test_a_stopping_host_aborts_an_idle_tunnel_whose_writes_do_not_leave():
    peer, server = idle_tunnel()
    clock = Clock()
    done = server.finish_all(clock, grace_s=2.0)
    clock.advance(1.9)
    assert not peer.transport.disconnected
    clock.advance(0.2)  # the peer stopped reading: its buffer never drains
    assert peer.transport.disconnected
    peer.lost("connection lost", by_peer=False)
    assert done.called


def test_a_stopping_host_aborts_a_tunnel_with_a_request_still_running():
    peer, _, local, server = host()
    peer.feed(tunnel_frame({"model": "m1"}) + http_request())
    local.protocols[0].dataReceived(SSE_HEAD + sse_chunk(0))  # the drain ran out meanwhile
    done = server.finish_all(Clock(), grace_s=2.0)
    assert peer.transport.disconnected and done.called


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
    peer.lost("connection lost", by_peer=False)
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

    def read_begins(self):
        pass

    def read_ends(self):
        pass

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
    server, local, _ = tunnel_server()
    client_peer, host_peer = FakePeer("node-b"), FakePeer("node-a")
    mesh = FakeMesh()
    up = Upstream(name="node-b", endpoint=lambda: TunnelEndpoint(mesh, "node-b", "m1"),
                  pool_key="tunnel:node-b:m1")
    conn = UpstreamConnection(up, ConnectionPool(Clock()))
    got: list[Any] = []
    up.endpoint().connect(_Fixed(conn)).addBoth(got.append)
    mesh.dials[0][2].callback(client_peer)
    server.handle(host_peer)
    pump(client_peer, host_peer)
    assert got == [conn]
    head, _, body = http_request().partition(b"\r\n\r\n")
    for exchange in range(2):  # two exchanges over one tunnel: keep-alive
        sink = Sink()
        conn.send(head + b"\r\n\r\n", body, sink)
        pump(client_peer, host_peer)
        llama = local.protocols[exchange]
        assert llama.transport.value().endswith(body)
        llama.dataReceived(SSE_HEAD)
        pump(client_peer, host_peer)
        for n in range(3):
            llama.dataReceived(sse_chunk(n))
            pump(client_peer, host_peer)
            assert sink.events[-1] == ("data", b"data: t%d\n" % n)  # one chunk, as it came
        llama.dataReceived(b"0\r\n\r\n")
        llama.connectionLost(Failure(ConnectionDone()))  # llama-server closes after a stream
        pump(client_peer, host_peer)
        assert sink.events[0] == ("head", 200) and sink.events[-1] == ("end",)
        assert conn.reusable and not client_peer.transport.disconnecting
    assert server.opened == 1 and len(mesh.dials) == 1
    # the API's client stops reading: the tunnel's socket is paused
    conn.send(head + b"\r\n\r\n", body, Sink())
    conn.pauseProducing()
    assert client_peer.transport.producerState == "paused"


class TunnelRouter:
    """The requesting node's router: ``m1`` lives on node-b, through a tunnel."""

    def __init__(self, mesh: FakeMesh):
        self.upstream = Upstream(name="node-b", pool_key="tunnel:node-b:m1",
                                 endpoint=lambda: TunnelEndpoint(mesh, "node-b", "m1"))
        self.failed: list[str] = []

    def models(self):
        return []

    def upstreams(self, model, client_id):
        return [self.upstream]

    def upstream_failed(self, upstream, reason):
        self.failed.append(reason)  # the API would try the next host now

    def request_started(self, upstream):
        pass

    def request_finished(self, upstream):
        pass


def test_streamed_requests_through_the_requesting_nodes_api_reuse_one_tunnel():
    server, local, _ = tunnel_server()
    mesh = FakeMesh()
    a_router = TunnelRouter(mesh)
    api = ApiServer(a_router, ApiConfig(), reactor=Clock())
    client_peer, host_peer = FakePeer("node-b"), FakePeer("node-a")
    for n in range(2):
        client = api.site.buildProtocol(None)
        client.makeConnection(StringTransport())
        client.dataReceived(http_request())
        if n == 0:
            mesh.dials[0][2].callback(client_peer)
            server.handle(host_peer)
        pump(client_peer, host_peer)
        llama_answers_and_closes(local.protocols[n], chunks=3)
        pump(client_peer, host_peer)
        out = client.transport.value()
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: t2\n" in out
        assert out.endswith(b"0\r\n\r\n") and api.in_flight == 0
    # two streamed requests, two llama-server connections, ONE tunnel
    assert len(mesh.dials) == 1 and server.opened == 1 and len(local.protocols) == 2
    assert api.pool.idle_count("tunnel:node-b:m1") == 1 and a_router.failed == []


def test_a_stale_pooled_tunnel_is_retried_on_a_fresh_one():
    server, local, router = tunnel_server()
    mesh = FakeMesh()
    a_router = TunnelRouter(mesh)
    api = ApiServer(a_router, ApiConfig(), reactor=Clock())
    first = (FakePeer("node-b"), FakePeer("node-a"))
    client = api.site.buildProtocol(None)
    client.makeConnection(StringTransport())
    client.dataReceived(http_request())
    mesh.dials[0][2].callback(first[0])
    server.handle(first[1])
    pump(*first)
    llama_answers_and_closes(local.protocols[0])
    pump(*first)
    # the host stopped serving m1: the pooled tunnel's next request is not answered
    router.served.clear()
    client = api.site.buildProtocol(None)
    client.makeConnection(StringTransport())
    client.dataReceived(http_request())
    pump(*first)
    assert first[1].transport.disconnecting
    first[1].lost()
    first[0].lost()
    # A's pool retries on a fresh tunnel, which the host refuses: a failover, no suspicion
    second = (FakePeer("node-b"), FakePeer("node-a"))
    mesh.dials[1][2].callback(second[0])
    server.handle(second[1])
    pump(*second)
    (reason,) = a_router.failed
    assert "refused a tunnel for m1" in reason and mesh.unreachable == []
    assert len(local.protocols) == 1  # the request never reached a llama-server again


class _Fixed(Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):  # noqa: N802
        return self.proto
