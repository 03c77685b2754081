"""The issuer's side of invite tokens (``meshd.mesh.invites``): a presented token is let in,
or refused with the CLOSE code that says why."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshd.errors import Refused
from meshd.mesh.invites import Gate, Invites
from meshd.mesh.peer import AuthRefused, Hello
from meshd.mesh.wire import CloseCode
from meshd.statedir import MeshState, StateDir

MESH = MeshState("0123456789abcdef", b"s" * 32)
ISSUER = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Mesh:
    mesh: MeshState | None = MESH
    leaving: bool = False


class Now:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def setup(tmp_path, **mesh):
    state = StateDir(tmp_path / "state")
    state.ensure()
    now = Now()
    invites = Invites(state, now=now)
    return invites, Gate(Mesh(**mesh), invites), now


def issue(invites: Invites, **kw) -> str:
    args = dict(issuer=ISSUER, pin=b"p" * 32, addrs=["10.0.0.1:7842"], ttl_s=60.0, once=False)
    args.update(kw)
    return invites.issue(MESH, **args)["id"]


def hello(token_id: str | None) -> Hello:
    return Hello(proto=1, min_proto=1, mesh_id=MESH.mesh_id, node_id="b" * 26, incarnation=1,
                 purpose="control", auth="token" if token_id else "mesh", token_id=token_id,
                 proof=b"", extra={})


def refusal(gate: Gate, h: Hello) -> CloseCode:
    with pytest.raises(AuthRefused) as e:
        gate.key_for(h)
    return e.value.code


def test_the_mesh_secret_or_a_good_token_gets_in(tmp_path):
    invites, gate, _ = setup(tmp_path)
    assert gate.key_for(hello(None)) == MESH.secret
    assert len(gate.key_for(hello(issue(invites)))) == 32


def test_each_refused_token_closes_with_its_own_code(tmp_path):
    invites, gate, now = setup(tmp_path)
    assert refusal(gate, hello("ffff0000")) is CloseCode.TOKEN_UNKNOWN
    revoked = issue(invites)
    invites.revoke(revoked)
    assert refusal(gate, hello(revoked)) is CloseCode.TOKEN_REVOKED
    once = issue(invites, once=True)
    gate.authenticated(hello(once))
    assert refusal(gate, hello(once)) is CloseCode.TOKEN_USED
    expired = issue(invites)
    now.t += 61
    assert refusal(gate, hello(expired)) is CloseCode.TOKEN_EXPIRED


def test_a_refused_token_names_its_key_so_only_its_holder_learns_why(tmp_path):
    invites, gate, now = setup(tmp_path)
    with pytest.raises(AuthRefused) as e:
        gate.key_for(hello("ffff0000"))
    assert e.value.proof_key is None  # unknown: nobody is told which
    revoked = issue(invites)
    key = invites.key_of(revoked, MESH.mesh_id)
    assert key is not None and len(key) == 32
    invites.revoke(revoked)
    with pytest.raises(AuthRefused) as e:
        gate.key_for(hello(revoked))
    assert e.value.code is CloseCode.TOKEN_REVOKED and e.value.proof_key == key
    assert invites.key_of(revoked, "another-mesh") is None


def test_a_leaving_node_refuses_everyone_as_leaving(tmp_path):
    _, gate, _ = setup(tmp_path, leaving=True)
    assert refusal(gate, hello(None)) is CloseCode.LEAVING


def test_no_token_without_a_mesh_or_an_address(tmp_path):
    invites, _, _ = setup(tmp_path)
    with pytest.raises(Refused, match="not in a mesh yet"):
        invites.issue(None, issuer=ISSUER, pin=b"p" * 32, addrs=["10.0.0.1:7842"], ttl_s=60.0,
                      once=False)
    with pytest.raises(Refused, match="set \\[mesh\\] advertise"):
        issue(invites, addrs=[])


def test_a_tokens_file_damaged_while_running_refuses_the_joiner_in_one_line(tmp_path, caplog):
    invites, gate, _ = setup(tmp_path)
    token_id = issue(invites)
    (tmp_path / "state" / "tokens.json").write_text("[]")
    with pytest.raises(AuthRefused, match="cannot check invite tokens now"):
        gate.key_for(hello(token_id))
    assert "tokens.json" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(Refused, match="tokens.json"):
        issue(invites)
