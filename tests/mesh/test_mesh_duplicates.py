"""Simultaneous dials: the connection a peer drops as a duplicate is not a death.

When two nodes dial each other at once, both keep the same one of the two
connections; the side whose kept connection is not open yet must not report the
peer dead when the other side closes the duplicate.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock

from meshd.config import Config
from meshd.mesh import identity as identitymod
from meshd.mesh.gossip import DUPLICATE_REASON, MeshService
from meshd.mesh.membership import PeerDown, PeerView
from meshd.mesh.wire import CloseCode
from meshd.statedir import StateDir


def mesh_service(tmp_path) -> tuple[MeshService, MemoryReactorClock, list]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    ident = identitymod.load_or_create(state)
    reactor = MemoryReactorClock()
    mesh = MeshService(Config(), state, ident, reactor=reactor, local_info=lambda: {})
    events: list = []
    mesh.add_listener(events.append)
    broadcasts: list = []
    mesh._broadcast = lambda frame_type, body, **kw: broadcasts.append(body)  # type: ignore[method-assign]
    return mesh, reactor, events


def peer(node_id: str) -> PeerView:
    return PeerView(
        node_id=node_id, addrs=("127.0.0.1:1",), role="idle", serving=(), vram_bytes=0,
        available_models=(), requested_models=(), rtt_ms=None, state="alive", incarnation=1,
        api="127.0.0.1:2",
    )


def connected(mesh: MeshService, node_id: str, close_code: CloseCode | None = None):
    conn = SimpleNamespace(node_id=node_id, close_code=close_code)
    mesh.conns[node_id] = conn  # type: ignore[assignment]
    mesh.table.announced(peer(node_id))
    return conn


def test_duplicate_close_is_not_a_death_when_the_kept_connection_opens(tmp_path):
    mesh, reactor, events = mesh_service(tmp_path)
    first = connected(mesh, "b", CloseCode.DUPLICATE)
    events.clear()
    mesh.peer_closed(first, f"peer closed: {DUPLICATE_REASON}")
    # the kept connection opens on this side a moment later
    mesh.conns["b"] = SimpleNamespace(node_id="b")  # type: ignore[assignment]
    reactor.advance(mesh.cfg.connect_timeout_s + 1)
    assert not any(isinstance(e, PeerDown) for e in events)
    assert "b" in mesh.table.members


def test_duplicate_close_becomes_a_death_when_the_other_connection_never_opens(tmp_path):
    mesh, reactor, events = mesh_service(tmp_path)
    first = connected(mesh, "b", CloseCode.DUPLICATE)
    events.clear()
    mesh.peer_closed(first, f"peer closed: {DUPLICATE_REASON}")
    assert "b" in mesh.table.members
    reactor.advance(mesh.cfg.connect_timeout_s + 1)
    assert "b" not in mesh.table.members
    assert [e.node_id for e in events if isinstance(e, PeerDown)] == ["b"]


def test_any_other_close_is_a_death_at_once(tmp_path):
    mesh, reactor, events = mesh_service(tmp_path)
    first = connected(mesh, "b")
    events.clear()
    mesh.peer_closed(first, "connection lost")
    assert "b" not in mesh.table.members


def test_duplicate_is_told_by_the_code_not_the_words(tmp_path):
    mesh, reactor, events = mesh_service(tmp_path)
    first = connected(mesh, "b", CloseCode.PROTOCOL_ERROR)
    mesh.peer_closed(first, f"peer closed: bad frame mentioning {DUPLICATE_REASON}")
    assert "b" not in mesh.table.members
