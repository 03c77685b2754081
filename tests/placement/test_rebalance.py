"""Per-model election and assignment: solo vs split, ties, clients left out, no restart
storm, the assignment after joining (settle, priority, drops), with a Clock and fakes."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.mesh.desired import Want
from meshd.mesh.membership import PeerChanged, PeerUp
from meshd.placement.election import RUN, WAIT, WORKER, Rebalancer, decide, group_of
from meshd.placement.snapshot import GB, MeshView, NodeView
from tests.harness.meshfakes import MB, make_node, peer, serve


def nv(node_id: str, vram_gb: float, role: str = "host") -> NodeView:
    return NodeView(node_id, role=role, vram_bytes=int(vram_gb * GB), rtt_ms=1.0)


def decide_all(size_gb: float, nodes: list[NodeView], *, force_split: bool = False):
    view = MeshView(self_id=nodes[0].node_id, nodes=tuple(nodes))
    group = group_of("m", view, {n.node_id: ("m",) for n in nodes})
    return {n.node_id: decide("m", int(size_gb * GB), n.node_id, group,
                              MeshView(self_id=n.node_id, nodes=tuple(nodes)),
                              force_split=force_split)
            for n in group}


def test_a_model_that_fits_runs_solo_on_every_node_of_its_group():
    out = decide_all(4, [nv("a", 8), nv("b", 16)])
    assert {k: (d.action, d.mode, d.workers) for k, d in out.items()} == {
        "a": (RUN, "solo", ()), "b": (RUN, "solo", ())}


def test_a_node_too_small_for_a_solo_model_waits_with_the_numbers():
    out = decide_all(10, [nv("a", 8), nv("b", 16)])
    assert out["b"].action == RUN and out["b"].mode == "solo"
    assert out["a"].action == WAIT and out["a"].reason.startswith("need 11.0 GiB, have 8.0 GiB")


def test_too_big_for_the_group_elects_the_biggest_host_which_waits_and_others_are_workers():
    out = decide_all(40, [nv("a", 8), nv("b", 16), nv("c", 12)])
    assert out["b"].action == WAIT and out["b"].host == "b"
    assert out["b"].reason == "need 44.0 GiB, group has 36.0 GiB of 3 nodes"
    assert out["a"].action == WORKER and out["c"].action == WORKER
    assert out["a"].host == out["c"].host == "b"
    # every node's status shows the whole waiting group, the host first
    for d in out.values():
        assert d.split_status() == {"host": "b", "workers": [
            {"node_id": n, "share": 0.0} for n in ("b", "a", "c")], "reason": d.reason}
        assert d.reason.endswith("need 44.0 GiB, group has 36.0 GiB of 3 nodes")


def test_equal_vram_elects_the_lowest_node_id():
    out = decide_all(50, [nv("c", 16), nv("a", 16), nv("b", 16)])
    assert {d.host for d in out.values()} == {"a"}
    assert out["a"].action == WAIT and out["b"].action == WORKER


def test_enough_vram_together_splits_with_shares_by_vram():
    out = decide_all(20, [nv("a", 8), nv("b", 16)])
    host = out["b"]
    assert (host.action, host.mode) == (RUN, "split")
    assert dict(host.workers) == pytest.approx({"a": 8 / 24})
    assert out["a"].action == WORKER and out["a"].host == "b"
    # every node with a share, the host first
    assert host.split_status() == {"host": "b", "workers": [{"node_id": "b", "share": 0.6667},
                                                            {"node_id": "a", "share": 0.3333}],
                                   "reason": "fits no single node: split over 2 nodes"}


def test_forced_split_splits_a_model_that_fits():
    out = decide_all(4, [nv("a", 8), nv("b", 16)], force_split=True)
    assert out["b"].mode == "split" and out["a"].action == WORKER


def test_clients_and_standbys_are_not_in_a_group():
    nodes = (nv("a", 8), nv("b", 16, role="client"), nv("c", 16, role="standby"))
    view = MeshView(self_id="a", nodes=nodes)
    group = group_of("m", view, {"a": ("m",), "b": ("m",), "c": ("m",)})
    assert [n.node_id for n in group] == ["a"]


# -- the Rebalancer: acting on decisions ---------------------------------------------------------


class Actions:
    def __init__(self):
        self.log: list[tuple] = []

    def start(self, model):
        self.log.append(("start", model))

    def stop(self, model):
        self.log.append(("stop", model))

    def start_split(self, model, shares):
        host = shares[0][0]
        self.log.append(("split", model, tuple(sorted(n for n, _ in shares if n != host))))


def rebalancer(node, *, split_wired: bool = True, settle_s: float = 2.0):
    acts = Actions()
    r = Rebalancer(node, reactor=node.reactor, start=acts.start, stop=acts.stop,
                   start_split=acts.start_split if split_wired else None, settle_s=settle_s)
    node.rebalancer = r
    return r, acts


def test_solo_starts_once_and_unrelated_events_restart_nothing():
    node = make_node(disk={"m": 300 * MB})
    r, acts = rebalancer(node)
    r.serve("m")
    for i in range(5):
        node.mesh.members[f"p{i}"] = peer(f"p{i}", serving=["other"])
        r.on_event(PeerUp(node.mesh.members[f"p{i}"]))
    assert acts.log == [("start", "m")]
    assert r.decisions == 6


def test_split_host_restarts_llama_server_only_when_its_worker_set_changes():
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    r, acts = rebalancer(node)
    r.serve("m")
    assert acts.log == [("split", "m", ("b",))]
    # events that do not change the worker set: a peer of another model, b's RTT/state
    node.mesh.members["x"] = peer("x", serving=["other"])
    r.on_event(PeerUp(node.mesh.members["x"]))
    r.on_event(PeerChanged(node.mesh.members["b"], node.mesh.members["b"]))
    assert acts.log == [("split", "m", ("b",))]
    # a new worker joins the group: one restart with the new set
    node.mesh.members["c"] = peer("c", waiting=["m"], vram_gb=8)
    r.on_event(PeerUp(node.mesh.members["c"]))
    assert acts.log == [("split", "m", ("b",)), ("stop", "m"), ("split", "m", ("b", "c"))]


def test_a_host_short_of_vram_waits_announces_it_and_starts_once_the_group_fits():
    node = make_node("a", vram_gb=8, disk={"m": 20 * GB})
    r, acts = rebalancer(node)
    r.serve("m")
    assert acts.log == [] and r.decision.action == WAIT
    assert node.role == "host" and node.local_info()["waiting"] == ["m"]
    status = {m["name"]: m for m in node.model_status()} if node.router else None
    assert status is None  # no router in this test: status is the node's own
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=16)
    r.on_event(PeerUp(node.mesh.members["b"]))
    # b has more VRAM: it is the host now and this node its worker
    assert r.decision.action == WORKER and r.decision.host == "b"
    assert node.role == "worker" and node.local_info()["waiting"] == ["m"]
    assert acts.log == []


def test_without_the_split_wiring_an_elected_split_host_waits_and_says_so():
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    r, acts = rebalancer(node, split_wired=False)
    r.serve("m")
    assert acts.log == [] and r.decision.state == "waiting-for-split"
    assert node.local_info()["waiting"] == ["m"]


def test_a_dropped_target_is_stopped_and_forgotten():
    node = make_node(disk={"m": 300 * MB})
    r, acts = rebalancer(node)
    r.serve("m")
    r.forget("m")
    assert acts.log == [("start", "m"), ("stop", "m")]
    assert r.target is None and r.role is None


# -- assignment -------------------------------------------------------------------------------------


def test_an_idle_node_asks_for_a_model_once_the_view_settled_after_joining():
    clock = Clock()
    node = make_node("a", disk={"m1": 300 * MB, "m2": 300 * MB}, clock=clock)
    r, acts = rebalancer(node, settle_s=2.0)
    node.mesh.members["b"] = peer("b", serving=["m1"], disk={"m1": 300 * MB})
    r.on_event(PeerUp(node.mesh.members["b"]))
    clock.advance(1.5)
    node.mesh.members["c"] = peer("c", serving=["m1"])
    r.on_event(PeerUp(node.mesh.members["c"]))  # pushes the deadline back
    clock.advance(1.5)
    assert acts.log == []
    clock.advance(0.6)
    assert acts.log == [("start", "m2")]  # the unserved one on disk
    assert r.target == "m2"


def test_a_stream_of_events_cannot_postpone_the_assignment_forever():
    clock = Clock()
    node = make_node("a", disk={"m1": 300 * MB}, clock=clock)
    r, acts = rebalancer(node, settle_s=2.0)
    node.mesh.members["b"] = peer("b")
    for _ in range(10):
        r.on_event(PeerUp(node.mesh.members["b"]))
        clock.advance(1.0)
    assert acts.log == [("start", "m1")]


def test_no_assignment_without_peers_or_for_clients_and_standbys():
    for kw in ({}, {"client": True}, {"standby": True}):
        clock = Clock()
        node = make_node("a", disk={"m1": 300 * MB}, clock=clock, **kw)
        r, acts = rebalancer(node)
        if kw:
            node.mesh.members["b"] = peer("b")
        r.on_event(None)
        clock.advance(100)
        assert acts.log == [], kw


@pytest.mark.parametrize("disk, peers, expected", [
    # unserved model on disk beats everything
    ({"m1": 300 * MB, "m2": 300 * MB}, {"b": dict(serving=["m1"], requested=["m3"])}, "m2"),
    # no unserved model on disk: an unserved one elsewhere (download)
    ({"m1": 300 * MB}, {"b": dict(serving=["m1"], disk={"m3": 300 * MB})}, "m3"),
    # everything served: the least-served model on disk
    ({"m1": 300 * MB, "m2": 300 * MB},
     {"b": dict(serving=["m1"]), "c": dict(serving=["m1"]), "d": dict(serving=["m2"])}, "m2"),
])
def test_assignment_priority(disk, peers, expected):
    clock = Clock()
    node = make_node("a", disk=disk, clock=clock)

    class Downloader:
        def __init__(self):
            self.asked = []

        def download(self, name):
            self.asked.append(name)
            node.scan.models[name] = node.scan.models.get(name) or type(
                next(iter(node.scan.models.values())))(name=name, path=f"/m/{name}",
                                                      parts=(name,), size_bytes=300 * MB)
            return defer.succeed(None)

    node.downloader = Downloader()
    r, acts = rebalancer(node)
    for pid, kw in peers.items():
        node.mesh.members[pid] = peer(pid, **kw)
    assert r.assign() == expected
    assert acts.log == [("start", expected)]
    assert node.downloader.asked == ([] if expected in disk else [expected])


def test_a_dropped_model_is_never_assigned_again():
    clock = Clock()
    node = make_node("a", disk={"m1": 300 * MB}, clock=clock)
    r, acts = rebalancer(node)
    node.mesh.members["b"] = peer("b", requested=["m1"])
    node.desired.decide("m1", Want.DROPPED, by="x")
    assert r.assign() is None
    assert acts.log == []


def test_a_node_whose_model_was_dropped_drops_it_and_may_take_another():
    clock = Clock()
    node = make_node("a", disk={"m1": 300 * MB, "m2": 300 * MB}, clock=clock)
    r, acts = rebalancer(node)
    backend = serve(node, "m1")
    r.serve("m1")
    node.mesh.members["b"] = peer("b")
    node.drop_local("m1", origin="b")
    assert backend.stopped == 1 and "m1" not in node.served
    clock.advance(10)
    assert acts.log[-1] == ("start", "m2")


def test_a_model_a_peer_is_loading_counts_as_served_for_assignment():
    clock = Clock()
    node = make_node("a", disk={"m1": 300 * MB, "m2": 300 * MB}, clock=clock)
    r, acts = rebalancer(node)
    node.mesh.members["b"] = peer("b", loading=["m1"])
    assert r.assign() == "m2"
