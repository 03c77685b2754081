"""``meshd.sendnow``: a write sent at once when nothing is queued, queued otherwise."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from meshd import sendnow


class Collect(Protocol):
    """The far end: what arrived, and a Deferred for the first ``n`` bytes."""

    def __init__(self) -> None:
        self.data = b""
        self._want: tuple[int, defer.Deferred] | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        self._check()

    def until(self, n: int) -> defer.Deferred:
        self._want = (n, defer.Deferred())
        d = self._want[1]
        self._check()
        return d

    def _check(self) -> None:
        if self._want is not None and len(self.data) >= self._want[0]:
            _, d = self._want
            self._want = None
            d.callback(self.data)


@pytest_twisted.async_yield_fixture
async def pair():
    """A client's TCP transport and the far end's Collect, closed after the test."""
    server = Collect()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                                   Protocol())
    yield client.transport, server
    client.transport.loseConnection()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_write_with_nothing_queued_leaves_at_once_and_the_socket_is_not_watched(pair):
    transport, server = pair
    sendnow.write(transport, b"hello")
    # sent by send() now: nothing queued, and the reactor was not asked to watch for writing
    assert transport.dataBuffer == b"" and not transport._tempDataBuffer
    assert transport not in reactor.getWriters()
    assert await server.until(5) == b"hello"


@pytest_twisted.ensureDeferred
async def test_a_write_behind_queued_bytes_is_queued_after_them(pair):
    transport, server = pair
    transport.write(b"first ")  # queued by Twisted until the reactor's next turn
    sendnow.write(transport, b"second")
    assert transport._tempDataBuffer == [b"first ", b"second"]
    assert await server.until(12) == b"first second"


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_and_follows(pair):
    transport, server = pair
    big = bytes(range(256)) * 40_000  # 10 MB: more than a loopback socket's buffer
    sendnow.write(transport, big)
    assert 0 < transport._tempDataLen < len(big)
    assert await server.until(len(big)) == big


@pytest_twisted.ensureDeferred
async def test_unsent_counts_what_the_socket_has_not_taken(pair):
    transport, server = pair
    assert sendnow.unsent(transport) == 0
    big = b"z" * 10_000_000
    sendnow.write(transport, big)
    assert 0 < sendnow.unsent(transport) < len(big)
    await server.until(len(big))
    assert sendnow.unsent(transport) == 0
    assert sendnow.unsent(StringTransport()) == 0


def test_a_transport_that_is_not_plain_tcp_gets_an_ordinary_write():
    t = StringTransport()
    sendnow.write(t, b"through the tunnel's TLS")
    assert t.value() == b"through the tunnel's TLS"


@pytest_twisted.ensureDeferred
async def test_an_http_doors_connections_send_without_nagles_delay_and_heads_go_at_once():
    # BoundedChannel writes a head, then the first chunk, in separate sends: with Nagle's
    # algorithm on, the chunk waited for the client's ACK of the head
    import socket

    import treq
    from twisted.web import resource

    from meshd.httpbounds import BoundedSite

    seen: dict[str, object] = {}

    class Probe(resource.Resource):
        isLeaf = True

        def render_GET(self, request):  # noqa: N802
            t = request.channel.transport
            seen["nodelay"] = t.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            request.write(b"x")  # the head and this chunk leave now, queued behind nothing
            seen["queued"] = len(t.dataBuffer) + t._tempDataLen
            request.finish()
            return b""

    site = BoundedSite(Probe(), max_body_bytes=1024, error_body=lambda *a: b"{}", what="test")
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        r = await treq.get(f"http://127.0.0.1:{port.getHost().port}/", persistent=False)
        assert await r.content() == b"x"
    finally:
        await port.stopListening()
    assert seen == {"nodelay": 1, "queued": 0}


@pytest_twisted.ensureDeferred
async def test_a_connection_with_tls_begun_on_it_is_never_written_past_its_tls(pair):
    transport, server = pair
    transport.TLS = True  # as startTLS leaves it: tcp.Connection.write then encrypts
    written: list[bytes] = []
    transport.write = written.append  # the TLS layer's write, for this test
    try:
        sendnow.write(transport, b"secret")
        assert written == [b"secret"] and server.data == b""
    finally:
        del transport.write
        transport.TLS = False


@pytest_twisted.ensureDeferred
async def test_a_peer_connections_tls_records_leave_at_once():
    # peer connections and tunnels: each write is a record that goes to send() at once,
    # not to a timer for the next turn and then to the TCP transport's queue (a watch,
    # a turn, a send, an unwatch: every token of a tunnel)
    import socket

    from meshd.mesh import identity
    from meshd.mesh.peer import TLSOptions, _TLSClientEndpoint

    server = Collect()
    port = reactor.listenTCP(
        0, sendnow.TLSFactory(TLSOptions(identity.ephemeral()), False,
                              Factory.forProtocol(lambda: server)), interface="127.0.0.1")
    try:
        endpoint = _TLSClientEndpoint(TLSOptions(identity.ephemeral()),
                                      TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        tls = client.transport
        assert isinstance(tls, sendnow.TLSTransport)
        tls.write(b"hello")
        assert await server.until(5) == b"hello"  # the handshake is done
        tcp = tls.transport
        # both ends without Nagle's algorithm: a record sent at once must not wait for
        # the ACK of the one before (a foreign HELLO took 40 ms more with it)
        for end in (tcp, server.transport.transport):
            assert end.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        tls.write(b"x" * 100)
        tls.write(b"y" * 100)
        # each write a record sent now: nothing waits for the next turn, no timer for it
        assert tcp.dataBuffer == b"" and not tcp._tempDataBuffer
        assert tcp not in reactor.getWriters()
        assert not [c for c in reactor.getDelayedCalls() if c.func.__name__ == "_scheduledFlush"]
        assert await server.until(205) == b"hello" + b"x" * 100 + b"y" * 100
        tls.loseConnection()
    finally:
        await port.stopListening()


def test_the_tls_method_replaced_is_still_twisteds():
    # sendnow.TLSTransport replaces this private method of Twisted's TLS protocol: an
    # upgrade that renames or drops it must fail here, not silently stop sending at once
    import inspect

    from twisted.protocols.tls import (
        BufferingTLSTransport,
        TLSMemoryBIOFactory,
        TLSMemoryBIOProtocol,
    )

    source = inspect.getsource(TLSMemoryBIOProtocol._flushSendBIO)
    assert "bio_read(2**15)" in source and "self.transport.write(bytes)" in source
    # Twisted's default gathers a turn's writes; meshd's is the unbuffered protocol
    assert TLSMemoryBIOFactory.protocol is BufferingTLSTransport
    assert not issubclass(sendnow.TLSTransport, BufferingTLSTransport)
    assert issubclass(sendnow.TLSTransport, TLSMemoryBIOProtocol)
