"""Per-source penalties on the mesh port (meshd.mesh.penalties), on a Clock, and the
mesh port's factory with them, in memory (TLS included, via iosim)."""

import logging

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from meshd.mesh import peer
from meshd.mesh.penalties import Penalties
from tests.mesh.test_peer import MESH, SECRET, Gate, Recorder

A, B = "192.0.2.1", "192.0.2.2"


def test_a_source_is_refused_once_its_attempts_are_used_and_gets_one_back_per_refill():
    clock = Clock()
    p = Penalties(clock, failures=3, refill_s=2.0)
    for _ in range(2):
        p.failed(A, "bad")
        assert not p.refuses(A)
    p.failed(A, "bad")
    assert p.refuses(A) and p.refuses(A)
    assert p.refused_total == 2
    assert not p.refuses(B), "another address is not penalised"
    clock.advance(1.9)
    assert p.refuses(A)
    clock.advance(0.1)
    assert not p.refuses(A), "one attempt back after refill_s"
    p.failed(A, "bad")  # and it failed again: refused for another refill_s
    assert p.refuses(A)
    clock.advance(2.0)
    assert not p.refuses(A)


def test_a_source_paid_back_in_full_is_forgotten():
    clock = Clock()
    p = Penalties(clock, failures=3, refill_s=1.0)
    p.failed(A, "bad")
    assert p.sources() == 1
    clock.advance(0.99)
    assert not p.refuses(A) and p.sources() == 1
    clock.advance(0.01)
    assert p.sources() == 0, "paid back, even before its next connection"
    assert not p.refuses(A)


def test_failures_spread_out_slower_than_the_refill_are_never_refused():
    clock = Clock()
    p = Penalties(clock, failures=2, refill_s=1.0)
    for _ in range(20):  # a misconfigured member redialling every second and failing
        p.failed(A, "bad")
        assert not p.refuses(A)
        clock.advance(1.0)


def test_zero_failures_turns_penalties_off():
    p = Penalties(Clock(), failures=0, refill_s=1.0)
    for _ in range(100):
        p.failed(A, "bad")
    assert not p.refuses(A) and p.sources() == 0 and not p.enabled


def test_the_table_is_bounded_and_drops_the_source_touched_longest_ago():
    clock = Clock()
    p = Penalties(clock, failures=1, refill_s=60.0, max_sources=3)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        p.failed(host, "bad")
    p.failed("10.0.0.1", "bad")  # touched again: now the newest
    p.failed("10.0.0.4", "bad")
    assert p.sources() == 3
    assert not p.refuses("10.0.0.2"), "the oldest entry went"
    assert p.refuses("10.0.0.1") and p.refuses("10.0.0.3") and p.refuses("10.0.0.4")


def test_running_out_is_logged_once_until_the_source_is_paid_back(caplog):
    clock = Clock()
    p = Penalties(clock, failures=2, refill_s=1.0)
    with caplog.at_level(logging.WARNING, logger="meshd.mesh.penalties"):
        p.failed(A, "TLS handshake failed: x")
        p.failed(A, "TLS handshake failed: x")  # ran out
        for _ in range(10):
            assert p.refuses(A)
            clock.advance(1.0)  # an attempt back, used at once
            p.failed(A, "TLS handshake failed: y")
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines
        assert A in lines[0] and "TLS handshake failed: x" in lines[0]
        assert "[mesh] penalty_s" in lines[0]
        clock.advance(2.0)  # paid back in full
        p.failed(A, "again")
        p.failed(A, "again")
        assert len(caplog.records) == 2


# -- the mesh port's factory ---------------------------------------------------------------


def _dial(server_factory, client_id, auth, clock, host=A):
    """One in-memory connection from ``host``; (client, built server or None)."""
    built = {}

    def build_client():
        built["c"] = peer.PeerProtocol(identity=client_id, incarnation=lambda: 1,
                                       delegate=Recorder(), clock=clock, timing=peer.Timing(),
                                       client=auth)
        return built["c"]

    server = server_factory.buildProtocol(IPv4Address("TCP", host, 40000))
    if server is None:
        return None, None
    built["s"] = server.wrappedProtocol  # TLS lets go of it once closed
    cf = TLSMemoryBIOFactory(peer.TLSOptions(client_id), True, peer.PeerFactory(build_client),
                             clock)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: server, lambda: cf.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7842)),
        clock=clock)
    pump.flush()
    return built["c"], built["s"]


def _server(server_id, clock, gate, penalties):
    return peer.server_factory(
        peer.TLSOptions(server_id),
        lambda: peer.PeerProtocol(identity=server_id, incarnation=lambda: 1,
                                  delegate=Recorder(), clock=clock, timing=peer.Timing(),
                                  gate=gate),
        clock, penalties=penalties)


def test_the_mesh_port_refuses_a_source_after_its_failed_attempts_and_not_members(ids):
    a, b, _ = ids
    clock = Clock()
    penalties = Penalties(clock, failures=2, refill_s=30.0)
    factory = _server(b, clock, Gate(), penalties)
    wrong = peer.ClientAuth(MESH, b"w" * 32)
    right = peer.ClientAuth(MESH, SECRET)
    for _ in range(3):  # members that authenticate cost no attempt
        c, s = _dial(factory, a, right, clock)
        assert s.state is peer.PeerState.OPEN and s.proven
        s.close("done")
    for _ in range(2):
        c, s = _dial(factory, a, wrong, clock)
        assert c.state is peer.PeerState.CLOSED and c.close_code is wire_code("auth-failed")
        assert not s.proven
    assert _dial(factory, a, right, clock) == (None, None), "refused before TLS"
    c, s = _dial(factory, a, right, clock, host=B)
    assert s.state is peer.PeerState.OPEN, "another source is not penalised"
    assert penalties.refused_total == 1


def test_a_refusal_after_a_proven_key_costs_no_attempt(ids):
    """A member refused for a reason it may be told (here: its token was used) proved
    a key of this mesh: not a stranger."""
    a, b, _ = ids
    clock = Clock()
    penalties = Penalties(clock, failures=1, refill_s=30.0)
    key = b"k" * 32
    gate = Gate(refuse="token used", refuse_code=wire_code("token-used"), proof_key=key)
    factory = _server(b, clock, gate, penalties)
    for _ in range(3):
        c, s = _dial(factory, a, peer.ClientAuth(MESH, key, token_id="ab" * 8), clock)
        assert c.close_code is wire_code("token-used") and s.proven
    assert penalties.sources() == 0


def test_a_tls_handshake_that_fails_costs_an_attempt(ids):
    _, b, _ = ids
    clock = Clock()
    penalties = Penalties(clock, failures=1, refill_s=30.0)
    factory = _server(b, clock, Gate(), penalties)
    server = factory.buildProtocol(IPv4Address("TCP", A, 40000))
    transport = iosim.FakeTransport(server, isServer=True)
    inner = server.wrappedProtocol
    server.makeConnection(transport)
    server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
    assert transport.disconnecting
    server.connectionLost(Failure(ConnectionError("gone")))
    assert inner.state is peer.PeerState.CLOSED and not inner.proven
    assert factory.buildProtocol(IPv4Address("TCP", A, 40001)) is None


def wire_code(value):
    from meshd.mesh.wire import CloseCode

    return CloseCode(value)
