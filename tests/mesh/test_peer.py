"""One peer connection, in memory (TLS included, via iosim): who gets in and who does not.

Every refusal is checked on both sides: the connection closes before either delegate
sees it open, with the reason logged."""

import datetime
import logging
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from meshd import statedir
from meshd.mesh import identity, peer, wire
from meshd.mesh.wire import FrameType

MESH = "mesh0001"
SECRET = b"s" * 32


class Recorder:
    def __init__(self):
        self.opened, self.frames, self.closed = [], [], []

    def peer_open(self, p):
        self.opened.append(p)

    def peer_frame(self, p, frame):
        self.frames.append(frame)

    def peer_closed(self, p, reason):
        self.closed.append(reason)


class Gate:
    def __init__(self, secret=SECRET, tokens=None, refuse=None,
                 refuse_code=wire.CloseCode.AUTH_FAILED, proof_key=None):
        self.secret, self.tokens, self.refuse = secret, tokens or {}, refuse
        self.refuse_code, self.proof_key = refuse_code, proof_key
        self.authed = []

    def mesh_id(self):
        return MESH

    def key_for(self, hello):
        if self.refuse:
            raise peer.AuthRefused(self.refuse, self.refuse_code, proof_key=self.proof_key)
        if hello.auth == "token":
            if hello.token_id not in self.tokens:
                raise peer.AuthRefused(f"unknown token {hello.token_id}")
            return self.tokens[hello.token_id]
        return self.secret

    def authenticated(self, hello):
        self.authed.append(hello)


@dataclass(frozen=True)
class Liar:
    """An identity that claims a node id its certificate may not back."""

    key: object
    cert: object
    node_id: str


def connect(client_id, server_id, client_auth, gate, clock=None, timing=None):
    timing = timing or peer.Timing()
    clock = clock or Clock()
    cd, sd = Recorder(), Recorder()

    def build(ident, delegate, **kw):
        return peer.PeerProtocol(identity=ident, incarnation=lambda: 1, delegate=delegate,
                                 clock=clock, timing=timing, **kw)

    built = {}

    def keep(name, p):
        built[name] = p
        return p

    cf = TLSMemoryBIOFactory(peer.TLSOptions(client_id), True, peer.PeerFactory(
        lambda: keep("c", build(client_id, cd, client=client_auth))), clock)
    sf = TLSMemoryBIOFactory(peer.TLSOptions(server_id), False, peer.PeerFactory(
        lambda: keep("s", build(server_id, sd, gate=gate))), clock)
    addr = IPv4Address("TCP", "127.0.0.1", 7842)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(addr), lambda: cf.buildProtocol(addr), clock=clock
    )
    pump.flush()
    return built["c"], built["s"], cd, sd, pump, clock


def test_good_pair_authenticates_with_the_mesh_secret(ids):
    a, b, _ = ids
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth(MESH, SECRET, expect_node_id=b.node_id), Gate())
    assert (c.state, s.state) == (peer.PeerState.OPEN, peer.PeerState.OPEN)
    assert c.node_id == b.node_id and s.node_id == a.node_id
    assert (cd.opened, sd.opened) == ([c], [s])


def test_frames_flow_after_open(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    c.send_json(FrameType.ANNOUNCE, {"x": 1})
    pump.flush()
    assert [f.json() for f in sd.frames] == [{"x": 1}]


def test_wrong_secret_is_refused_before_open(ids, caplog):
    a, b, _ = ids
    caplog.set_level(logging.WARNING, "meshd.mesh.peer")
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth(MESH, b"x" * 32), Gate())
    assert s.state is c.state is peer.PeerState.CLOSED
    assert cd.opened == sd.opened == []
    assert "wrong proof of the mesh secret" in s.close_reason
    # the peer proved nothing: it is told no more than that
    assert c.close_reason == "peer closed: authentication failed"
    assert c.close_code is wire.CloseCode.AUTH_FAILED
    assert "wrong proof of the mesh secret" in caplog.text


def test_wrong_pinned_fingerprint_is_refused_by_the_joiner(ids):
    a, b, c_id = ids
    auth = peer.ClientAuth(MESH, SECRET, pin=c_id.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, Gate())
    assert c.state is s.state is peer.PeerState.CLOSED
    assert "not the one the token pins" in c.close_reason
    assert cd.opened == sd.opened == []  # the server never opened: it waits for READY


def test_unexpected_node_answering_is_refused(ids):
    a, b, c_id = ids
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth(MESH, SECRET, expect_node_id=c_id.node_id), Gate())
    assert "but " + b.node_id + " answered" in c.close_reason
    assert cd.opened == sd.opened == []


def test_claiming_another_nodes_id_is_refused(ids):
    a, b, c_id = ids
    liar = Liar(a.key, a.cert, c_id.node_id)
    c, s, cd, sd, _, _ = connect(liar, b, peer.ClientAuth(MESH, SECRET), Gate())
    assert f"claims node id {c_id.node_id}" in s.close_reason
    assert cd.opened == sd.opened == []


def _cert(key, cn, san):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            .sign(key, hashes.SHA256()))


def test_certificate_not_naming_the_claimed_id_is_refused(ids):
    _, b, _ = ids
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(key, "someone", "someone-else")
    real_id = identity.node_id_for(cert)
    c, s, cd, sd, _, _ = connect(Liar(key, cert, real_id), b, peer.ClientAuth(MESH, SECRET), Gate())
    assert "does not name node" in s.close_reason
    assert cd.opened == sd.opened == []


def test_token_join_proves_the_token_key_and_reports_it(ids):
    a, b, _ = ids
    gate = Gate(tokens={"abc123": b"t" * 32})
    auth = peer.ClientAuth(MESH, b"t" * 32, token_id="abc123", pin=b.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, gate)
    assert c.state is s.state is peer.PeerState.OPEN
    assert [h.token_id for h in gate.authed] == ["abc123"]


def test_refused_token_reason_reaches_a_joiner_that_proved_its_key(ids):
    a, b, _ = ids
    gate = Gate(refuse="token abc123 was revoked", refuse_code=wire.CloseCode.TOKEN_REVOKED,
                proof_key=b"t" * 32)
    auth = peer.ClientAuth(MESH, b"t" * 32, token_id="abc123", pin=b.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, gate)
    assert "token abc123 was revoked" in c.close_reason
    assert cd.opened == sd.opened == []


def test_refusal_code_reaches_the_joiner_and_its_open_waiter(ids):
    a, b, _ = ids
    gate = Gate(refuse="token abc123 was revoked", refuse_code=wire.CloseCode.TOKEN_REVOKED,
                proof_key=b"t" * 32)
    auth = peer.ClientAuth(MESH, b"t" * 32, token_id="abc123", pin=b.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, gate)
    assert s.close_code is c.close_code is wire.CloseCode.TOKEN_REVOKED
    failure = []
    c.when_opened().addErrback(failure.append)
    assert failure[0].value.codes == {wire.CloseCode.TOKEN_REVOKED}


def test_a_token_refusal_without_the_tokens_key_is_only_auth_failed(ids, caplog):
    a, b, _ = ids
    caplog.set_level(logging.WARNING, "meshd.mesh.peer")
    gate = Gate(refuse="token abc123 was revoked", refuse_code=wire.CloseCode.TOKEN_REVOKED,
                proof_key=b"t" * 32)
    auth = peer.ClientAuth(MESH, b"x" * 32, token_id="abc123", pin=b.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, gate)
    assert s.close_code is wire.CloseCode.TOKEN_REVOKED  # this node knows
    assert c.close_code is wire.CloseCode.AUTH_FAILED  # a guesser learns nothing
    assert c.close_reason == "peer closed: authentication failed"
    assert "token abc123 was revoked" in caplog.text


def test_an_unknown_token_id_gets_only_auth_failed_the_detail_is_logged(ids, caplog):
    a, b, _ = ids
    caplog.set_level(logging.WARNING, "meshd.mesh.peer")
    auth = peer.ClientAuth(MESH, b"t" * 32, token_id="feed0000", pin=b.spki_sha256)
    c, s, cd, sd, _, _ = connect(a, b, auth, Gate(tokens={"abc123": b"t" * 32}))
    assert (c.state, s.state) == (peer.PeerState.CLOSED, peer.PeerState.CLOSED)
    assert c.close_code is wire.CloseCode.AUTH_FAILED
    assert c.close_reason == "peer closed: authentication failed"
    assert "feed0000" not in c.close_reason
    assert "unknown token feed0000" in s.close_reason and "unknown token feed0000" in caplog.text


def test_close_from_an_older_peer_without_a_code_is_classified_by_its_words(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    s.send_json(FrameType.CLOSE, {"reason": "duplicate connection (the other one is kept)"})
    pump.flush()
    assert c.state is peer.PeerState.CLOSED
    assert c.close_code is wire.CloseCode.DUPLICATE
    assert cd.closed == ["peer closed: duplicate connection (the other one is kept)"]


def test_close_sends_its_code_to_the_peer(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    s.close("this node is leaving the mesh", code=wire.CloseCode.LEAVING)
    pump.flush()
    assert c.close_code is wire.CloseCode.LEAVING
    assert c.close_reason == "peer closed: this node is leaving the mesh"
    # the tunnel reads who ended it from this, not from the reason's words
    assert c.ended_by_peer and not s.ended_by_peer


def test_wrong_mesh_is_logged_with_its_code_the_stranger_gets_only_auth_failed(ids, caplog):
    a, b, _ = ids
    caplog.set_level(logging.WARNING, "meshd.mesh.peer")
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth("othermesh", SECRET), Gate())
    assert s.close_code is wire.CloseCode.WRONG_MESH
    assert c.close_code is wire.CloseCode.AUTH_FAILED
    assert c.close_reason == "peer closed: authentication failed"  # not our mesh id
    assert "peer is in mesh othermesh, not mesh0001" in caplog.text


def test_the_real_gate_tells_a_proven_token_holder_it_expired_a_stranger_nothing(ids, tmp_path):
    from meshd.mesh import invites as invitesmod

    a, b, _ = ids
    state = statedir.StateDir(tmp_path / "issuer")
    state.ensure()
    now = [1_700_000_000.0]
    book = invitesmod.Invites(state, now=lambda: now[0])

    @dataclass
    class Mesh:
        mesh: statedir.MeshState = statedir.MeshState(MESH, SECRET)
        leaving: bool = False

    gate = invitesmod.Gate(Mesh(), book)
    token_id = book.issue(Mesh().mesh, issuer=b.node_id, pin=b.spki_sha256,
                          addrs=["127.0.0.1:7842"], ttl_s=60.0, once=False)["id"]
    key = book.key_of(token_id, MESH)
    now[0] += 61
    c, s, _, _, _, _ = connect(a, b, peer.ClientAuth(MESH, key, token_id=token_id,
                                                     pin=b.spki_sha256), gate)
    assert c.close_code is wire.CloseCode.TOKEN_EXPIRED and "expired" in c.close_reason
    # the same expired token id with the wrong key, or an id never issued: nothing learned
    for token, guess in ((token_id, b"x" * 32), ("feed0000", key)):
        c, s, _, _, _, _ = connect(a, b, peer.ClientAuth(MESH, guess, token_id=token,
                                                         pin=b.spki_sha256), gate)
        assert c.close_code is wire.CloseCode.AUTH_FAILED
        assert c.close_reason == "peer closed: authentication failed"


def test_a_malformed_hello_is_refused_as_bad_hello():
    with pytest.raises(peer.AuthRefused) as e:
        peer.Hello.parse({"proof": "00"})
    assert e.value.code is wire.CloseCode.BAD_HELLO


def test_incompatible_versions_are_refused_with_their_code():
    hello = peer.Hello(proto=9, min_proto=9, mesh_id=MESH, node_id="x", incarnation=1,
                       purpose="control", auth="mesh", token_id=None, proof=b"", extra={})
    with pytest.raises(peer.AuthRefused) as e:
        peer.versions_overlap(hello)
    assert e.value.code is wire.CloseCode.VERSION_MISMATCH


def test_wrong_mesh_id_is_refused(ids):
    a, b, _ = ids
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth("othermesh", SECRET), Gate())
    assert "not mesh0001" in s.close_reason
    assert "mesh0001" not in c.close_reason
    assert cd.opened == sd.opened == []


def test_second_hello_closes_the_connection(ids):
    a, b, _ = ids
    c2, s2, _, sd2, pump2, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    assert s2.state is peer.PeerState.OPEN
    c2.transport.write(wire.encode(FrameType.HELLO, b"{}"))
    pump2.flush()
    assert s2.state is peer.PeerState.CLOSED
    assert "second HELLO" in s2.close_reason


def test_oversized_frame_closes_only_that_connection(ids, caplog):
    a, b, _ = ids
    timing = peer.Timing(max_frame_bytes=4096)
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate(), timing=timing)
    c.transport.write(wire.LENGTH.pack(10_000) + b"x" * 100)
    pump.flush()
    assert s.state is peer.PeerState.CLOSED
    assert "bad frame" in s.close_reason and "limit is 4096" in s.close_reason
    assert sd.closed == [s.close_reason]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("payload", [b"[" * 5000 + b"]" * 5000,
                                     b'{"proto":' * 5000 + b"1" + b"}" * 5000])
def test_a_hello_of_nested_brackets_is_refused_in_one_line_with_a_close(ids, caplog,
                                                                       monkeypatch, payload):
    a, b, _ = ids
    caplog.set_level(logging.INFO)
    send_hello = peer.PeerProtocol._send_hello

    def nested_hello(self, *args, **kwargs):
        if self.client is None:
            return send_hello(self, *args, **kwargs)
        self.send(FrameType.HELLO, payload)

    monkeypatch.setattr(peer.PeerProtocol, "_send_hello", nested_hello)
    c, s, cd, sd, _, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    assert s.state is c.state is peer.PeerState.CLOSED
    assert s.close_code is wire.CloseCode.BAD_HELLO
    assert c.close_code is wire.CloseCode.BAD_HELLO  # the stranger got a CLOSE, not an EOF
    assert "nested deeper" in s.close_reason
    assert cd.opened == sd.opened == []
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    assert any("nested deeper" in r.getMessage() and r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("data, why", [
    (b"\0\0\0\0", "frame of length 0"),
    (wire.encode(FrameType.HELLO, b"{}"), "second HELLO"),
])
def test_an_authenticated_peer_closed_for_bad_frames_leaves_a_warning(ids, caplog, data, why):
    a, b, _ = ids
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    assert s.state is peer.PeerState.OPEN
    caplog.set_level(logging.INFO, "meshd.mesh.peer")
    c.transport.write(data)
    pump.flush()
    assert s.state is peer.PeerState.CLOSED
    lines = [r for r in caplog.records if r.levelno == logging.WARNING
             and why in r.getMessage() and a.node_id in r.getMessage()]
    assert len(lines) == 1, caplog.text


def test_unknown_frame_type_is_passed_on_not_fatal(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, _ = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    c.send(200, b"from the future")
    pump.flush()
    assert s.state is peer.PeerState.OPEN
    assert sd.frames[-1].type == 200


def test_incompatible_protocol_versions_are_refused():
    hello = peer.Hello(proto=9, min_proto=9, mesh_id=MESH, node_id="x", incarnation=1,
                       purpose="control", auth="mesh", token_id=None, proof=b"", extra={})
    with pytest.raises(peer.AuthRefused, match="no common protocol version"):
        peer.versions_overlap(hello)


def test_newer_peer_with_an_overlapping_version_agrees_on_ours():
    hello = peer.Hello(proto=7, min_proto=1, mesh_id=MESH, node_id="x", incarnation=1,
                       purpose="control", auth="mesh", token_id=None, proof=b"", extra={})
    assert peer.versions_overlap(hello) == wire.PROTOCOL_VERSION


def test_proof_is_bound_to_the_session():
    one = peer.proof(SECRET, b"client", MESH, "n", b"1" * 32)
    assert one != peer.proof(SECRET, b"client", MESH, "n", b"2" * 32)
    assert one != peer.proof(SECRET, b"server", MESH, "n", b"1" * 32)


def test_silent_peer_times_out_after_heartbeat_timeout(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, clock = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    c.start_heartbeat(active=True)
    s.start_heartbeat(active=False)
    for _ in range(5):  # 10 s of healthy pings
        clock.advance(2.0)
        pump.flush()
    assert c.state is peer.PeerState.OPEN and c.rtt_ms is not None
    clock.advance(5.9)  # now nothing is delivered: a silent link
    assert c.close_reason is None
    clock.advance(0.1)
    assert c.close_reason == "no heartbeat for 6.0 s"
    pump.flush()
    assert c.state is peer.PeerState.CLOSED
    assert cd.closed == [c.close_reason]


def test_probe_answers_with_rtt_when_peer_is_alive(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, clock = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    results = []
    s.probe(1.0).addCallback(results.append)
    pump.flush()
    assert results and results[0] is not None


def test_probe_gives_none_when_peer_is_silent(ids):
    a, b, _ = ids
    c, s, cd, sd, pump, clock = connect(a, b, peer.ClientAuth(MESH, SECRET), Gate())
    results = []
    s.probe(1.0).addCallback(results.append)
    clock.advance(1.0)
    assert results == [None]


def test_hello_that_never_comes_times_out(ids):
    a, b, _ = ids
    clock = Clock()
    sd = Recorder()
    p = peer.PeerProtocol(identity=b, incarnation=lambda: 1, delegate=sd, clock=clock,
                          timing=peer.Timing(handshake_timeout_s=5.0), gate=Gate())
    from twisted.internet.testing import StringTransport
    t = StringTransport()
    p.makeConnection(t)
    clock.advance(5.0)
    assert p.close_reason == "TLS handshake not done within 5 s"
    assert t.disconnecting


def test_a_connection_opens_with_the_handshakes_rtt_and_keeps_the_lowest_of_the_last_few(ids):
    # the planner reads rtt_ms from the PeerUp on: a peer measured only at its first PING
    # would count as near for a heartbeat, and a far one would join the first split plan
    a, b, _ = ids
    clock = Clock()
    cd, sd = Recorder(), Recorder()

    def build(ident, delegate, **kw):
        return peer.PeerProtocol(identity=ident, incarnation=lambda: 1, delegate=delegate,
                                 clock=clock, timing=peer.Timing(), **kw)

    built = {}
    cf = TLSMemoryBIOFactory(peer.TLSOptions(a), True, peer.PeerFactory(
        lambda: built.setdefault("c", build(a, cd, client=peer.ClientAuth(MESH, SECRET)))), clock)
    sf = TLSMemoryBIOFactory(peer.TLSOptions(b), False, peer.PeerFactory(
        lambda: built.setdefault("s", build(b, sd, gate=Gate()))), clock)
    addr = IPv4Address("TCP", "127.0.0.1", 7842)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(addr), lambda: cf.buildProtocol(addr), clock=clock,
        greet=False)
    for _ in range(20):  # each step of bytes both ways takes 50 ms: a 100 ms round trip
        if not pump.pump():
            break
        clock.advance(0.05)
    c, s = built["c"], built["s"]
    assert c.state is s.state is peer.PeerState.OPEN
    assert c.rtt_ms == pytest.approx(100.0) and s.rtt_ms == pytest.approx(100.0)
    c.start_heartbeat(active=True)
    s.start_heartbeat(active=False)
    clock.advance(peer.Timing().heartbeat_s)
    pump.flush()  # now an instant link: the lowest sample is the path's RTT
    assert c.rtt_ms == 0.0
    # answers slowed down (a busy reactor, or a longer path): counted only once the
    # window holds nothing else
    for i in range(peer.RTT_WINDOW):
        assert c.rtt_ms == 0.0, f"after {i} slow PONGs"
        clock.advance(peer.Timing().heartbeat_s)
        clock.advance(0.2)
        pump.flush()
    assert c.rtt_ms == pytest.approx(200.0)
