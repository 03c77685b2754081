"""Reactive rebalancing on an idle active node (issue 6, item 7): on a peer's death,
departure or drop, an idle node asks the promotion hook and serves the orphaned model;
the default's tie-break lets exactly one idle node take it.  A Clock and fakes, no time."""

from __future__ import annotations

import logging

import pluggy
from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.mesh.desired import Want
from meshd.mesh.membership import PeerChanged, PeerDown, PeerLeft, PeerUp
from meshd.models.scan import LocalModel
from meshd.placement import default, plugins
from meshd.placement.election import Rebalancer
from tests.harness.meshfakes import MB, make_node, peer, serve

hookimpl = pluggy.HookimplMarker("meshd")


class Actions:
    def __init__(self):
        self.log: list[tuple] = []

    def start(self, model):
        self.log.append(("start", model))

    def stop(self, model):
        self.log.append(("stop", model))


def idle_node(node_id, *, vram_gb=8.0, disk=None, peers=(), client=False, policy=None):
    """An idle active node that knows ``peers``; its settle timer never fires (the clock
    is not advanced), so whatever it starts came from the promotion path."""
    clock = Clock()
    node = make_node(node_id, vram_gb=vram_gb, disk=disk, client=client, clock=clock)
    node.policy = policy
    acts = Actions()
    node.rebalancer = Rebalancer(node, reactor=clock, start=acts.start, stop=acts.stop,
                                 settle_s=2.0)
    for p in peers:
        node.mesh.members[p.node_id] = p
    return node, acts


def host_dies(node, host_id="h"):
    """``host_id`` leaves the peer table and the node hears PEER_DOWN."""
    del node.mesh.members[host_id]
    node.rebalancer.on_event(PeerDown(host_id, "missed 3 heartbeats"))


def test_an_idle_node_promotes_at_once_for_the_dead_hosts_model_and_says_why(caplog):
    node, acts = idle_node("a", disk={"m": 300 * MB},
                           peers=[peer("h", serving=["m"], disk={"m": 300 * MB})])
    with caplog.at_level(logging.INFO, logger="meshd.placement.election"):
        host_dies(node)
    assert acts.log == [("start", "m")]
    assert node.rebalancer.target == "m"
    line = next(r.getMessage() for r in caplog.records if "promoting" in r.getMessage())
    assert "idle node promoting to serve m: m has no host and this node can serve it" in line
    assert "decided by default" in line and "peer h down: missed 3 heartbeats" in line
    assert not node.reactor.getDelayedCalls()  # the settle timer was not needed


def test_two_idle_nodes_agree_the_one_with_most_vram_promotes():
    disk = {"m": 300 * MB}
    host = peer("h", serving=["m"], disk=disk)
    small, small_acts = idle_node("a", vram_gb=8, disk=disk,
                                  peers=[host, peer("b", role="idle", vram_gb=16, disk=disk)])
    big, big_acts = idle_node("b", vram_gb=16, disk=disk,
                              peers=[host, peer("a", role="idle", vram_gb=8, disk=disk)])
    host_dies(small)
    host_dies(big)
    assert big_acts.log == [("start", "m")]
    assert small_acts.log == []


def test_equal_vram_the_lowest_node_id_promotes():
    disk = {"m": 300 * MB}
    host = peer("h", serving=["m"], disk=disk)
    a, a_acts = idle_node("a", disk=disk, peers=[host, peer("b", role="idle", disk=disk)])
    b, b_acts = idle_node("b", disk=disk, peers=[host, peer("a", role="idle", disk=disk)])
    for n in (b, a):
        del n.mesh.members["h"]
        n.rebalancer.on_event(PeerLeft("h"))
    assert (a_acts.log, b_acts.log) == ([("start", "m")], [])


def test_a_peer_that_stops_hosting_counts_like_a_death():
    disk = {"m": 300 * MB}
    old = peer("h", serving=["m"], disk=disk)
    node, acts = idle_node("a", disk=disk, peers=[old])
    new = peer("h", disk=disk)
    node.mesh.members["h"] = new
    node.rebalancer.on_event(PeerChanged(new, old))
    assert acts.log == [("start", "m")]


def test_events_that_orphan_nothing_only_restart_the_settle_timer():
    disk = {"m": 300 * MB}
    node, acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk)])
    joined = peer("x", serving=["other"])
    node.mesh.members["x"] = joined
    node.rebalancer.on_event(PeerUp(joined))
    node.rebalancer.on_event(PeerChanged(joined, joined))
    assert acts.log == []
    assert len(node.reactor.getDelayedCalls()) == 1  # the assignment, after settling


def test_no_promotion_when_another_node_still_hosts_the_model():
    disk = {"m": 300 * MB}
    node, acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk),
                                                  peer("g", serving=["m"], disk=disk)])
    host_dies(node)
    assert acts.log == []


def test_a_serving_node_a_client_and_a_dropped_model_never_promote():
    disk = {"m": 300 * MB, "k": 300 * MB}
    busy, busy_acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk)])
    serve(busy, "k")
    busy.rebalancer.serve("k")
    busy_acts.log.clear()
    host_dies(busy)
    assert busy_acts.log == []

    client, client_acts = idle_node("c", client=True, peers=[peer("h", serving=["m"])])
    host_dies(client)
    assert client_acts.log == []

    dropped, dropped_acts = idle_node("d", disk={"m": 300 * MB},
                                      peers=[peer("h", serving=["m"], disk=disk)])
    dropped.desired.decide("m", Want.DROPPED, by="x")
    host_dies(dropped)
    assert dropped_acts.log == []


def test_a_drop_lets_an_idle_node_promote_for_another_orphan():
    disk = {"m": 300 * MB, "k": 300 * MB}
    node, acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk)])
    node.drop_local("m", origin="h")  # k, on our disk, has no host
    assert acts.log == [("start", "k")]


class PromoteRemote:
    """A plugin that promotes idle nodes for a model nobody has on disk."""

    @hookimpl(tryfirst=True)
    def meshd_promote(self, node):
        return "far" if node.role == "idle" else None


def policy_with(*extra):
    manager = plugins.PolicyManager()
    assert manager.add(default, default.NAME) == []
    for i, obj in enumerate(extra):
        assert manager.add(obj, f"test{i}") == []
    return manager


class Downloader:
    def __init__(self, node, result=None):
        self.node = node
        self.asked: list[str] = []
        self.result = result

    def download(self, name):
        self.asked.append(name)
        if self.result is not None:
            return self.result
        self.node.scan.models[name] = LocalModel(name=name, path=f"/m/{name}.gguf",
                                                 parts=(f"{name}.gguf",), size_bytes=300 * MB)
        return defer.succeed(None)


def test_a_promotion_to_a_model_not_on_disk_goes_through_the_downloader():
    node, acts = idle_node("a", peers=[peer("h", serving=["far"])], policy=policy_with(PromoteRemote()))
    node.downloader = Downloader(node)
    host_dies(node)
    assert node.downloader.asked == ["far"]
    assert acts.log == [("start", "far")]


def test_a_refused_download_leaves_the_node_idle_and_logged(caplog):
    node, acts = idle_node("a", peers=[peer("h", serving=["far"])], policy=policy_with(PromoteRemote()))
    node.downloader = Downloader(node, result=defer.fail(RuntimeError("download refused")))
    with caplog.at_level(logging.ERROR, logger="meshd.placement.election"):
        host_dies(node)
    assert acts.log == [] and node.rebalancer.target is None
    assert not node.rebalancer.assigning
    assert "promoted to far, but its download failed: download refused" in caplog.text


class NeverPromote:
    @hookimpl(tryfirst=True)
    def meshd_promote(self):
        return False


def test_a_plugin_that_declines_keeps_the_node_idle():
    disk = {"m": 300 * MB}
    node, acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk)],
                           policy=policy_with(NeverPromote()))
    host_dies(node)
    assert acts.log == []


def test_the_last_node_left_takes_over_its_dead_peers_model():
    disk = {"m": 300 * MB}
    node, acts = idle_node("a", disk=disk, peers=[peer("h", serving=["m"], disk=disk)])
    host_dies(node)  # no peer left: it still promotes, the mesh is itself now
    assert acts.log == [("start", "m")]
