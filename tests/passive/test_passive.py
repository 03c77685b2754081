"""Passive nodes, deterministic: the routing table, the answer cache, check-in order and
failover, refresh timing, host selection spread, the promotion tie-break (Clock, fakes)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.config import Config
from meshd.mesh import identity as identitymod
from meshd.mesh import tokens, wire
from meshd.mesh.desired import DesiredState
from meshd.mesh.peer import PeerClosed, PeerState, Timing
from meshd.mesh.wire import FrameType
from meshd.passive.client import RouteClient, Target
from meshd.passive.node import PassiveNode
from meshd.passive.router import PassiveRouter
from meshd.passive.server import RouteServer
from meshd.placement.snapshot import GB, ModelFile, NodeView
from meshd.serving import routing
from meshd.serving.routetable import (
    Answers,
    CheckIn,
    NodeEntry,
    PassiveRegistry,
    RouteTable,
    StandbyMemory,
    build_table,
    checkin_order,
    table_view,
)
from meshd.statedir import MeshState

IDS = [f"{c}" * 26 for c in "abcdefgh"]  # valid-looking node ids, sorted
M = ModelFile("m1", 1 * GB)


def node(i: int, role: str = "host", *, serving=(), loading=(), vram_gb=8.0, models=()) -> NodeEntry:
    return NodeEntry(IDS[i], role, int(vram_gb * GB), (f"127.0.0.1:{7000 + i}",),
                     tuple(serving), tuple(loading), tuple(models))


def table(*nodes: NodeEntry, standby=(), etag="t.1.1") -> RouteTable:
    t = build_table(mesh_id="mesh1", source=nodes[0].node_id if nodes else "x", nodes=nodes,
                    standby=standby)
    return RouteTable(etag, t.mesh_id, t.source, t.hosts, t.active_nodes, t.standby)


# -- the table -------------------------------------------------------------------------------


def test_table_round_trips_through_its_json_body():
    t = table(node(0, serving=["m1"], models=[M]), node(1, "idle", loading=["m2"]),
              standby=[NodeEntry(IDS[2], "standby", 16 * GB, available_models=(M,))])
    body = json.loads(wire.dump_json(t.to_body()))
    assert RouteTable.from_body(body) == t


def test_table_lists_loading_hosts_apart_and_leaves_out_split_workers():
    t = table(node(0, serving=["m1"]), node(1, "idle", loading=["m1"]),
              node(2, "worker", serving=["m1"]))
    assert [h.node_id for h in t.hosts_of("m1")] == [IDS[0]]
    assert [(h.node_id, h.state) for h in t.hosts_of("m1", state=None)] == [
        (IDS[0], "warm"), (IDS[1], "loading")]
    assert t.models() == ["m1"]


def test_a_standby_that_is_active_now_is_not_listed_as_standby():
    t = table(node(0, serving=["m1"]), standby=[NodeEntry(IDS[0], "standby", GB)])
    assert t.standby == ()


@pytest.mark.parametrize("body, what", [
    ({"etag": "x", "mesh_id": "m", "source": "s", "hosts": {}}, "'hosts' is not a list"),
    ({"etag": 1, "mesh_id": "m", "source": "s"}, "'etag'"),
    ({"etag": "x", "mesh_id": "m", "source": "s", "hosts": [{"model": "a", "node_id": "n",
                                                              "addrs": [1]}]}, "non-string"),
    ({"etag": "x", "mesh_id": "m", "source": "s", "active_nodes": ["x"]}, "not an object"),
])
def test_a_malformed_table_is_refused_with_the_reason(body, what):
    with pytest.raises(ValueError, match=what):
        RouteTable.from_body(body)


def test_checkin_body_round_trips_and_bad_kinds_are_refused():
    req = CheckIn("standby", "e", 30.0, 8 * GB, (M,))
    assert CheckIn.from_body(json.loads(wire.dump_json(req.to_body()))) == req
    assert CheckIn.from_body({"kind": "client"}) == CheckIn("client")
    with pytest.raises(ValueError, match="kind"):
        CheckIn.from_body({"kind": "host"})
    with pytest.raises(ValueError, match="refresh_s"):
        CheckIn.from_body({"kind": "client", "refresh_s": 0})


# -- the answer cache ------------------------------------------------------------------------


def test_answers_are_built_once_per_change_and_the_bytes_reused():
    builds = []
    content = {"serving": ["m1"]}

    def build():
        builds.append(1)
        return table(node(0, serving=content["serving"]))

    a = Answers("src", 3, build)
    first = a.answer(None)
    for _ in range(1000):
        assert a.answer(None) is first  # the same object: nothing built per request
    assert len(builds) == 1
    etag = a.etag
    assert etag == "src.3.1"
    assert json.loads(a.answer(etag)) == {"etag": etag, "same": True}
    a.invalidate()  # an event that changed nothing keeps the etag
    assert a.answer(etag) == a.same and a.etag == etag and len(builds) == 2
    content["serving"] = ["m2"]
    a.invalidate()
    body = json.loads(a.answer(etag))
    assert a.etag == "src.3.2" and body["etag"] == "src.3.2" and body["hosts"][0]["model"] == "m2"


def test_registry_counts_passive_nodes_while_their_check_ins_are_recent():
    r = PassiveRegistry()
    assert r.check_in("c1", IDS[0], CheckIn("client", refresh_s=10), now=0) is False
    assert r.check_in("c2", IDS[1], CheckIn("client", refresh_s=10), now=0) is False
    assert r.check_in("s1", IDS[2], CheckIn("standby", refresh_s=10, vram_bytes=GB), now=0)
    assert r.counts(0) == {"clients": 2, "standby": 1}
    r.check_in("c1", IDS[0], CheckIn("client", refresh_s=10), now=25)
    assert r.counts(30) == {"clients": 2, "standby": 1}  # 3 x 10 s
    assert r.counts(31) == {"clients": 1, "standby": 0}
    assert sorted(r.expired(31)) == ["c2", "s1"]
    # a standby checking in with the same facts changes nothing; new facts do
    assert not r.check_in("s1", IDS[2], CheckIn("standby", refresh_s=10, vram_bytes=GB), now=31)
    assert r.check_in("s1", IDS[2], CheckIn("standby", refresh_s=10, vram_bytes=2 * GB), now=32)
    assert [s.vram_bytes for s in r.standbys()] == [2 * GB]
    assert r.drop("s1") is True and r.drop("c1") is False and r.standbys() == ()
    assert r.requests == 6


# -- where a passive node checks in ------------------------------------------------------------


def test_standbys_all_check_in_with_the_lowest_node_id_then_the_rest_in_order():
    active = [IDS[3], IDS[1], IDS[2]]
    for me in IDS[4:]:
        assert checkin_order(active, me, "standby") == [IDS[1], IDS[2], IDS[3]]


def test_clients_spread_over_active_nodes_and_wrap_around():
    active = IDS[:4]
    firsts = Counter(checkin_order(active, f"client-{i}", "client")[0] for i in range(4000))
    assert set(firsts) == set(active)
    for n in active:
        assert abs(firsts[n] - 1000) < 150, firsts
    order = checkin_order(active, "client-7", "client")
    i = active.index(order[0])
    assert order == active[i:] + active[:i]
    assert checkin_order([], "x", "client") == []


# -- host selection on a passive node ------------------------------------------------------------


def router_with(t: RouteTable) -> PassiveRouter:
    r = PassiveRouter(IDS[7], endpoint_for=lambda nid, model: (nid, model), started_at=0)
    r.update(t)
    return r


def test_hash_selection_spreads_clients_over_hosts_within_a_tolerance():
    r = router_with(table(*(node(i, serving=["m1"]) for i in range(5))))
    picks = Counter(r.upstreams("m1", f"user-{i}")[0].name for i in range(10000))
    assert set(picks) == set(IDS[:5])
    for n in IDS[:5]:
        assert abs(picks[n] - 2000) < 200, picks
    # deterministic: the same client always gets the same host, on any node
    again = router_with(table(*(node(i, serving=["m1"]) for i in range(5))))
    assert all(r.upstreams("m1", f"u{i}")[0].name == again.upstreams("m1", f"u{i}")[0].name
               for i in range(200))


def test_failover_goes_to_another_host_and_a_failed_host_is_avoided_until_the_next_table():
    t = table(node(0, serving=["m1"]), node(1, serving=["m1"]), node(2, serving=["m1"]))
    failures = []
    r = PassiveRouter(IDS[7], endpoint_for=lambda nid, m: (nid, m),
                      on_failure=lambda nid, why: failures.append(nid), started_at=0)
    r.update(t)
    ups = r.upstreams("m1", "alice")
    assert len(ups) == 2 and ups[0].name != ups[1].name
    assert ups[0].endpoint() == (ups[0].name, "m1")
    r.upstream_failed(ups[0], "refused")
    assert failures == [ups[0].name]
    assert ups[0].name not in [u.name for u in r.upstreams("m1", "alice")]
    r.update(t)  # a fresh table: everyone gets a new chance
    assert r.upstreams("m1", "alice")[0].name == ups[0].name


def test_unknown_model_is_404_a_loading_one_503_and_no_table_yet_503():
    r = PassiveRouter(IDS[7], endpoint_for=lambda nid, m: None, started_at=0)
    with pytest.raises(routing.NotReady):
        r.upstreams("m1", "c")
    r.update(table(node(0, serving=["m1"]), node(1, "idle", loading=["m2"])))
    with pytest.raises(routing.UnknownModel) as e:
        r.upstreams("nope", "c")
    assert e.value.known == ["m1", "m2"]
    with pytest.raises(routing.NotReady):
        r.upstreams("m2", "c")
    assert [(m["id"], m["meshd"]["state"]) for m in r.models()] == [("m1", "warm"), ("m2", "loading")]


# -- the route client: fallback order, refresh timing ---------------------------------------------


class FakeConn:
    """Stands in for an open PeerProtocol on the passive side."""

    def __init__(self, client: RouteClient, node_id: str):
        self.client = client
        self.node_id = node_id
        self.peer_address = f"addr-of-{node_id}"
        self.state = PeerState.OPEN
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.closed_with: str | None = None

    def send_json(self, frame_type: int, body: dict[str, Any]) -> None:
        self.sent.append((frame_type, body))

    def close(self, reason: str, *, code: Any = None, notify: bool = True,
              abort: bool = False) -> None:
        if self.state is PeerState.CLOSED:
            return
        self.state = PeerState.CLOSED
        self.closed_with = reason
        self.client.peer_closed(self, reason)

    def answer(self, body: dict[str, Any]) -> None:
        self.client.peer_frame(self, wire.Frame(FrameType.ROUTE_TABLE, wire.dump_json(body)))


class Dialer:
    """The connect seam: records every attempt; the test decides each outcome."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Target, Any, defer.Deferred]] = []

    def __call__(self, target: Target, auth: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.attempts.append((target, auth, d))
        return d

    def succeed(self, client: RouteClient) -> FakeConn:
        target, _, d = self.attempts[-1]
        conn = FakeConn(client, target.node_id)
        d.callback(conn)
        return conn

    def fail(self, why: str = "connection refused") -> None:
        self.attempts[-1][2].errback(PeerClosed(why))


def make_token(issuer: str = IDS[6]) -> tokens.Token:
    return tokens.Token("mesh1", "ab12cd34", issuer, b"p" * 32, ("127.0.0.1:9",), 4e9, False,
                        b"k" * 32)


def route_client(kind="client", *, mesh=True, tokens_=(), refresh_s=30.0):
    clock = Clock()
    dialer = Dialer()
    tables: list[RouteTable] = []
    c = RouteClient(reactor=clock, identity=identitymod.ephemeral(), kind=kind,
                    checkin=lambda etag: CheckIn(kind, etag, refresh_s),
                    timing=Timing(handshake_timeout_s=5.0), refresh_s=refresh_s,
                    answer_timeout_s=5.0, rejoin_max_s=60.0,
                    mesh=MeshState("mesh1", b"s" * 32) if mesh else None,
                    tokens=list(tokens_), on_table=tables.append, connect_fn=dialer,
                    random=lambda: 0.5)
    return c, clock, dialer, tables


def test_first_check_in_goes_through_the_token_and_proves_its_key():
    tok = make_token()
    c, clock, dialer, tables = route_client(mesh=False, tokens_=[tok])
    c.start()
    target, auth, _ = dialer.attempts[0]
    assert target.node_id == tok.issuer and auth.token_id == tok.token_id
    assert auth.key == tok.key and auth.pin == tok.pin
    conn = dialer.succeed(c)
    assert conn.sent[0][0] == FrameType.ROUTE_REQUEST and conn.sent[0][1]["kind"] == "client"
    c.peer_frame(conn, wire.Frame(FrameType.WELCOME, wire.dump_json(
        {"mesh_id": "mesh1", "secret": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"})))
    assert c.mesh == MeshState("mesh1", b"secret" * 6)
    conn.answer(table(node(0, serving=["m1"])).to_body())
    assert len(tables) == 1 and c.table_at == 0


def test_an_unreachable_active_node_moves_to_the_next_of_the_last_table_then_the_tokens():
    tok = make_token()
    c, clock, dialer, tables = route_client(tokens_=[tok])
    c.start()
    first = dialer.succeed(c)  # the token's issuer, with the mesh secret (we have it)
    assert dialer.attempts[0][1].token_id is None
    first.answer(table(node(0, serving=["m1"]), node(1), node(2), etag="e1").to_body())
    order = checkin_order(IDS[:3], c.node_id, "client")
    first.close("connection lost")

    def fail_round() -> list[str]:
        tried = []
        while not dialer.attempts[-1][2].called and len(tried) < 10:
            tried.append(dialer.attempts[-1][0].node_id)
            dialer.fail()
        return tried

    # the active nodes of the last table in check-in order; the node just lost is not
    # tried again in this round (here it is also the token's issuer)
    assert fail_round() == order
    assert c.conn is None
    # every one failed: back off 1 s (jitter fixed at 0), then a new round, the token last
    n = len(dialer.attempts)
    clock.advance(0.99)
    assert len(dialer.attempts) == n
    clock.advance(0.02)
    assert fail_round() == order + [tok.issuer]
    clock.advance(2.01)  # doubled
    target = dialer.attempts[-1][0]
    assert target.node_id == order[0]
    dialer.succeed(c).answer(table(node(0, serving=["m1"]), etag="e2").to_body())
    assert c.via == order[0] and [t.etag for t in tables] == ["e1", "e2"]


def test_refresh_every_refresh_s_with_the_etag_and_a_silent_node_is_left():
    c, clock, dialer, tables = route_client(tokens_=[make_token()], refresh_s=30.0)
    c.start()
    conn = dialer.succeed(c)
    t = table(node(6, serving=["m1"]), node(0), etag="e1")  # answered by the node dialled
    assert conn.sent[0][1].get("etag") is None
    conn.answer(t.to_body())
    assert len(conn.sent) == 1
    clock.advance(29.9)
    assert len(conn.sent) == 1
    clock.advance(0.2)
    assert len(conn.sent) == 2
    assert conn.sent[-1][1]["etag"] == "e1"  # "I have e1": the answer is a few bytes
    conn.answer({"etag": "e1", "same": True})
    assert len(tables) == 1 and c.table_at == clock.seconds()
    clock.advance(30)  # asked again, and no answer within answer_timeout_s
    clock.advance(5.01)
    assert conn.closed_with and "no routing table" in conn.closed_with
    assert len(dialer.attempts) == 2 and dialer.attempts[-1][0].node_id == IDS[0]


def test_a_failed_tunnel_asks_for_the_table_at_once():
    c, clock, dialer, tables = route_client(tokens_=[make_token()])
    c.start()
    conn = dialer.succeed(c)
    conn.answer(table(node(0, serving=["m1"])).to_body())
    c.dialer().peer_unreachable(IDS[0], "refused")
    assert len(conn.sent) == 2  # without waiting for the refresh
    c.refresh_now("again")  # one request in flight is enough
    assert len(conn.sent) == 2


def test_a_pushed_table_is_taken_without_a_request():
    c, clock, dialer, tables = route_client(tokens_=[make_token()])
    c.start()
    conn = dialer.succeed(c)
    conn.answer(table(node(0, serving=["m1"]), etag="e1").to_body())
    conn.answer(table(node(0, serving=["m1", "m2"]), etag="e2").to_body())
    assert [t.etag for t in tables] == ["e1", "e2"] and len(conn.sent) == 1


# -- promotion ------------------------------------------------------------------------------------


class StandbyNode:
    """What PassiveNode reads of the daemon's Node."""

    def __init__(self, node_id: str, vram_gb: float, models=(M,)):
        self._view = NodeView(node_id, role="standby", vram_bytes=int(vram_gb * GB),
                              available_models=tuple(models))
        self.dropped: set[str] = set()
        self.learnt: list = []

    def node_view(self) -> NodeView:
        return self._view

    def learn_desired(self, decisions, via: str) -> None:
        self.learnt.append((via, list(decisions)))
        self.dropped |= {d.model for d in decisions if d.want == "dropped"}


def standby(i: int, vram_gb: float, promoted: list, models=(M,)) -> PassiveNode:
    ident = identitymod.ephemeral()
    cfg = Config().replace("node", standby=True)
    p = PassiveNode(cfg, StandbyNode(IDS[i], vram_gb, models), ident, None, reactor=Clock(),
                    on_promote=lambda model, why: promoted.append((IDS[i], model)),
                    endpoint_for=lambda d, nid, m: None, connect_fn=Dialer())
    return p


def entry(i: int, vram_gb: float, models=(M,)) -> NodeEntry:
    return NodeEntry(IDS[i], "standby", int(vram_gb * GB), available_models=tuple(models))


def test_of_two_standbys_only_the_one_with_more_vram_promotes_for_an_orphan():
    promoted: list = []
    s1, s2 = standby(1, 16, promoted), standby(2, 24, promoted)
    # the host of m1 died: the table lists m1 on disk nowhere served
    t = table(node(0, "idle"), standby=[entry(1, 16), entry(2, 24)])
    for s in (s1, s2):
        s.consider_promotion(t)
    assert promoted == [(IDS[2], "m1")]


def test_equal_vram_the_lower_node_id_promotes():
    promoted: list = []
    s1, s2 = standby(2, 16, promoted), standby(1, 16, promoted)
    t = table(node(0, "idle"), standby=[entry(1, 16), entry(2, 16)])
    for s in (s1, s2):
        s.consider_promotion(t)
    assert promoted == [(IDS[1], "m1")]


def test_no_promotion_while_the_model_has_a_host_or_one_is_loading_it():
    promoted: list = []
    s = standby(1, 16, promoted)
    s.consider_promotion(table(node(0, serving=["m1"]), standby=[entry(1, 16)]))
    # the winner of last round is active now and loading m1: nobody else promotes
    s.consider_promotion(table(node(0, "idle"), node(2, "host", loading=["m1"]),
                               standby=[entry(1, 16)]))
    assert promoted == []
    s.consider_promotion(table(node(0, "idle"), standby=[entry(1, 16)]))
    assert promoted == [(IDS[1], "m1")]
    s.consider_promotion(table(node(0, "idle"), standby=[entry(1, 16)]))
    assert len(promoted) == 1  # once


def test_a_model_that_does_not_fit_is_not_promoted_for():
    promoted: list = []
    s = standby(1, 1.0, promoted)  # 1 GB < 1 GB x 1.1
    s.consider_promotion(table(node(0, "idle"), standby=[entry(1, 1.0)]))
    assert promoted == []


def test_a_standby_that_moved_to_another_active_node_remembers_the_other_standbys():
    """S2 (bigger) had checked in with A0, which died; S1 reaches A1 first: A1 lists only S1,
    but S1 still knows S2 from its last table and does not promote."""
    promoted: list = []
    s1 = standby(1, 16, promoted)
    before = table(node(0, serving=["m1"]), node(3), standby=[entry(1, 16), entry(2, 24)])
    s1.consider_promotion(before)
    after = table(node(3, "idle"), standby=[entry(1, 16)], etag="t.2")
    s1.consider_promotion(after)
    assert promoted == []
    mem = StandbyMemory(keep_s=90)
    mem.update(before, now=0)
    assert [s.node_id for s in mem.update(after, now=89)] == [IDS[1], IDS[2]]
    assert [s.node_id for s in mem.update(after, now=200)] == [IDS[1]]


def test_a_client_never_promotes_and_the_table_view_includes_every_standby():
    t = table(node(0, "idle"), standby=[entry(1, 16)])
    view = table_view(t, NodeView(IDS[5], role="client"), [entry(2, 24)])
    assert [n.node_id for n in view.nodes] == [IDS[0], IDS[1], IDS[2], IDS[5]]
    assert view.model("m1").hosts == ()


# -- the active side ------------------------------------------------------------------------------


class FakeMesh:
    def __init__(self) -> None:
        self.node_id = IDS[0]
        self.incarnation = 1
        self.mesh_id = "mesh1"
        self.advertise = ["127.0.0.1:7000"]
        self.purposes: dict[str, Any] = {}
        self.listeners: list = []
        self.local: list = []
        self.peer_list: list = []
        self.desired = DesiredState()

    def register_purpose(self, purpose, handler, *, token_join=False):
        self.purposes[purpose] = (handler, token_join)

    def add_listener(self, cb):
        self.listeners.append(cb)

    def add_local_listener(self, cb):
        self.local.append(cb)

    def peers(self):
        return list(self.peer_list)


class FakeNode:
    def __init__(self) -> None:
        self.info = {"role": "host", "vram_bytes": 8 * GB, "serving": ["m1"], "loading": [],
                     "available_models": [{"name": "m1", "size_bytes": GB}]}
        self.in_flight: dict[str, int] = {}
        self.router = None  # no API router: the table says load 0

    def local_info(self):
        return dict(self.info)


class ServerConn:
    """A passive node's connection as the active side sees it."""

    n = 0

    def __init__(self, server: RouteServer, node_id: str):
        ServerConn.n += 1
        self.server = server
        self.node_id = node_id
        self.peer_address = f"p{ServerConn.n}"
        self.sent: list[bytes] = []
        self.delegate = None
        self.closed_with: str | None = None

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        assert frame_type == FrameType.ROUTE_TABLE
        self.sent.append(payload)

    def close(self, reason: str, *, code: Any = None, notify: bool = True,
              abort: bool = False) -> None:
        self.closed_with = reason
        self.server.peer_closed(self, reason)

    def ask(self, **body: Any) -> dict[str, Any]:
        self.server.peer_frame(self, wire.Frame(FrameType.ROUTE_REQUEST, wire.dump_json(body)))
        return json.loads(self.sent[-1])


def route_server():
    clock, mesh, node_ = Clock(), FakeMesh(), FakeNode()
    server = RouteServer(mesh, node_, clock=clock, refresh_s=10.0)
    server.startService()
    return server, clock, mesh, node_


def connect(server: RouteServer, node_id: str) -> ServerConn:
    conn = ServerConn(server, node_id)
    handler, token_join = server.mesh.purposes["route"]
    assert token_join  # a passive node may join with a token
    handler(conn)
    assert conn.delegate is server  # frames go to the route server, not the gossip
    return conn


def test_route_server_answers_full_then_same_and_builds_once_for_many_requests():
    server, clock, mesh, node_ = route_server()
    conns = [connect(server, f"c{i}") for i in range(50)]
    first = conns[0].ask(kind="client")
    assert [h["model"] for h in first["hosts"]] == ["m1"]
    assert first["active_nodes"][0]["node_id"] == IDS[0]
    for c in conns[1:]:
        c.ask(kind="client")
    for _ in range(20):
        for c in conns:
            assert c.ask(kind="client", etag=first["etag"]) == {"etag": first["etag"], "same": True}
    assert server.answers.builds == 1
    assert server.counts() == {"clients": 50, "standby": 0, "requests": 50 * 21}


def test_route_server_pushes_a_changed_table_to_every_passive_node_once():
    server, clock, mesh, node_ = route_server()
    a, b = connect(server, "a"), connect(server, "b")
    a.ask(kind="client")
    b.ask(kind="client")
    node_.info["serving"] = []  # the model went away (here: drop or death)
    for cb in mesh.local:
        cb()
    for cb in mesh.listeners:
        cb(object())
    clock.advance(0)
    for c in (a, b):
        assert len(c.sent) == 2 and json.loads(c.sent[-1])["hosts"] == []
    assert server.answers.builds == 2


def test_a_standby_checking_in_is_listed_for_everyone_and_counted():
    server, clock, mesh, node_ = route_server()
    client = connect(server, "client")
    client.ask(kind="client")
    s = connect(server, IDS[3])
    body = s.ask(kind="standby", vram_bytes=16 * GB,
                 available_models=[{"name": "m1", "size_bytes": GB}])
    assert [x["node_id"] for x in body["standby"]] == [IDS[3]]
    clock.advance(0)
    assert [x["node_id"] for x in json.loads(client.sent[-1])["standby"]] == [IDS[3]]
    assert server.counts()["standby"] == 1
    assert [v.node_id for v in server.standby_views()] == [IDS[3]]
    s.close("gone")
    assert server.counts()["standby"] == 0


def test_route_server_closes_passive_nodes_that_stopped_checking_in():
    server, clock, mesh, node_ = route_server()
    quiet, busy, mute = connect(server, "q"), connect(server, "b"), connect(server, "m")
    quiet.ask(kind="client", refresh_s=10)
    busy.ask(kind="client", refresh_s=10)
    for _ in range(4):
        clock.advance(10)
        busy.ask(kind="client", refresh_s=10)
    assert quiet.closed_with and "no check-in" in quiet.closed_with
    assert mute.closed_with == "no ROUTE_REQUEST"
    assert busy.closed_with is None
    assert server.counts()["clients"] == 1


def test_a_bad_route_request_closes_only_that_connection():
    server, clock, mesh, node_ = route_server()
    c = connect(server, "x")
    server.peer_frame(c, wire.Frame(FrameType.ROUTE_REQUEST, b"{not json"))
    assert c.closed_with and c.closed_with.startswith("bad ROUTE_REQUEST")
    ok = connect(server, "y")
    assert ok.ask(kind="client")["hosts"]


def test_one_request_at_a_time_even_when_the_refresh_is_shorter_than_the_answer():
    c, clock, dialer, tables = route_client(tokens_=[make_token()], refresh_s=1.0)
    c.start()
    conn = dialer.succeed(c)
    clock.advance(1.0)
    clock.advance(1.0)
    assert len(conn.sent) == 1  # still waiting for the first answer
    clock.advance(3.5)  # answer_timeout_s (5 s) after the one request: that node is left
    assert conn.closed_with and "no routing table" in conn.closed_with
