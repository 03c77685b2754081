"""State files validated on load: a broken one is one line naming the file, what is wrong
and what to do; a mesh secret too short to keep strangers out is never used; silent
changes (a new identity, a reset counter) are warned about."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.testing import MemoryReactorClock

from meshd.config import Config
from meshd.errors import StartupError
from meshd.mesh import identity
from meshd.mesh.gossip import MeshService
from meshd.mesh.invites import parse_welcome
from meshd.statedir import MeshState, StateDir, StateDirError

GOOD_SECRET = "ab" * 32


@pytest.fixture
def state(tmp_path):
    s = StateDir(tmp_path / "state")
    s.ensure()
    return s


def write(state: StateDir, name: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    (state.path / name).write_text(text)


def one_line_naming(e: Exception, name: str, fix: str) -> None:
    text = str(e)
    assert "\n" not in text
    assert name in text, text
    assert fix in text, text


# -- the mesh secret (defect 4) ------------------------------------------------------------


@pytest.mark.parametrize("secret, what", [("", "is empty"), ("ab" * 16, "is 16 bytes")])
def test_an_empty_or_short_mesh_secret_is_refused_on_load(state, secret, what):
    write(state, "mesh.json", {"mesh_id": "0123456789abcdef", "secret": secret})
    with pytest.raises(StateDirError) as e:
        state.load_mesh()
    one_line_naming(e.value, "mesh.json", "restore it from a backup")
    assert f"mesh secret {what}" in str(e.value)


def test_a_32_byte_secret_is_loaded(state):
    write(state, "mesh.json", {"mesh_id": "0123456789abcdef", "secret": GOOD_SECRET})
    assert state.load_mesh() == MeshState("0123456789abcdef", bytes.fromhex(GOOD_SECRET))


@pytest.mark.parametrize("secret", [b"", b"s" * 16])
def test_a_welcome_with_an_empty_or_short_secret_is_refused(secret):
    with pytest.raises(ValueError, match="mesh secret"):
        parse_welcome({"mesh_id": "m1", "secret": base64.b64encode(secret).decode()})


def test_a_node_with_an_empty_secret_in_mesh_json_does_not_start(state):
    write(state, "mesh.json", {"mesh_id": "0123456789abcdef", "secret": ""})
    ident = identity.load_or_create(state)
    with pytest.raises(StartupError, match="mesh.json: the mesh secret is empty"):
        MeshService(Config(), state, ident, reactor=MemoryReactorClock(), local_info=dict)


# -- every state file, validated on load (defect 7) -------------------------------------------


BROKEN = [
    ("mesh.json", [1, 2], "expected a JSON object with mesh_id and secret", "restore it"),
    ("mesh.json", {"mesh_id": "m"}, "secret is missing or not hex", "restore it"),
    ("mesh.json", {"mesh_id": "m", "secret": "zz"}, "secret is missing or not hex", "restore it"),
    ("mesh.json", {"mesh_id": 5, "secret": GOOD_SECRET}, "mesh id is missing", "restore it"),
    ("mesh.json", "{nope", "is not valid JSON", "move it away"),
    ("peers.json", {"known": 5}, "'known' is a number, expected a list", "remove it"),
    ("peers.json", [1], "expected a JSON object with bootstrap and known", "remove it"),
    ("peers.json", {"bootstrap": [5]}, "bootstrap[0] is not", "remove it"),
    ("peers.json", {"known": [{"node_id": "a", "addrs": [1]}]}, "known[0] is not", "remove it"),
    ("tokens.json", [], "expected a JSON object of issued tokens", "remove it"),
    ("tokens.json", {"abc": 5}, "token 'abc': the record is a number", "remove it"),
    ("tokens.json", {"abc": {"key": "zz", "mesh_id": "m", "expires_at": 1}},
     "join key is not 64 hex digits", "remove it"),
    ("tokens.json", {"abc": {"key": "ab" * 32, "mesh_id": "m", "expires_at": "soon"}},
     "expires_at is not a number", "remove it"),
]


@pytest.mark.parametrize("name, content, problem, fix", BROKEN,
                         ids=[f"{n}-{p[:30]}" for n, _, p, _ in BROKEN])
def test_a_broken_state_file_is_one_line_naming_it_and_the_fix(state, name, content, problem,
                                                               fix):
    write(state, name, content)
    with pytest.raises(StateDirError) as e:
        state.check()
    one_line_naming(e.value, str(state.path / name), fix)
    assert problem in str(e.value)
    assert isinstance(e.value, StartupError)  # the start says it in one line, no traceback


def test_what_meshd_writes_passes_the_check(state):
    from meshd.mesh.tokens import TokenBook

    state.new_mesh()
    state.save_peers([], [])
    TokenBook(state).issue(mesh_id="m", issuer="a" * 26, pin=b"p" * 32, addrs=["127.0.0.1:1"],
                           ttl_s=60, once=True)
    state.check()


def _other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


@pytest.mark.parametrize("damage, name, problem", [
    (lambda s: s.key_path.write_text("junk"), "key.pem", "is not a usable private key"),
    (lambda s: s.cert_path.write_text("junk"), "cert.pem", "is not a PEM certificate"),
    (lambda s: s.key_path.write_bytes(_other_key_pem()), "cert.pem", "does not belong to"),
    (lambda s: s.cert_path.unlink(), "cert.pem", "is missing"),
])
def test_a_broken_identity_is_one_line_naming_the_file_and_the_fix(state, damage, name, problem):
    identity.load_or_create(state)
    damage(state)
    with pytest.raises(identity.IdentityError) as e:
        identity.load_or_create(state)
    one_line_naming(e.value, name, "or remove identity/ to make a new node id")
    assert problem in str(e.value)
    assert "https://" not in str(e.value)
    assert isinstance(e.value, StartupError)


# -- silent changes are warned about (defect 12) -------------------------------------------------


def test_a_deleted_identity_makes_a_new_node_id_with_a_warning_naming_the_old(state, caplog):
    old = identity.load_or_create(state).node_id
    state.next_incarnation()
    for path in (state.key_path, state.cert_path):
        path.unlink()
    caplog.set_level(logging.INFO, "meshd.mesh.identity")
    new = identity.load_or_create(state).node_id
    assert new != old
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert old in warnings[0].getMessage() and new in warnings[0].getMessage()
    assert "identity is gone" in warnings[0].getMessage()


def test_a_first_identity_is_only_an_info_line(state, caplog):
    caplog.set_level(logging.INFO, "meshd.mesh.identity")
    identity.load_or_create(state)
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_a_lost_identity_in_a_used_directory_warns_even_without_the_old_id(state, caplog):
    state.next_incarnation()  # a node ran here (before node ids were recorded)
    caplog.set_level(logging.INFO, "meshd.mesh.identity")
    identity.load_or_create(state)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "whose id is not known" in caplog.records[0].getMessage()


def test_a_garbage_incarnation_is_counted_from_1_with_a_warning(state, caplog):
    (state.path / "incarnation").write_text("garbage\n")
    caplog.set_level(logging.INFO, "meshd.statedir")
    assert state.next_incarnation() == 1
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "incarnation" in caplog.text and "garbage" in caplog.text
    assert state.next_incarnation() == 2
    assert len(caplog.records) == 1  # the counter is good again: no more warnings
