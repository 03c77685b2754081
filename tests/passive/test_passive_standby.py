"""Standbys, deterministic (Clock, fakes): an idle active node that assignment gives nothing
becomes a standby (leaving the gossip), and a standby whose every active node is gone
decides from its last table."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from twisted.application import service
from twisted.internet.task import Clock

from meshd.config import Config
from meshd.daemon.node import Node, RoleParts
from meshd.daemon.roles import RoleGroup, RoleService, SwitchableRouter
from meshd.daemon.service import Groups
from meshd.daemon.tree import CallbackService
from meshd.mesh import identity as identitymod
from meshd.mesh import wire
from meshd.mesh.desired import Want
from meshd.passive import node as passivemod
from meshd.placement.election import Rebalancer
from meshd.placement.snapshot import GB
from meshd.serving.routetable import CheckIn, NodeEntry, PassiveRegistry, RouteTable
from meshd.statedir import KnownNode, MeshState, StateDir
from meshd.states import Role
from tests.passive.test_passive import (
    IDS,
    Dialer,
    M,
    StandbyNode,
    entry,
    make_token,
    node,
    route_client,
    table,
)

# -- a standby whose every active node is gone --------------------------------------------------


def checked_in(i: int, vram_gb: float, promoted: list, last, ids=IDS):
    """Standby ``ids[i]`` checked in with the token's issuer (IDS[0]) and holds ``last``;
    ``ids[i]`` is its identity's node id when given (``idents``)."""
    dialer = Dialer()
    cfg = Config().replace("node", standby=True)
    ident = ids[i] if not isinstance(ids[i], str) else identitymod.ephemeral()
    nid = ident.node_id if not isinstance(ids[i], str) else IDS[i]
    p = passivemod.PassiveNode(cfg, StandbyNode(nid, vram_gb), ident, None,
                               reactor=Clock(), endpoint_for=lambda d, nid, m: None,
                               on_promote=lambda model, why: promoted.append((nid, model)),
                               connect_fn=dialer, random=lambda: 0.5)  # no jitter
    c = p.client
    c.mesh = MeshState("mesh1", b"s" * 32)
    c.tokens = [make_token(IDS[0])]
    c.start()
    conn = dialer.succeed(c)
    conn.answer(last.to_body())
    return p, c, dialer, conn


def fail_round(dialer: Dialer) -> list[str]:
    tried = []
    while dialer.attempts and not dialer.attempts[-1][2].called and len(tried) < 10:
        tried.append(dialer.attempts[-1][0].node_id)
        dialer.fail()
    return tried


def test_a_standby_whose_only_active_node_died_promotes_from_its_last_table():
    promoted: list = []
    last = table(node(0, serving=["m1"]), standby=[entry(1, 16), entry(2, 24)])
    runs = [checked_in(i, gb, promoted, last) for i, gb in ((1, 16), (2, 24))]
    assert promoted == []  # m1 has a host
    for _, c, dialer, conn in runs:
        conn.close("connection lost")  # the host (the only active node) was killed
        # the lost node is not tried again in this round, and nothing else is left: a lost
        # connection alone is no proof, so nobody decides yet
        assert fail_round(dialer) == [] and c.all_unreachable() is False
    assert promoted == []
    for _, c, dialer, _conn in runs:
        c.reactor.advance(1.01)  # the back-off: a new round, the host dialled again
        assert fail_round(dialer) == [IDS[0]]
        assert c.all_unreachable() is True
    # both decided from the same last table: only the one with more VRAM promotes
    assert promoted == [(IDS[2], "m1")]
    winner, loser = runs[1][0], runs[0][0]
    assert winner.promotion["because"] == "every active node is unreachable"
    assert winner.promotion["table"] == last.etag and loser.promotion is None
    # the loser keeps trying (the winner is active now) and never promotes for m1 too
    c, dialer = runs[0][1], runs[0][2]
    for _ in range(3):
        c.reactor.advance(60.0)
        fail_round(dialer)
    assert promoted == [(IDS[2], "m1")]


def test_no_decision_from_the_last_table_while_another_active_node_answers():
    promoted: list = []
    last = table(node(0, serving=["m1"]), node(3), standby=[entry(1, 16)])
    p, c, dialer, conn = checked_in(1, 16, promoted, last)
    conn.close("connection lost")
    assert fail_round(dialer) == [IDS[3]]  # the other active node refused too ...
    c.reactor.advance(1.01)
    assert dialer.attempts[-1][0].node_id == IDS[0]
    dialer.fail()  # ... the host as well, but then the other active node answers
    nxt = dialer.succeed(c)
    assert c.all_unreachable() is False and promoted == []
    # its table says m1 is served elsewhere: the check-ins go on, the failures forgotten
    nxt.answer(table(node(3, serving=["m1"]), standby=[entry(1, 16)], etag="t.2").to_body())
    assert c._unreached == set() and promoted == []


def test_a_client_never_decides_anything_when_every_active_node_is_gone():
    cfg = Config().replace("node", client=True)
    p = passivemod.PassiveNode(cfg, None, identitymod.ephemeral(), None, reactor=Clock(),
                               endpoint_for=lambda d, nid, m: None, connect_fn=Dialer())
    p.client.table = table(node(0, serving=["m1"]))
    p._on_unreachable("all gone")
    assert p.promotion is None


def test_the_token_issuer_counts_in_the_full_round():
    promoted: list = []
    last = table(node(0, serving=["m1"]), standby=[entry(1, 16)])
    p, c, dialer, conn = checked_in(1, 16, promoted, last)
    c.tokens.append(make_token(IDS[7]))  # a second bootstrap token, of another node
    conn.close("connection lost")
    assert fail_round(dialer) == [IDS[7]]
    assert promoted == []
    c.reactor.advance(1.01)
    assert fail_round(dialer) == [IDS[0], IDS[7]]
    assert promoted == [(IDS[1], "m1")]


# -- standbys are findable: a passive node whose every active node is gone dials them ------------


def addressed(i: int, vram_gb: float, ids=IDS) -> NodeEntry:
    """A standby entry that says where it listens once promoted, as every standby now does."""
    nid = ids[i] if isinstance(ids[i], str) else ids[i].node_id
    return NodeEntry(nid, "standby", int(vram_gb * GB), (f"127.0.0.1:{7000 + i}",),
                     available_models=(M,))


def idents(n: int) -> list:
    """The host's id (IDS[0]), then ``n`` real identities (a standby never dials itself: its
    identity's node id must be its entry's)."""
    return [IDS[0], *(identitymod.ephemeral() for _ in range(n))]


def test_standby_entries_carry_where_the_standby_listens_once_promoted():
    r = PassiveRegistry()
    req = CheckIn("standby", None, 10.0, 16 * GB, (M,), ("127.0.0.1:7003",))
    assert CheckIn.from_body(json.loads(wire.dump_json(req.to_body()))) == req
    assert r.check_in("s", IDS[3], req, now=0)
    t = table(node(0, serving=["m1"]), standby=r.standbys())
    body = json.loads(wire.dump_json(t.to_body()))
    assert body["standby"][0]["addrs"] == ["127.0.0.1:7003"]
    assert RouteTable.from_body(body).standby_addrs() == [(IDS[3], ("127.0.0.1:7003",))]
    # a standby of an older version says nothing: listed, but not dialled
    assert CheckIn.from_body({"kind": "standby", "vram_bytes": GB}).addrs == ()


def test_a_standby_checks_in_with_its_listen_address():
    dialer = Dialer()
    cfg = Config().replace("node", standby=True).replace("mesh", listen="127.0.0.1:7011")
    p = passivemod.PassiveNode(cfg, StandbyNode(IDS[1], 16), identitymod.ephemeral(), None,
                               reactor=Clock(), endpoint_for=lambda d, nid, m: None,
                               connect_fn=dialer)
    p.client.mesh = MeshState("mesh1", b"s" * 32)
    p.client.tokens = [make_token(IDS[0])]
    p.client.start()
    conn = dialer.succeed(p.client)
    assert conn.sent[0][1]["addrs"] == ["127.0.0.1:7011"]
    # port 0 is chosen only when it listens: nothing to say
    cfg0 = cfg.replace("mesh", listen="127.0.0.1:0")
    assert passivemod.promoted_addrs(cfg0) == ()
    assert passivemod.promoted_addrs(cfg0.replace("mesh", advertise=["10.1.2.3:7842"])) == (
        "10.1.2.3:7842",)


def test_a_client_whose_last_active_node_died_checks_in_with_the_standby_that_took_over():
    """No second active node: the client's round goes to the standby of its last table,
    which refuses while it still stands by and answers once promoted."""
    c, clock, dialer, tables = route_client(tokens_=[make_token(IDS[0])])
    c.start()
    first = dialer.succeed(c)
    first.answer(table(node(0, serving=["m1"]), standby=[addressed(1, 16)]).to_body())
    first.close("connection lost")  # kill -9 of the only active node
    target = dialer.attempts[-1][0]
    assert target.node_id == IDS[1] and target.standby and target.addrs == ("127.0.0.1:7001",)
    dialer.fail()  # not promoted yet: nothing listens there
    clock.advance(1.01)
    assert [t.node_id for t, _, d in dialer.attempts if not d.called] == [IDS[0]]
    dialer.fail()  # the dead host again
    assert dialer.attempts[-1][0].node_id == IDS[1]
    conn = dialer.succeed(c)  # promoted: it is an active node now, with the mesh secret
    assert dialer.attempts[-1][1].token_id is None and dialer.attempts[-1][1].key == b"s" * 32
    assert c.via == IDS[1] and conn.sent[0][1]["kind"] == "client"
    conn.answer(table(node(1, serving=["m1"]), etag="t.2").to_body())
    assert [h.node_id for h in c.table.hosts_of("m1")] == [IDS[1]]
    assert c.all_unreachable() is False


def test_a_standby_that_lost_the_tie_break_finds_the_winner():
    promoted: list = []
    ids = idents(2)
    s1, s2 = ids[1].node_id, ids[2].node_id
    last = table(node(0, serving=["m1"]), standby=[addressed(1, 16, ids), addressed(2, 24, ids)])
    runs = [checked_in(i, gb, promoted, last, ids) for i, gb in ((1, 16), (2, 24))]
    for other, (_, c, dialer, conn) in zip((s2, s1), runs, strict=True):
        conn.close("connection lost")
        # the round after a lost connection: the other standby (not promoted: refused)
        assert fail_round(dialer) == [other]
        c.reactor.advance(1.01)
    (winner, _, winner_dialer, _), (loser, c, dialer, _) = runs[1], runs[0]
    # the winner decides once the host failed, before dialling the other standby
    assert winner_dialer.attempts[-1][0].node_id == IDS[0]
    winner_dialer.fail()
    assert promoted == [(s2, "m1")]
    # (decided while the dial to the other standby is still pending)
    assert winner_dialer.attempts[-1][0].node_id == s1 and not winner_dialer.attempts[-1][2].called
    assert winner.promotion["because"] == "every active node is unreachable"
    # the loser: the host fails, then it dials the other standby -- the winner, which answers
    assert dialer.attempts[-1][0].node_id == IDS[0]
    dialer.fail()
    assert promoted == [(s2, "m1")] and loser.promotion is None
    target = dialer.attempts[-1][0]
    assert target.node_id == s2 and target.addrs == ("127.0.0.1:7002",)
    conn = dialer.succeed(c)
    assert c.via == s2 and conn.sent[0][1]["kind"] == "standby"
    now_active = NodeEntry(s2, "host", 24 * GB, ("127.0.0.1:7002",), ("m1",))
    conn.answer(table(now_active, standby=[addressed(1, 16, ids)], etag="t.2").to_body())
    assert loser.promotion is None and promoted == [(s2, "m1")]
    assert [n.node_id for n in c.table.active_nodes] == [s2]


# -- an idle active node that assignment gives nothing becomes a standby ------------------------


class FakeMeshService(service.Service):
    """What the role change reads of ``meshd.mesh.gossip.MeshService``; stopping it is leaving."""

    name = "mesh"

    def __init__(self, identity: Any, state: StateDir, peers: list[Any]):
        self.identity = identity
        self.state = state
        self.node_id = identity.node_id
        self.mesh_id = "mesh1"
        self._peers = peers
        self.left = False

    def peers(self) -> list[Any]:
        return list(self._peers)

    def local_changed(self) -> None:
        pass

    def stopService(self):  # noqa: N802
        super().stopService()
        self.left = True  # MeshService.stopService sends LEAVING to every peer


def peer(i: int, serving=(), loading=(), waiting=()) -> Any:
    return SimpleNamespace(node_id=IDS[i], role="host" if serving else "idle",
                           vram_bytes=8 * GB, serving=list(serving), loading=list(loading),
                           waiting=list(waiting), available_models=[], requested_models=[],
                           rtt_ms=1.0, addrs=[f"127.0.0.1:{7000 + i}"], name=f"box-{i}")


class FakedGroups:
    """The daemon's groups with the mesh faked: the active group is a fake mesh, a
    tunnels step that records its closing and the real election; the passive group is
    the daemon's own (``meshd.daemon.service.Groups.passive``)."""

    def __init__(self, node: Node, ident: Any, state: StateDir, clock: Clock, peers: list):
        self.node, self.ident, self.state, self.clock, self.peers = node, ident, state, clock, peers
        self.daemon = Groups(node.config, node, ident, state, reactor=clock, backends=None,
                             notifier=None)
        self.closed: list[bool] = []
        self.mesh: FakeMeshService | None = None

    def active(self, roles: RoleService) -> RoleGroup:
        self.mesh = FakeMeshService(self.ident, self.state, list(self.peers))
        rebalancer = Rebalancer(self.node, reactor=self.clock, start=lambda m: None,
                                stop=lambda m: None, unassigned=roles.unassigned)
        return RoleGroup(
            "active", [CallbackService("tunnels", on_stop=lambda: self.closed.append(True)),
                       CallbackService("election", on_stop=rebalancer.stop), self.mesh],
            router="the mesh router", facing=("mesh",),
            parts=RoleParts(mesh=self.mesh, rebalancer=rebalancer))

    def passive(self, roles: RoleService, reason: str | None) -> RoleGroup:
        return self.daemon.passive(roles, reason)


def active_idle(tmp_path, *, vram_gb=8.0, models=(M,), peers=()):
    clock = Clock()
    cfg = Config().replace("node", state_dir=str(tmp_path))
    ident = identitymod.ephemeral()
    n = Node(cfg, reactor=clock, node_id=ident.node_id, vram_bytes=int(vram_gb * GB))
    n.scan = SimpleNamespace(models={m.name: m for m in models}, problems=[])
    state = StateDir(tmp_path)
    state.ensure()
    state.save_mesh(MeshState("mesh1", b"s" * 32))
    state.save_peers([], [KnownNode(p.node_id, tuple(p.addrs)) for p in peers])
    groups = FakedGroups(n, ident, state, clock, list(peers))
    statuses: list[str] = []
    router = SwitchableRouter()
    roles = RoleService(n, router, groups, reactor=clock, serve=lambda *a: None,
                        status=statuses.append)
    roles.startService()
    roles.enter()
    return SimpleNamespace(roles=roles, node=n, mesh=groups.mesh, clock=clock, groups=groups,
                           router=router, statuses=statuses)


def test_an_idle_node_assignment_gives_nothing_leaves_the_gossip_and_checks_in(tmp_path,
                                                                              monkeypatch):
    dialer = Dialer()
    monkeypatch.setattr(passivemod.RouteClient, "_dial", lambda self, t, a: dialer(t, a))
    # every model it has is too big for it (1 GB x 1.1 > 1 GB): nothing fits
    t = active_idle(tmp_path, vram_gb=1.0, peers=[peer(0, serving=["m1"])])
    n, mesh = t.node, t.mesh
    assert n.role == "idle" and t.router.target == "the mesh router"
    election = n.rebalancer
    assert election.assign() is None
    assert mesh.left and n.mesh is None and n.route_server is None and t.groups.closed
    p = n.passive
    assert isinstance(p, passivemod.PassiveNode) and p.kind == "standby" and p.running
    assert n.role == "standby" and n.status()["role"] == "standby"
    assert n.roles.moves == [(Role.IDLE, Role.STANDBY)]
    assert "assignment gave it nothing" in n.status()["route"]["reason"]
    assert t.router.target is p.router
    # same identity and mesh secret; the peers it knew are where it checks in
    assert p.client.node_id == n.node_id and p.client.mesh == MeshState("mesh1", b"s" * 32)
    assert [t.node_id for t in p.client.targets()] == [IDS[0]]
    (target, auth, _), = dialer.attempts
    assert target.node_id == IDS[0] and auth.token_id is None and auth.key == b"s" * 32
    conn = dialer.succeed(p.client)
    assert conn.sent[0][1]["kind"] == "standby" and conn.sent[0][1]["vram_bytes"] == GB
    assert p.on_promote is not None  # it promotes when a model on its disk loses its host
    assert t.statuses and t.statuses[-1].startswith("standby (passive)")
    # a later assignment round does nothing: it is no longer in the gossip
    assert election.assign() is None and n.passive is p and n.rebalancer is None
    t.roles.leave()
    t.roles.stopService()
    assert not p.running
    t.clock.advance(120)


def test_an_idle_node_stays_active_when_it_cannot_be_a_standby(tmp_path):
    cases = {
        "no other member serves anything (someone must stay active)":
            dict(vram_gb=1.0, peers=[peer(0)]),
        "no VRAM": dict(vram_gb=0.0, peers=[peer(0, serving=["m1"])]),
        "no models on disk": dict(vram_gb=1.0, models=(), peers=[peer(0, serving=["m1"])]),
    }
    for i, (why, kw) in enumerate(cases.items()):
        t = active_idle(tmp_path / str(i), **kw)
        n = t.node
        assert n.rebalancer.assign() is None, why
        assert not t.mesh.left and n.passive is None and n.role == "idle", why
        t.roles.stopService()


def test_an_idle_node_assignment_gives_a_model_serves_it_as_today(tmp_path):
    t = active_idle(tmp_path, vram_gb=8.0, peers=[peer(0, serving=["m1"])])
    n = t.node
    assert n.rebalancer.assign() == "m1"  # least-served model on disk
    assert not t.mesh.left and n.passive is None
    t.roles.stopService()


def test_a_node_whose_model_was_dropped_neither_stands_by_nor_promotes_for_it(tmp_path):
    t = active_idle(tmp_path, vram_gb=8.0, peers=[peer(0, serving=["m2"])])
    n = t.node
    n.desired.decide("m1", Want.DROPPED, by="x")  # meshctl drop m1: its only model on disk
    assert n.rebalancer.assign() is None
    assert not t.mesh.left and n.passive is None and n.role == "idle"
    t.roles.stopService()
    promoted: list = []
    p, c, dialer, conn = checked_in(1, 16, promoted, table(node(0, serving=["m1"]),
                                                           standby=[entry(1, 16)]))
    p.node.dropped = {"m1"}  # then m1 is dropped mesh-wide: its host stops it
    conn.answer(table(node(0, "idle"), standby=[entry(1, 16)], etag="t.2").to_body())
    assert promoted == []  # m1 has no host, but it was dropped


def test_a_peer_loading_or_waiting_counts_as_staying_active(tmp_path):
    for i, kw in enumerate(({"loading": ["m9"]}, {"waiting": ["m9"]})):
        t = active_idle(tmp_path / str(i), vram_gb=1.0, peers=[peer(0, **kw)])
        assert passivemod.standby_reason(t.node, "nothing fits") is not None
        t.roles.stopService()
