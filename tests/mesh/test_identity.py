"""Identity and state directory: stable ids, private files, certificates that name the id."""

import os
import stat

import pytest

from meshd import statedir
from meshd.mesh import identity


@pytest.fixture
def state(tmp_path):
    return statedir.StateDir(tmp_path / "state")


def test_node_id_is_stable_across_loads(state):
    first = identity.load_or_create(state)
    second = identity.load_or_create(state)
    assert first.node_id == second.node_id
    assert len(first.node_id) == identity.NODE_ID_CHARS


def test_two_state_dirs_get_different_node_ids(tmp_path):
    a = identity.load_or_create(statedir.StateDir(tmp_path / "a"))
    b = identity.load_or_create(statedir.StateDir(tmp_path / "b"))
    assert a.node_id != b.node_id


def test_identity_files_are_private(state):
    identity.load_or_create(state)
    for path in (state.key_path, state.cert_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_certificate_names_its_node_id(state):
    ident = identity.load_or_create(state)
    identity.check_peer_certificate(ident.cert, ident.node_id)


def test_certificate_is_refused_for_another_node_id(tmp_path):
    a = identity.load_or_create(statedir.StateDir(tmp_path / "a"))
    b = identity.load_or_create(statedir.StateDir(tmp_path / "b"))
    with pytest.raises(ValueError, match="claims node id"):
        identity.check_peer_certificate(a.cert, b.node_id)


def test_certificate_is_refused_when_the_pin_differs(tmp_path):
    a = identity.load_or_create(statedir.StateDir(tmp_path / "a"))
    b = identity.load_or_create(statedir.StateDir(tmp_path / "b"))
    with pytest.raises(ValueError, match="not the one the token pins"):
        identity.check_peer_certificate(a.cert, a.node_id, pin_spki_sha256=b.spki_sha256)


def test_a_missing_certificate_is_an_error_not_a_new_identity(state):
    identity.load_or_create(state)
    state.cert_path.unlink()
    with pytest.raises(identity.IdentityError, match="missing"):
        identity.load_or_create(state)


def test_atomic_write_leaves_no_temporary_files(state):
    state.ensure()
    state.write_json("mesh.json", {"x": 1})
    assert sorted(p.name for p in state.path.iterdir()) == ["identity", "mesh.json"]


def test_mesh_state_round_trips(state):
    created = state.new_mesh()
    assert state.load_mesh() == created
    assert stat.S_IMODE(os.stat(state.path / "mesh.json").st_mode) == 0o600


def test_incarnation_grows_at_every_start(state):
    state.ensure()
    assert [state.next_incarnation() for _ in range(3)] == [1, 2, 3]


def test_corrupt_json_is_reported_with_the_file_name(state):
    state.ensure()
    (state.path / "mesh.json").write_text("{nope")
    with pytest.raises(statedir.StateDirError, match="mesh.json"):
        state.load_mesh()


def test_a_state_file_of_nested_brackets_is_reported_with_the_file_name(state):
    state.ensure()
    (state.path / "peers.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(statedir.StateDirError, match="peers.json is not valid JSON"):
        state.load_peers()


def test_known_peers_round_trip(state):
    boot = [statedir.KnownNode("a" * 26, ("127.0.0.1:1",))]
    known = [statedir.KnownNode("b" * 26, ("127.0.0.1:2", "[::1]:2"))]
    state.save_peers(boot, known)
    assert state.load_peers() == (boot, known)
