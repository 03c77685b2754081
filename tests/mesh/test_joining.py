"""Joining with the ``[mesh] join`` tokens at start: the issuer's CLOSE code, never its
words, says whether a token is refused for good or worth another try."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from meshd.config import Config
from meshd.mesh import identity as identitymod
from meshd.mesh import tokens
from meshd.mesh.gossip import JoinFailed, MeshService
from meshd.mesh.wire import CloseCode
from meshd.statedir import StateDir


def token(token_id: str) -> tokens.Token:
    return tokens.Token(mesh_id="0123456789abcdef", token_id=token_id,
                        issuer="abcdefghijklmnopqrstuvwxyz", pin=bytes(range(32)),
                        addrs=("10.0.0.1:7842",), expires_at=2e9, once=False, key=b"k" * 32)


def joining_mesh(tmp_path, answers: dict[str, JoinFailed]):
    state = StateDir(tmp_path / "state")
    state.ensure()
    reactor = MemoryReactorClock()
    mesh = MeshService(Config(), state, identitymod.load_or_create(state), reactor=reactor,
                       local_info=lambda: {})
    tried: list[str] = []

    def join_token(t: tokens.Token) -> defer.Deferred:
        tried.append(t.token_id)
        return defer.fail(answers[t.token_id])

    mesh._join_token = join_token  # type: ignore[method-assign]
    return mesh, reactor, tried


def test_a_token_refused_by_code_is_not_tried_again(tmp_path):
    mesh, reactor, tried = joining_mesh(tmp_path, {
        "aaaa1111": JoinFailed("cannot join: the issuer said no", {CloseCode.TOKEN_REVOKED}),
        "bbbb2222": JoinFailed("cannot join: the issuer said no", {CloseCode.TOKEN_EXPIRED}),
    })
    mesh._join_tokens_at_start([token("aaaa1111"), token("bbbb2222")])
    assert tried == ["aaaa1111", "bbbb2222"]
    assert reactor.getDelayedCalls() == []


def test_a_failure_without_a_refusal_code_is_retried_whatever_its_words(tmp_path):
    mesh, reactor, tried = joining_mesh(tmp_path, {
        "aaaa1111": JoinFailed("tried 10.0.0.1:7842 (connection refused: revoked route)"),
    })
    mesh._join_tokens_at_start([token("aaaa1111")])
    assert tried == ["aaaa1111"]
    (retry,) = reactor.getDelayedCalls()
    reactor.advance(retry.getTime() - reactor.seconds())
    assert tried == ["aaaa1111", "aaaa1111"]
