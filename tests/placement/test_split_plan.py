"""Issue 11's planning table and the download gate that counts on the split.

Each row drives the default plugin through ``meshd.placement.rules`` (the hook's
one call site), so ``tensor_split`` is shown to reach ``meshd_plan_split``.
"""

from __future__ import annotations

import math

import pytest

from meshd.placement import default
from meshd.placement import rules as placement
from meshd.placement.hookspecs import hookimpl
from meshd.placement.plugins import PolicyManager
from meshd.placement.snapshot import GB, MeshView, NodeView, SplitPlan


def node(node_id: str, vram_gb: float, rtt_ms: float | None = 1.0, role: str = "host") -> NodeView:
    return NodeView(node_id=node_id, role=role, vram_bytes=int(vram_gb * GB), rtt_ms=rtt_ms)


def mesh_of(*nodes: NodeView, max_rtt_ms: float = 80.0) -> MeshView:
    return MeshView(nodes[0].node_id, nodes, max_rtt_ms=max_rtt_ms)


def plan(size_gb: float, *group: NodeView, **kwargs) -> SplitPlan:
    max_rtt_ms = kwargs.pop("max_rtt_ms", 80.0)
    return placement.plan_split("m", int(size_gb * GB), group, mesh_of(*group, max_rtt_ms=max_rtt_ms),
                                **kwargs)


# -- the planning table -------------------------------------------------------------


def test_fits_one_node_runs_solo_even_with_peers_around():
    p = plan(5, node("a", 8, 0), node("b", 4), node("c", 4))
    assert p.mode == "solo" and p.solo == ("a",)


def test_too_big_for_every_node_splits_with_shares_following_vram():
    p = plan(9, node("a", 8, 0), node("b", 4))
    assert p.mode == "split" and p.host == "a"
    assert p.shares == (("a", pytest.approx(8 / 12)), ("b", pytest.approx(4 / 12)))
    assert p.reason == "fits no single node: split over 2 nodes"


def test_forced_split_splits_a_model_that_fits():
    p = plan(1, node("a", 8, 0), node("b", 8), force_split=True)
    assert p.mode == "split" and [s[0] for s in p.shares] == ["a", "b"]
    assert p.reason.startswith("split forced")


def test_tensor_split_orders_host_first_then_by_node_id():
    # "z" has the most VRAM, so it is the host; "a" and "m" follow by id
    group = (node("a", 4), node("m", 4), node("z", 8, 0))
    p = plan(14, *group, tensor_split=(2.0, 1.0, 1.0))
    assert p.host == "z"
    assert p.shares == (("z", 0.5), ("a", 0.25), ("m", 0.25))
    assert "tensor_split" not in p.reason


@pytest.mark.parametrize(("weights", "why"), [
    ((1.0, 1.0, 1.0), "[models] tensor_split has 3 weights for 2 nodes: shares follow VRAM"),
    ((1.0, 0.0), "[models] tensor_split[1] is 0.0, not a finite number > 0: shares follow VRAM"),
    ((math.inf, 1.0), "[models] tensor_split[0] is inf, not a finite number > 0: shares follow VRAM"),
    ((-1.0, 2.0), "[models] tensor_split[0] is -1.0, not a finite number > 0: shares follow VRAM"),
])
def test_unusable_tensor_split_falls_back_to_vram_and_says_so(weights, why):
    p = plan(9, node("a", 8, 0), node("b", 4), tensor_split=weights)
    assert p.mode == "split"
    assert p.shares == (("a", pytest.approx(8 / 12)), ("b", pytest.approx(4 / 12)))
    assert p.reason == f"fits no single node: split over 2 nodes; {why}"


def test_tensor_split_counts_only_the_nodes_the_rtt_gate_keeps():
    group = (node("a", 8, 0), node("b", 4, 5), node("far", 4, 300))
    p = plan(9, *group, tensor_split=(3.0, 1.0))
    assert p.shares == (("a", 0.75), ("b", 0.25))
    assert p.reason == "fits no single node: split over 2 nodes; skipped far (300 ms > 80 ms)"


def test_rtt_gate_leaves_far_peers_out_and_waits_when_the_rest_is_short():
    p = plan(9, node("a", 8, 0), node("far", 8, 120))
    assert p.mode == "wait"
    assert p.reason == "need 9.9 GiB, group has 8.0 GiB of 1 node; skipped far (120 ms > 80 ms)"


def test_a_peer_not_measured_yet_is_left_out_until_its_rtt_is_known():
    # counted as near, a far peer just connected would join the first plan, then force a
    # restart once its first PONG put it over the gate
    p = plan(9, node("a", 8, 0), node("new", 8, None))
    assert p.mode == "wait"
    assert p.reason == "need 9.9 GiB, group has 8.0 GiB of 1 node; skipped new (RTT not measured yet)"
    assert plan(9, node("a", 8, 0), node("new", 8, 3)).mode == "split"


def test_not_enough_vram_waits_with_the_numbers():
    p = plan(4.8, node("a", 2, 0), node("b", 2))
    assert p.mode == "wait" and p.host == "a"
    assert p.reason == "need 5.3 GiB, group has 4.0 GiB of 2 nodes"
    assert p.have_bytes == 4 * GB


def test_tensor_split_reaches_a_plugin_that_asks_for_it():
    seen: list[tuple[float, ...]] = []

    class Spy:
        @hookimpl
        def meshd_plan_split(self, host, tensor_split):
            seen.append(tensor_split)

    manager = PolicyManager()
    assert manager.add(Spy(), "spy") == []
    group = (node("a", 8, 0), node("b", 4))
    placement.plan_split("m", 9 * GB, group, mesh_of(*group), tensor_split=(2.0, 1.0), policy=manager)
    assert seen == [(2.0, 1.0)]


# -- the download gate ------------------------------------------------------------------


def test_fits_the_group_but_not_the_node_may_download():
    me = node("a", 4, 0)
    view = mesh_of(me, node("b", 4, 10))
    assert default.split_peers_available(6 * GB, me, view)
    decision = placement.allow_download(
        "m", 6 * GB, me, view,
        split_peers_available=default.split_peers_available(6 * GB, me, view))
    assert decision.allowed


def test_peers_beyond_the_rtt_gate_do_not_count():
    me = node("a", 4, 0)
    assert not default.split_peers_available(6 * GB, me, mesh_of(me, node("b", 4, 200)))


def test_a_peer_not_measured_yet_counts_for_the_download_gate():
    # measured within a round trip of its connection, long before a download ends
    me = node("a", 4, 0)
    assert default.split_peers_available(6 * GB, me, mesh_of(me, node("b", 4, None)))


def test_passive_peers_do_not_count():
    me = node("a", 4, 0)
    assert not default.split_peers_available(6 * GB, me, mesh_of(me, node("c", 40, 1, role="client")))


def test_no_peer_means_no_split_even_if_the_node_alone_has_the_vram():
    me = node("a", 40, 0)
    assert not default.split_peers_available(6 * GB, me, mesh_of(me))


def test_the_group_still_short_refuses():
    me = node("a", 4, 0)
    assert not default.split_peers_available(20 * GB, me, mesh_of(me, node("b", 4, 1)))
