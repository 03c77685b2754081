"""Joining with an invite token (``meshd.mesh.joining``), against a fake mesh service: the
issuer's CLOSE code, never its words, says whether a token is refused for good."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.backoff import Backoff
from meshd.mesh import tokens
from meshd.mesh.invites import parse_welcome, welcome_body
from meshd.mesh.joining import Joiner, JoinFailed
from meshd.mesh.wire import CloseCode
from meshd.statedir import MeshState, StateDir

ISSUER = "abcdefghijklmnopqrstuvwxyz"


def token(token_id: str) -> tokens.Token:
    return tokens.Token(mesh_id="0123456789abcdef", token_id=token_id, issuer=ISSUER,
                        pin=bytes(range(32)), addrs=("10.0.0.1:7842",), expires_at=2e9,
                        once=False, key=b"k" * 32)


class Host:
    """The mesh service as joining sees it; each dial waits for the test to answer it."""

    def __init__(self) -> None:
        self.mesh: MeshState | None = None
        self.leaving = False
        self.dials: list[tuple[list[str], object, defer.Deferred]] = []

    def dial_addrs(self, addrs, auth):
        d: defer.Deferred = defer.Deferred()
        self.dials.append((addrs, auth, d))
        return d

    def adopt_mesh(self, mesh: MeshState) -> None:
        self.mesh = mesh


def joiner(tmp_path) -> tuple[Joiner, Host, Clock]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    host, clock = Host(), Clock()
    return Joiner(host, state, clock, Backoff.reconnect(60.0, random=lambda: 0.5)), host, clock


def conn() -> SimpleNamespace:
    return SimpleNamespace(closed=defer.Deferred(), client=None, node_id=ISSUER,
                           peer_address="10.0.0.1:7842", close_code=None)


def test_a_token_join_proves_the_key_and_takes_the_mesh_from_the_welcome(tmp_path):
    j, host, _ = joiner(tmp_path)
    results = []
    j.join(token("aaaa1111")).addCallback(results.append)
    _, auth, d = host.dials[0]
    assert auth.token_id == "aaaa1111" and auth.key == b"k" * 32
    c = conn()
    d.callback(c)
    mesh = MeshState("0123456789abcdef", b"s" * 32)
    j.welcomed(c, welcome_body(mesh))
    assert host.mesh == mesh and results == [{"mesh_id": mesh.mesh_id, "via": ISSUER}]
    assert c.client.key == mesh.secret  # the connection proves the mesh secret from now on
    assert [b.node_id for b in StateDir(tmp_path / "state").load_peers()[0]] == [ISSUER]


def test_welcome_body_round_trips():
    mesh = MeshState("0123456789abcdef", b"\x00\xff" * 16)
    assert parse_welcome(welcome_body(mesh)) == mesh


def test_the_issuer_closing_before_the_welcome_fails_with_its_code(tmp_path):
    j, host, _ = joiner(tmp_path)
    failures = []
    j.join(token("aaaa1111")).addErrback(failures.append)
    c = conn()
    host.dials[0][2].callback(c)
    c.close_code = CloseCode.STOPPING
    c.closed.callback("peer closed: stopping")
    assert failures[0].check(JoinFailed) and failures[0].value.codes == {CloseCode.STOPPING}


def test_a_token_refused_by_code_is_not_tried_again(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111"), token("bbbb2222")])
    host.dials[0][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_REVOKED}))
    host.dials[1][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_EXPIRED}))
    assert len(host.dials) == 2
    assert clock.getDelayedCalls() == []


def test_a_failure_without_a_refusal_code_is_retried_whatever_its_words(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111")])
    host.dials[0][2].errback(JoinFailed("tried 10.0.0.1:7842 (refused: token was revoked?)"))
    clock.advance(0.99)
    assert len(host.dials) == 1
    clock.advance(0.02)  # the reconnect policy's first delay, 1 s
    assert len(host.dials) == 2
    host.dials[1][2].errback(JoinFailed("connection refused"))
    clock.advance(2.01)  # doubled
    assert len(host.dials) == 3


def test_cancel_stops_the_retries(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111")])
    host.dials[0][2].errback(JoinFailed("connection refused"))
    j.cancel()
    clock.advance(600)
    assert len(host.dials) == 1


def test_a_node_already_in_the_tokens_mesh_dials_the_issuer_with_the_mesh_secret(tmp_path):
    j, host, _ = joiner(tmp_path)
    host.mesh = MeshState("0123456789abcdef", b"s" * 32)
    results = []
    j.join(token("aaaa1111")).addCallback(results.append)
    _, auth, d = host.dials[0]
    assert auth.token_id is None and auth.key == b"s" * 32 and auth.expect_node_id == ISSUER
    d.callback(conn())
    assert results == [{"mesh_id": "0123456789abcdef", "via": ISSUER}]


# -- a node asked to join never founds a mesh of its own (issue 12, defect 3) -----------------


def test_every_token_refused_leaves_the_node_waiting_and_says_why(tmp_path, caplog):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111"), token("bbbb2222")])
    assert j.status()["state"] == "joining"
    host.dials[0][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_REVOKED}))
    host.dials[1][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_EXPIRED}))
    status = j.status()
    assert status["state"] == "waiting"
    assert "aaaa1111" in status["reason"] and "token-revoked" in status["reason"]
    assert "bbbb2222" in status["reason"] and "token-expired" in status["reason"]
    assert "meshctl join" in status["reason"]
    assert host.mesh is None and clock.getDelayedCalls() == []
    assert "not in any mesh" in caplog.text


def test_a_token_refused_for_good_is_left_out_of_the_next_rounds(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111"), token("bbbb2222")])
    host.dials[0][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_USED}))
    host.dials[1][2].errback(JoinFailed("connection refused"))
    assert j.status() == {"state": "joining",
                          "reason": "cannot join mesh 0123456789abcdef: connection refused"}
    clock.advance(1.01)
    assert [auth.token_id for _, auth, _ in host.dials[2:]] == ["bbbb2222"]


def test_the_last_token_refused_after_a_passing_failure_keeps_the_others_trying(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([token("aaaa1111"), token("bbbb2222")])
    host.dials[0][2].errback(JoinFailed("connection refused"))
    host.dials[1][2].errback(JoinFailed("the issuer said no", {CloseCode.TOKEN_REVOKED}))
    assert j.status()["state"] == "joining"
    clock.advance(1.01)
    assert [auth.token_id for _, auth, _ in host.dials[2:]] == ["aaaa1111"]


def test_no_usable_token_at_all_waits_with_the_reasons(tmp_path):
    j, host, clock = joiner(tmp_path)
    j.join_at_start([], ["token 1: token tok expired 3 s ago"])
    assert j.status() == {"state": "waiting", "reason": "no [mesh] join token can be used: "
                          "token 1: token tok expired 3 s ago; waiting for meshctl join with "
                          "a new token"}
    assert host.dials == [] and clock.getDelayedCalls() == []


def test_a_welcome_after_waiting_ends_the_wait(tmp_path):
    j, host, _ = joiner(tmp_path)
    j.wait("every token was refused")
    j.join(token("cccc3333"))
    c = conn()
    host.dials[0][2].callback(c)
    j.welcomed(c, welcome_body(MeshState("0123456789abcdef", b"s" * 32)))
    assert j.status() == {"state": "joining", "reason": "trying the [mesh] join tokens"}


def _mesh_service(tmp_path, join):
    from twisted.internet.testing import MemoryReactorClock

    from meshd.config import Config, MeshConfig
    from meshd.mesh import identity as identitymod
    from meshd.mesh.gossip import MeshService

    state = StateDir(tmp_path / "state")
    state.ensure()
    config = Config(mesh=MeshConfig(listen="127.0.0.1:0", join=join))
    mesh = MeshService(config, state, identitymod.load_or_create(state),
                       reactor=MemoryReactorClock(), local_info=dict)
    return mesh, state


def _expired_token_text() -> str:
    t = token("dddd4444")
    return tokens.encode(tokens.Token(t.mesh_id, t.token_id, t.issuer, t.pin, t.addrs, -1.0,
                                      t.once, t.key))


@pytest.mark.parametrize("text, why", [
    ("garbage", "not a meshd invite token"),
    (_expired_token_text(), "expired"),
    (_expired_token_text()[:-5], "cut short"),
])
def test_a_node_asked_to_join_with_an_unusable_token_waits_and_never_founds_a_mesh(
        tmp_path, caplog, text, why):
    mesh, state = _mesh_service(tmp_path, [text])
    mesh.startService()
    try:
        assert mesh.mesh is None and state.load_mesh() is None
        status = mesh.join_status()
        assert status is not None and status["state"] == "waiting"
        assert why in status["reason"] or "checksum" in status["reason"]
        assert "created a new mesh" not in caplog.text
    finally:
        mesh._cancel_timers()


def test_a_node_asked_to_join_is_joining_until_a_token_works(tmp_path):
    mesh, _ = _mesh_service(tmp_path, [tokens.encode(token("eeee5555"))])
    mesh.startService()
    try:
        assert mesh.mesh is None
        assert mesh.join_status() == {"state": "joining",
                                      "reason": "trying the [mesh] join tokens"}
    finally:
        mesh._cancel_timers()


def test_a_node_not_asked_to_join_founds_its_mesh_and_has_no_join_status(tmp_path):
    mesh, state = _mesh_service(tmp_path, [])
    mesh.startService()
    try:
        assert mesh.mesh is not None and state.load_mesh() == mesh.mesh
        assert mesh.join_status() is None
    finally:
        mesh._cancel_timers()
