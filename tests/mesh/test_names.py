"""Node names in the gossip: carried in ANNOUNCE and MEMBERS, cleaned on receipt, optional.

Real ``MeshService`` objects connected over in-memory TLS (``iosim``): each one's
ANNOUNCE carries what its ``local_info`` says (a real node puts ``[node] name``
there), and the other side's member table, status and log lines read the name.
A peer that sends none (an older meshd, in a rolling upgrade) is shown by its id;
a hostile one cannot put a control character into a log line.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from meshd import nodename
from meshd.config import Config
from meshd.mesh import identity as identitymod
from meshd.mesh import peer as peermod
from meshd.mesh.gossip import MeshService, _digest_entry
from meshd.mesh.membership import PeerDown, view_from_announce
from meshd.statedir import StateDir


def service(tmp_path, label: str, info: dict[str, Any], reactor: MemoryReactorClock,
            mesh=None) -> MeshService:
    state = StateDir(tmp_path / label)
    state.ensure()
    ident = identitymod.load_or_create(state)
    svc = MeshService(Config(), state, ident, reactor=reactor, local_info=lambda: dict(info))
    svc.mesh = mesh or state.new_mesh()
    return svc


def link(server: MeshService, client: MeshService, reactor: MemoryReactorClock) -> None:
    """A control connection from ``client`` to ``server``, authenticated and open."""
    assert server.mesh is not None
    auth = peermod.ClientAuth(server.mesh.mesh_id, server.mesh.secret,
                              expect_node_id=server.node_id)
    sf = TLSMemoryBIOFactory(server.tls, False, peermod.PeerFactory(server._build_server), reactor)
    cf = TLSMemoryBIOFactory(client.tls, True, peermod.PeerFactory(client._build_client(auth)),
                             reactor)
    addr = IPv4Address("TCP", "127.0.0.1", 7842)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(addr), lambda: cf.buildProtocol(addr), clock=reactor)
    pump.flush()
    assert client.node_id in server.conns and server.node_id in client.conns


@pytest.fixture
def reactor() -> MemoryReactorClock:
    return MemoryReactorClock()


def test_the_name_travels_in_the_announce_and_leads_the_status(tmp_path, reactor, caplog):
    caplog.set_level(logging.INFO, "meshd.mesh")
    a = service(tmp_path, "a", {"name": "gpu-box-1", "role": "idle"}, reactor)
    b = service(tmp_path, "b", {"name": "gpu-box-2", "role": "idle"}, reactor, mesh=a.mesh)
    link(a, b, reactor)
    assert a.table.members[b.node_id].name == "gpu-box-2"
    assert b.table.members[a.node_id].name == "gpu-box-1"
    row = a.status_peers()[0]
    assert list(row)[:2] == ["name", "node_id"]  # the name first, the id beside it
    assert (row["name"], row["node_id"]) == ("gpu-box-2", b.node_id)
    assert f"peer gpu-box-2 ({b.node_id}) up (new)" in caplog.text
    # the connection's own log lines name it too, once it announced
    assert a.conns[b.node_id].who.startswith(f"node gpu-box-2 ({b.node_id}) at ")


def test_a_peer_that_sends_no_name_is_shown_by_its_id(tmp_path, reactor, caplog):
    """An older meshd announces no name: it is a member like any other, shown by id."""
    caplog.set_level(logging.INFO, "meshd.mesh")
    a = service(tmp_path, "a", {"name": "new-node", "role": "idle"}, reactor)
    old = service(tmp_path, "old", {"role": "idle"}, reactor, mesh=a.mesh)
    link(a, old, reactor)
    view = a.table.members[old.node_id]
    assert view.name == "" and view.label == old.node_id
    assert a.status_peers()[0]["name"] is None
    assert f"peer {old.node_id} up (new)" in caplog.text
    # and the older node reads ours as it always read announces: an extra field
    assert old.table.members[a.node_id].node_id == a.node_id


def test_a_hostile_name_cannot_forge_a_log_line_or_reach_a_terminal(tmp_path, reactor, caplog):
    caplog.set_level(logging.INFO, "meshd.mesh")
    hostile = "evil\n12:00:00 INFO meshd: forged\x1b[2J\u202e<b>" + "x" * 500
    a = service(tmp_path, "a", {"name": "a", "role": "idle"}, reactor)
    bad = service(tmp_path, "bad", {"name": hostile, "role": "idle"}, reactor, mesh=a.mesh)
    link(a, bad, reactor)
    name = a.table.members[bad.node_id].name
    assert name.startswith("evil12:00:00 INFO meshd: forged[2J<b>xxx")
    assert len(name) == nodename.MAX_CHARS
    assert all(c.isprintable() for c in name)
    up = [r.getMessage() for r in caplog.records
          if "up (new)" in r.getMessage() and bad.node_id in r.getMessage()]
    assert len(up) == 1 and "\n" not in up[0] and "\x1b" not in up[0] and "\u202e" not in up[0]


def test_two_nodes_with_one_name_are_both_members_told_apart_by_id(tmp_path, reactor):
    a = service(tmp_path, "a", {"name": "hub", "role": "idle"}, reactor)
    b = service(tmp_path, "b", {"name": "gpu", "role": "idle"}, reactor, mesh=a.mesh)
    c = service(tmp_path, "c", {"name": "gpu", "role": "idle"}, reactor, mesh=a.mesh)
    link(a, b, reactor)
    link(a, c, reactor)
    rows = a.status_peers()
    assert sorted((r["name"], r["node_id"]) for r in rows) == sorted(
        [("gpu", b.node_id), ("gpu", c.node_id)])
    assert a.table.label(b.node_id) != a.table.label(c.node_id)


def test_members_digests_carry_the_name_for_log_lines_before_the_announce(tmp_path, reactor):
    a = service(tmp_path, "a", {"name": "a", "role": "idle"}, reactor)
    b = service(tmp_path, "b", {"name": "box-b", "role": "idle"}, reactor, mesh=a.mesh)
    link(a, b, reactor)
    entry = _digest_entry(a.table.members[b.node_id])
    assert entry["name"] == "box-b"
    # a third node hearing of b only through a's digest names it in its log lines
    c = service(tmp_path, "c", {"name": "c", "role": "idle"}, reactor, mesh=a.mesh)
    c.table.rumor(b.node_id, 1, ("127.0.0.1:1",), via=a.node_id,
                  name=nodename.clean(entry["name"]))
    assert c.table.label(b.node_id) == f"box-b ({b.node_id})"
    # an older node's digest has no name: the id alone
    no_name = {k: v for k, v in entry.items() if k != "name"}
    assert "name" not in no_name and c.table.label("someone") == "someone"


def test_a_peer_down_event_and_log_line_name_the_node(tmp_path, reactor, caplog):
    caplog.set_level(logging.INFO, "meshd.mesh")
    a = service(tmp_path, "a", {"name": "a", "role": "idle"}, reactor)
    b = service(tmp_path, "b", {"name": "box-b", "role": "idle"}, reactor, mesh=a.mesh)
    events: list = []
    a.add_listener(events.append)
    link(a, b, reactor)
    a.table.lost(b.node_id, "no heartbeat for 6.0 s")
    down = [e for e in events if isinstance(e, PeerDown)]
    assert down == [PeerDown(b.node_id, "no heartbeat for 6.0 s")] and down[0].name == "box-b"
    assert f"peer box-b ({b.node_id}) down: no heartbeat" in caplog.text


@pytest.mark.parametrize("raw, shown", [
    (None, ""), (42, ""), ("", ""), ("   ", ""), ("\x00\x07", ""),
    ("  box 1  ", "box 1"), ("a\tb", "ab"), ("gpu\u2028box", "gpubox"),
    ("名前-ノード", "名前-ノード"),
])
def test_view_from_announce_cleans_the_name(raw, shown):
    body = {"node_id": "n1", "incarnation": 1}
    if raw is not None:
        body["name"] = raw
    assert view_from_announce(body).name == shown
