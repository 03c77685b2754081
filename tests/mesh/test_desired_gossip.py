"""The desired state in the gossip (``meshd.mesh.gossip``): a peer gets every decision in
one DESIRED frame when its connection opens (a late joiner, a restarted node); a decision
that wins the merge is passed on to the other peers and to the listeners, one that does
not stops there; DROP frames of peers older than DESIRED (no ``version``) are decisions
too; an ANNOUNCE without the new fields and a peer that never sends DESIRED are fine.

A real ``MeshService`` over in-memory connections that record what is sent.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from meshd.config import Config
from meshd.mesh import identity as identitymod
from meshd.mesh import wire
from meshd.mesh.desired import Decision, DesiredState, Want
from meshd.mesh.gossip import MeshService
from meshd.mesh.peer import PeerState
from meshd.mesh.wire import CloseCode, FrameType
from meshd.statedir import KnownNode, StateDir

DROP, SERVE = Want.DROPPED, Want.SERVE


class Conn:
    """A control connection as the mesh service sees it: frames it was sent are kept."""

    def __init__(self, node_id: str, *, is_client: bool = False):
        self.node_id = node_id
        self.who = node_id
        self.purpose = "control"
        self.is_client = is_client
        self.state = PeerState.OPEN
        self.hello = SimpleNamespace(auth="mesh", incarnation=1)
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.closed: tuple[str, Any] | None = None
        self.rtt_ms = 1.0
        self.peer_address = "127.0.0.1:1"
        self.close_code = None

    def send_json(self, frame_type: int, body: dict[str, Any]) -> None:
        self.sent.append((frame_type, json.loads(wire.dump_json(body))))

    def start_heartbeat(self, active: bool) -> None:
        pass

    def close(
        self, reason: str, *, code: Any = None, notify: bool = True, abort: bool = False
    ) -> None:
        self.closed = (reason, code)

    def frames(self, frame_type: int) -> list[dict[str, Any]]:
        return [body for t, body in self.sent if t == frame_type]


@pytest.fixture
def mesh(tmp_path):
    state = StateDir(tmp_path / "state")
    state.ensure()
    ident = identitymod.load_or_create(state)
    m = MeshService(
        Config(),
        state,
        ident,
        reactor=MemoryReactorClock(),
        local_info=lambda: {"role": "idle"},
        desired=DesiredState(),
    )
    m.heard = []  # type: ignore[attr-defined]
    m.add_desired_listener(lambda decisions, via: m.heard.append((via, decisions)))
    return m


def open_conn(mesh: MeshService, node_id: str) -> Conn:
    conn = Conn(node_id)
    mesh.peer_open(conn)  # type: ignore[arg-type]
    return conn


def frame(conn: Conn, mesh: MeshService, frame_type: int, body: dict[str, Any]) -> None:
    mesh.peer_frame(conn, wire.Frame(frame_type, wire.dump_json(body)))  # type: ignore[arg-type]


def body(*decisions: Decision) -> dict[str, Any]:
    return {"models": {x.model: x.to_body() for x in decisions}}


def test_a_peer_that_connects_gets_every_decision_in_one_frame(mesh):
    mesh.desired.merge([Decision("m", DROP, 2, "node-a", 5.0), Decision("k", SERVE, 1, "node-b")])
    late = open_conn(mesh, "late-joiner")
    assert [t for t, _ in late.sent] == [FrameType.ANNOUNCE, FrameType.DESIRED]
    assert late.frames(FrameType.DESIRED) == [
        {
            "models": {
                "k": {"state": "serve", "version": 1, "by": "node-b", "at": 0.0},
                "m": {"state": "dropped", "version": 2, "by": "node-a", "at": 5.0},
            }
        }
    ]


def test_with_no_decision_an_empty_one_is_sent_on_open(mesh):
    """A joiner waits for its first DESIRED before serving: "none" must be said too."""
    assert open_conn(mesh, "b").frames(FrameType.DESIRED) == [{"models": {}}]


def test_learning_the_decisions_waits_for_the_first_desired_frame(mesh):
    mesh.state.save_peers([], [KnownNode("b", ("127.0.0.1:1",))])  # someone to ask
    results: list = []
    mesh.learn_decisions(5.0).addCallback(results.append)
    b = open_conn(mesh, "b")
    assert results == []  # open is not enough: the peer's decisions are not in yet
    frame(b, mesh, FrameType.DESIRED, {"models": {}})
    assert results == [True]
    mesh.learn_decisions(5.0).addCallback(results.append)  # heard once: at once after
    assert results == [True, True]


def test_learning_the_decisions_gives_up_after_the_bound(mesh):
    mesh.state.save_peers([], [KnownNode("b", ("127.0.0.1:1",))])
    results: list = []
    mesh.learn_decisions(5.0).addCallback(results.append)
    mesh.reactor.advance(4.9)
    assert results == []
    mesh.reactor.advance(0.2)  # an older peer sends no DESIRED; a dead one nothing
    assert results == [False]


def test_a_node_with_nobody_to_ask_does_not_wait(mesh):
    results: list = []
    mesh.learn_decisions(5.0).addCallback(results.append)
    assert results == [False]


def test_a_decision_that_wins_is_taken_passed_on_and_told_to_the_listeners(mesh):
    b, c, e = open_conn(mesh, "b"), open_conn(mesh, "c"), open_conn(mesh, "e")
    decision = Decision("m", DROP, 1, "node-x", 3.0)
    frame(b, mesh, FrameType.DESIRED, body(decision))
    assert mesh.desired.get("m") == decision
    assert mesh.heard == [("b", [decision])]
    assert c.frames(FrameType.DESIRED)[-1] == body(decision)
    assert e.frames(FrameType.DESIRED)[-1] == body(decision)
    assert b.frames(FrameType.DESIRED) == [{"models": {}}]  # on open; not back to the sender


def test_a_decision_already_held_or_older_stops_here(mesh):
    b, c = open_conn(mesh, "b"), open_conn(mesh, "c")
    mesh.desired.merge([Decision("m", SERVE, 4, "node-a")])
    frame(b, mesh, FrameType.DESIRED, body(Decision("m", DROP, 3, "node-z")))
    frame(b, mesh, FrameType.DESIRED, body(Decision("m", SERVE, 4, "node-a")))
    assert mesh.heard == [] and c.frames(FrameType.DESIRED) == [{"models": {}}]  # on open only
    assert mesh.desired.get("m") == Decision("m", SERVE, 4, "node-a")


def test_publishing_a_local_decision_tells_every_peer(mesh):
    b, c = open_conn(mesh, "b"), open_conn(mesh, "c")
    decision = mesh.desired.decide("m", SERVE, by=mesh.node_id)
    mesh.publish_desired([decision])
    assert b.frames(FrameType.DESIRED)[-1] == c.frames(FrameType.DESIRED)[-1] == body(decision)
    assert mesh.heard == []  # our own decision: the node applied it already


def test_a_drop_carries_its_version_for_new_peers(mesh):
    b = open_conn(mesh, "b")
    mesh.desired.decide("m", DROP, by=mesh.node_id)
    mesh.desired.decide("m", SERVE, by=mesh.node_id)
    mesh.desired.decide("m", DROP, by=mesh.node_id)
    mesh.drop_model("m")
    (drop,) = b.frames(FrameType.DROP)
    assert drop["model"] == "m" and drop["origin"] == mesh.node_id and drop["version"] == 3


# -- two versions side by side: peers older than DESIRED ----------------------------------------


def test_a_drop_from_an_older_peer_without_a_version_is_the_next_decision(mesh):
    old, new = open_conn(mesh, "old-peer"), open_conn(mesh, "new-peer")
    mesh.desired.merge([Decision("m", SERVE, 2, "node-a")])
    frame(old, mesh, FrameType.DROP, {"model": "m", "id": "d1", "origin": "old-peer"})
    assert mesh.desired.get("m") == Decision("m", DROP, 3, "old-peer")
    assert mesh.heard == [("old-peer", [Decision("m", DROP, 3, "old-peer")])]
    # forwarded as it came (older peers need the DROP), and as a decision (newer ones)
    assert new.frames(FrameType.DROP) == [{"model": "m", "id": "d1", "origin": "old-peer"}]
    assert new.frames(FrameType.DESIRED)[-1] == body(Decision("m", DROP, 3, "old-peer"))


def test_a_forwarded_copy_of_a_drop_is_not_taken_twice(mesh):
    b, c = open_conn(mesh, "b"), open_conn(mesh, "c")
    drop = {"model": "m", "id": "d1", "origin": "b", "version": 1}
    frame(b, mesh, FrameType.DROP, drop)
    frame(c, mesh, FrameType.DROP, drop)
    assert len(mesh.heard) == 1


def test_a_stale_drop_does_not_undo_a_later_serve(mesh):
    b = open_conn(mesh, "b")
    mesh.desired.merge([Decision("m", SERVE, 5, "node-a")])
    frame(b, mesh, FrameType.DROP, {"model": "m", "id": "d2", "origin": "b", "version": 4})
    assert mesh.heard == [] and not mesh.desired.is_dropped("m")


def test_an_announce_without_the_new_fields_is_taken(mesh):
    """An older peer's ANNOUNCE (no ``name``, no desired state): a member like any other."""
    old = open_conn(mesh, "old-peer")
    frame(
        old,
        mesh,
        FrameType.ANNOUNCE,
        {
            "node_id": "old-peer",
            "incarnation": 1,
            "seq": 1,
            "addrs": ["127.0.0.1:9"],
            "role": "host",
            "vram_bytes": 1,
            "serving": ["m"],
            "available_models": [],
            "requested_models": [],
            "versions": {"meshd": "0.1"},
            "api": "127.0.0.1:8",
        },
    )
    assert "old-peer" in mesh.table.members and old.closed is None
    assert mesh.heard == [] and mesh.desired.decisions == {}


def test_an_unknown_frame_type_from_a_newer_peer_is_ignored(mesh):
    """What an older node does with DESIRED: a frame type it does not know is skipped."""
    newer = open_conn(mesh, "newer-peer")
    frame(newer, mesh, 200, {"anything": 1})
    assert newer.closed is None


def test_a_malformed_desired_frame_closes_that_connection_only(mesh):
    b, c = open_conn(mesh, "b"), open_conn(mesh, "c")
    frame(b, mesh, FrameType.DESIRED, {"models": {"m": {"state": "dropped", "version": "x"}}})
    assert b.closed is not None and b.closed[1] is CloseCode.PROTOCOL_ERROR
    assert "bad DESIRED frame" in b.closed[0] and "version" in b.closed[0]
    assert c.closed is None and mesh.desired.decisions == {}
