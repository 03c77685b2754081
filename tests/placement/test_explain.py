"""``meshctl explain``'s content, built by the real election over a real Node and a fake mesh:
a solo, a waiting, a split-forced and a dropped model, a plugin that answered a hook, a model
this node is not in the group of, and the route a client's request would take."""

from __future__ import annotations

import dataclasses

import pytest

from meshd.errors import Refused
from meshd.placement import plugins
from meshd.placement.explain import Part, name_of, node_parts
from meshd.placement.hookspecs import hookimpl
from meshd.placement.snapshot import GB, MeshView, NodeView, SplitPlan
from meshd.serving.router import MeshRouter
from tests.harness.meshfakes import MB, make_node, peer, serve
from tests.placement.test_rebalance import rebalancer


def parts(explained: dict) -> dict[str, tuple[str, str]]:
    """node id -> (part, reason) of an explain answer's election."""
    return {p["node_id"]: (p["part"], p["reason"]) for p in explained["election"]["nodes"]}


def hooks(explained: dict) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """hook -> (answered by, asked in order, answer)."""
    return {h["hook"]: (h["answered_by"], tuple(h["asked"]), h["answer"])
            for h in explained["election"]["hooks"]}


def far(p, rtt_ms):
    return dataclasses.replace(p, rtt_ms=rtt_ms)


def test_a_solo_model_names_the_nodes_that_run_it_and_why_a_small_one_waits():
    node = make_node("node-a", vram_gb=8, disk={"m": 4 * GB})
    node.mesh.members["node-b"] = peer("node-b", vram_gb=4, waiting=["m"])  # 4 GiB < 4.4
    node.mesh.members["node-c"] = peer("node-c", vram_gb=24, serving=["other"])
    r, _ = rebalancer(node)
    r.serve("m")
    e = node.explain("m")
    assert e["dropped"] is False
    el = e["election"]
    assert (el["mode"], el["source"], el["trigger"]) == ("solo", "election on this node",
                                                        "serving m")
    assert el["size_bytes"] == 4 * GB and el["need_bytes"] == int(4 * GB * 1.1 + 0.5)
    assert el["fit_rule"].endswith("VRAM >= the file's size x 1.1")
    assert el["local"]["action"] == "run"
    assert parts(e) == {
        "node-a": (Part.SOLO, "fits: needs 4.4 GiB, has 8.0 GiB"),
        "node-b": (Part.WAITING, "too small to run it alone: needs 4.4 GiB, has 4.0 GiB"),
        "node-c": (Part.NOT_IN_GROUP, "not set to serve m (serves other)"),
    }
    inputs = {i["node_id"]: i for i in el["inputs"]}
    assert inputs["node-a"]["on_disk_bytes"] == 4 * GB and inputs["node-b"]["on_disk_bytes"] is None
    assert (inputs["node-b"]["vram_bytes"], inputs["node-b"]["fits"]) == (4 * GB, False)
    assert inputs["node-c"]["in_group"] is False
    # no plugin but the default: it answered both hooks the plan asked
    assert hooks(e) == {
        "meshd_elect_host": ("default", ("default",), "host node-a"),
        "meshd_plan_split": ("default", ("default",),
                             "solo on node-a: fits 1 of 2 node(s): no split"),
    }


def test_a_waiting_model_gives_the_groups_numbers_and_each_nodes_part():
    node = make_node("node-a", vram_gb=8, disk={"big": 40 * GB})
    node.mesh.members["node-b"] = peer("node-b", vram_gb=6, waiting=["big"])
    node.mesh.members["node-c"] = peer("node-c", vram_gb=24, waiting=["big"])
    r, acts = rebalancer(node)
    r.serve("big")
    e = node.explain("big")
    el = e["election"]
    # node-c has the most VRAM: it is the elected host; the group is 6 GiB short
    assert (el["mode"], el["host"]) == ("wait", "node-c")
    assert el["reason"] == "need 44.0 GiB, group has 38.0 GiB of 3 nodes"
    assert el["local"] == {"action": "worker", "state": "worker",
                           "reason": "worker of host node-c: need 44.0 GiB, group has 38.0 GiB "
                                     "of 3 nodes"}
    assert parts(e) == {
        "node-a": (Part.WAITING, "worker of host node-c, waiting: its 8.0 GiB count"),
        "node-b": (Part.WAITING, "worker of host node-c, waiting: its 6.0 GiB count"),
        "node-c": (Part.WAITING, "elected host, waiting: need 44.0 GiB, group has 38.0 GiB of "
                                 "3 nodes"),
    }
    assert acts.log == []  # nothing runs


def test_a_far_peer_is_left_out_with_its_rtt_against_the_limit():
    node = make_node("node-a", vram_gb=16, disk={"big": 20 * GB})
    node.mesh.members["node-b"] = far(peer("node-b", vram_gb=8, waiting=["big"]), 120.0)
    r, _ = rebalancer(node)
    r.serve("big")
    e = node.explain("big")
    assert e["election"]["mode"] == "wait" and e["election"]["host"] == "node-a"
    assert parts(e) == {
        "node-a": (Part.WAITING, "elected host, waiting: need 22.0 GiB, group has 16.0 GiB of "
                                 "1 node; skipped node-b (120 ms > 80 ms)"),
        "node-b": (Part.LEFT_OUT,
                   "RTT 120 ms > 80 ms ([models] max_rtt_ms): its 8.0 GiB do not count"),
    }
    assert e["election"]["local"]["reason"].startswith("need 22.0 GiB, group has 16.0 GiB")


def test_a_split_forced_model_gives_the_shares_and_the_settings_it_read():
    node = make_node("node-a", vram_gb=16, disk={"m": 2 * GB}, split=True)
    node.mesh.members["node-b"] = peer("node-b", vram_gb=8, waiting=["m"])
    node.mesh.members["node-c"] = far(peer("node-c", vram_gb=8, waiting=["m"]), 300.0)
    node.mesh.members["node-d"] = dataclasses.replace(
        peer("node-d", vram_gb=8, waiting=["m"]), rtt_ms=None)
    r, acts = rebalancer(node)
    r.serve("m")
    e = node.explain("m")
    el = e["election"]
    assert (el["mode"], el["host"]) == ("split", "node-a")
    assert el["settings"]["split"] is True and el["settings"]["max_rtt_ms"] == 80.0
    assert el["shares"] == [{"node_id": "node-a", "share": 0.6667},
                            {"node_id": "node-b", "share": 0.3333}]
    assert parts(e) == {
        "node-a": (Part.HOST, "elected host: 67% of the layers, 16.0 GiB of VRAM"),
        "node-b": (Part.WORKER, "33% of the layers, 8.0 GiB of VRAM, RTT 1 ms"),
        "node-c": (Part.LEFT_OUT, "RTT 300 ms > 80 ms ([models] max_rtt_ms)"),
        "node-d": (Part.LEFT_OUT, "RTT not measured yet (a split waits for its first heartbeat)"),
    }
    assert el["reason"].startswith("split forced: split over 2 nodes; skipped node-c (300 ms")
    assert acts.log == [("split", "m", ("node-b",))]


def test_a_dropped_model_says_so_and_keeps_its_last_election():
    node = make_node("node-a", vram_gb=8, disk={"m": 1 * GB})
    r, _ = rebalancer(node)
    r.serve("m")
    serve(node, "m")
    node.drop("m")
    e = node.explain("m")
    assert e["dropped"] is True
    assert "dropped mesh-wide (meshctl drop)" in e["dropped_reason"]
    assert e["election"]["mode"] == "solo"  # what it was before the drop
    assert e["routing"] == {"client_id": "127.0.0.1", "order": [], "hooks": [],
                            "answer": "this node routes no requests (no mesh router)"}


def test_a_plugin_that_answered_a_hook_is_named_with_its_answer_and_who_was_asked():
    class Pinned:
        @hookimpl
        def meshd_plan_split(self, host, group):
            others = sorted(n.node_id for n in group if n.node_id != host)
            return SplitPlan(mode="solo", solo=(host,), reason="pinned to the elected host"
                             ) if others else None

        @hookimpl
        def meshd_elect_host(self, group):
            return None  # no opinion: the default elects

    from meshd.placement import default

    manager = plugins.PolicyManager()
    assert manager.add(default, "default", origin="built in") == []
    assert manager.add(Pinned(), "pinned") == []
    node = make_node("node-a", vram_gb=8, disk={"m": 1 * GB})
    node.policy = manager
    node.mesh.members["node-b"] = peer("node-b", vram_gb=24, waiting=["m"])
    r, acts = rebalancer(node)
    r.serve("m")
    e = node.explain("m")
    assert hooks(e) == {
        "meshd_elect_host": ("default", ("pinned", "default"), "host node-b"),
        "meshd_plan_split": ("pinned", ("pinned", "default"),
                             "solo on node-b: pinned to the elected host"),
    }
    # node-a fits, but the plugin's plan runs the model on node-b only
    assert parts(e)["node-a"] == (Part.LEFT_OUT, "fits (needs 1.1 GiB, has 8.0 GiB), but plugin "
                                                 "pinned's plan runs it elsewhere")
    assert parts(e)["node-b"][0] == Part.SOLO
    assert acts.log == []


def test_an_assigned_model_names_the_assignment_hook_and_its_reason():
    node = make_node("node-a", vram_gb=8, disk={"m": 1 * GB})
    node.mesh.members["node-b"] = peer("node-b", serving=["other"])
    r, _ = rebalancer(node)
    assert r.assign() == "m"
    assigned = hooks(node.explain("m"))["meshd_assign_model"]
    assert assigned == ("default", ("default",), "m: unserved model on disk")


def test_a_model_this_node_is_not_in_the_group_of_is_planned_now_from_its_view():
    node = make_node("node-a", vram_gb=8)
    node.mesh.members["node-b"] = peer("node-b", vram_gb=8, serving=["m"], disk={"m": 2 * GB})
    node.mesh.members["node-c"] = peer("node-c", vram_gb=1, waiting=["m"])
    e = node.explain("m")
    el = e["election"]
    assert el["source"].startswith("planned now on this node, which is not in the group")
    assert parts(e) == {
        "node-a": (Part.NOT_IN_GROUP, "not set to serve m (serves nothing)"),
        "node-b": (Part.SOLO, "fits: needs 2.2 GiB, has 8.0 GiB"),
        "node-c": (Part.WAITING, "too small to run it alone: needs 2.2 GiB, has 1.0 GiB"),
    }
    assert node.explanations.get("m") is None  # asking records nothing


def test_an_unknown_model_is_refused_naming_the_known_ones():
    node = make_node("node-a", disk={"m": 1 * GB})
    with pytest.raises(Refused, match=r"model 'nosuch' is not known in this mesh.*known: m\)"):
        node.explain("nosuch")


# -- routing ----------------------------------------------------------------------------------


def routed_node():
    node = make_node("node-a", vram_gb=8)
    serve(node, "m")
    node.mesh.members["node-b"] = peer("node-b", serving=["m"])
    node.mesh.members["node-c"] = peer("node-c", serving=["m"])
    node.router = MeshRouter(node, reactor=node.reactor, tunnel=lambda n, m: None)
    return node


def test_the_route_gives_the_host_order_a_client_gets_and_who_chose_the_first():
    node = routed_node()
    route = node.explain("m", "10.0.0.7")["routing"]
    assert route["client_id"] == "10.0.0.7"
    assert [h["node_id"] for h in route["order"]] == ["node-a", "node-b", "node-c"]
    assert [h["local"] for h in route["order"]] == [True, False, False]
    [asked] = route["hooks"]
    assert (asked["hook"], asked["answered_by"], asked["answer"]) == (
        "meshd_select_host", "default", "node-a")
    # the same order a real request gets
    assert [u.node_id for u in node.router.upstreams("m", "10.0.0.7")] == [
        "node-a", "node-b", "node-c"]


def test_the_route_of_a_client_not_hosting_follows_the_clients_hash():
    node = routed_node()
    node.stop_serving("m")
    orders = {tuple(h["node_id"] for h in node.explain("m", f"c{i}")["routing"]["order"])
              for i in range(40)}
    # the default spreads clients over both hosts; each order is the explain answer a
    # request from that client gets
    assert {o[0] for o in orders} == {"node-b", "node-c"}
    for i in range(5):
        order = [h["node_id"] for h in node.explain("m", f"c{i}")["routing"]["order"]]
        assert [u.node_id for u in node.router.upstreams("m", f"c{i}")] == order


def test_a_single_host_asks_no_hook_and_a_model_without_host_says_what_a_request_gets():
    node = make_node("node-a", vram_gb=8, disk={"big": 20 * GB})
    serve(node, "m")
    node.router = MeshRouter(node, reactor=node.reactor, tunnel=lambda n, m: None)
    route = node.explain("m")["routing"]
    assert route["client_id"] == "127.0.0.1"
    assert (route["hooks"], route["answer"]) == (
        [], "one ready host: the host-selection hook is not asked")
    r, _ = rebalancer(node)
    r.serve("big")
    node.router.invalidate()  # the daemon's placement-changed listener does this
    assert node.explain("big")["routing"]["answer"] == (
        "HTTP 503: model 'big' is not ready: waiting: need 22.0 GiB, group has 8.0 GiB of 1 node")


# -- the pure part ---------------------------------------------------------------------------


def test_a_node_name_is_used_when_the_record_has_one():
    assert name_of({"name": "gpu-box-2"}) == "gpu-box-2"
    assert name_of(NodeView("a")) is None
    assert name_of(type("Named", (), {"name": "box"})()) == "box"


def test_a_passive_node_takes_no_part_and_says_so():
    view = MeshView(self_id="a", nodes=(NodeView("a", vram_bytes=8 * GB, rtt_ms=0.0),
                                        NodeView("s", role="standby", vram_bytes=8 * GB)))
    plan = SplitPlan(mode="solo", solo=("a",), reason="fits")
    out = {p.node_id: (p.part, p.reason) for p in node_parts("m", 300 * MB, view.nodes[:1],
                                                             view, plan)}
    assert out["s"] == (Part.NOT_IN_GROUP, "a standby: passive nodes take no part in elections")


def test_a_standby_explains_from_its_routing_table_and_routes_as_its_router_does():
    import types

    from meshd.passive.router import PassiveRouter
    from meshd.placement.snapshot import ModelFile
    from meshd.serving.routetable import NodeEntry, RouteTable, build_table

    entries = tuple(NodeEntry(f"host-{i}", "host", 8 * GB, (f"127.0.0.1:{7000 + i}",), ("m",),
                              available_models=(ModelFile("m", 2 * GB),)) for i in range(3))
    t = build_table(mesh_id="mesh1", source="host-0", nodes=entries, standby=())
    router = PassiveRouter("node-s", endpoint_for=lambda n, m: (n, m), started_at=0)
    router.update(RouteTable("t.1.1", t.mesh_id, t.source, t.hosts, t.active_nodes, t.standby))
    node = make_node("node-s", vram_gb=8, disk={"m": 2 * GB}, standby=True)
    node.mesh = None
    node.passive = types.SimpleNamespace(router=router)
    e = node.explain("m", "alice")
    assert e["election"]["source"].startswith("planned now on this passive node")
    assert parts(e)["node-s"] == (Part.NOT_IN_GROUP,
                                  "a standby: passive nodes take no part in elections")
    assert {parts(e)[f"host-{i}"][0] for i in range(3)} == {Part.SOLO}
    route = e["routing"]
    order = [h["node_id"] for h in route["order"]]
    assert order == [u.node_id for u in router.upstreams("m", "alice")] and len(order) == 2
    assert route["hooks"][0]["hook"] == "meshd_select_host"
    assert route["answer"] == "a passive node tries the hook's choice, then one more host by node id"


def test_split_forced_with_only_far_peers_runs_solo_and_says_why_each_peer_is_left_out():
    node = make_node("node-a", vram_gb=16, disk={"m": 2 * GB}, split=True)
    node.mesh.members["node-b"] = far(peer("node-b", vram_gb=8, waiting=["m"]), 150.0)
    r, acts = rebalancer(node)
    r.serve("m")
    e = node.explain("m")
    assert e["election"]["mode"] == "solo"
    assert e["election"]["reason"] == ("split forced but no peer within 80 ms: solo; skipped "
                                       "node-b (150 ms > 80 ms)")
    assert parts(e) == {
        "node-a": (Part.SOLO, "fits: needs 2.2 GiB, has 16.0 GiB"),
        "node-b": (Part.LEFT_OUT, "RTT 150 ms > 80 ms ([models] max_rtt_ms): too far to split "
                                  "with ([models] split), and the host runs it alone"),
    }
    assert acts.log == [("start", "m")]
