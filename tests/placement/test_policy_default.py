"""The default placement plugin: DESIGN.md's table, decision by decision."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.placement import default
from meshd.placement import rules as placement
from meshd.placement.snapshot import GB, MeshView, ModelFile, NodeView


def node(node_id, role="idle", vram_gb=8, disk=(), serving=(), requested=(), rtt_ms=None, load=0):
    return NodeView(
        node_id=node_id, role=role, vram_bytes=int(vram_gb * GB), serving=tuple(serving),
        available_models=tuple(ModelFile(m, int(s * GB)) for m, s in dict(disk).items()),
        requested_models=tuple(requested), rtt_ms=rtt_ms, load=load,
    )


def mesh_of(*nodes, self_id=None, catalog=(), max_rtt_ms=80.0):
    return MeshView(
        self_id or nodes[0].node_id, nodes,
        catalog=tuple(ModelFile(m, int(s * GB)) for m, s in dict(catalog).items()),
        max_rtt_ms=max_rtt_ms,
    )


# -- host selection ---------------------------------------------------------------


def test_stable_index_is_the_first_8_bytes_of_sha256_modulo_hosts():
    digest = hashlib.sha256(b"client-7gemma").digest()
    assert default.stable_index("client-7", "gemma", 5) == int.from_bytes(digest[:8], "big") % 5


def test_stable_index_does_not_depend_on_pythons_hash_seed():
    code = "from meshd.placement.default import stable_index; print([stable_index(f'c{i}', 'm', 7) for i in range(50)])"
    outputs = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outputs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([default.stable_index(f"c{i}", "m", 7) for i in range(50)])


def test_select_host_does_not_depend_on_the_order_hosts_are_given_in():
    hosts = (node("a", "host"), node("b", "host"), node("c", "host"))
    mesh = mesh_of(*hosts, self_id="client")
    for i in range(30):
        chosen = {placement.choose_host("m", f"client-{i}", order, mesh) for order in (hosts, hosts[::-1], hosts[1:] + hosts[:1])}
        assert len(chosen) == 1


def test_select_host_keeps_one_client_on_one_host():
    hosts = (node("a", "host"), node("b", "host"))
    mesh = mesh_of(*hosts, self_id="client")
    assert len({placement.choose_host("m", "same-client", hosts, mesh) for _ in range(10)}) == 1


def test_select_host_spreads_many_clients_evenly():
    hosts = tuple(node(n, "host") for n in "abc")
    mesh = mesh_of(*hosts, self_id="client")
    counts = Counter(placement.choose_host("m", f"client-{i}", hosts, mesh) for i in range(3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(900 <= c <= 1100 for c in counts.values()), counts


def test_select_host_failover_picks_another_host_without_the_failed_one():
    hosts = (node("a", "host"), node("b", "host"), node("c", "host"))
    mesh = mesh_of(*hosts, self_id="client")
    first = placement.choose_host("m", "client", hosts, mesh)
    second = placement.choose_host("m", "client", tuple(h for h in hosts if h.node_id != first), mesh)
    assert second != first


def test_choose_host_with_no_hosts_is_a_caller_error():
    with pytest.raises(ValueError):
        placement.choose_host("m", "client", (), mesh_of(node("a")))


# -- assignment: unserved on disk > unserved (download) > least-served on disk > least-served


@pytest.mark.parametrize(
    "others, me, expected, reason_part",
    [
        # an unserved model on disk beats an unserved one to download
        ([node("h", "host", requested=["x"], disk={"x": 1})],
         node("me", disk={"mine": 1}), ("mine", False), "unserved model on disk"),
        # nothing unserved on disk: download an unserved model
        ([node("h", "host", serving=["a"], disk={"a": 1, "b": 2}, requested=["b"])],
         node("me", disk={"a": 1}), ("b", True), "download"),
        # everything served: the least-served model on disk
        ([node("h1", "host", serving=["a"], disk={"a": 1}), node("h2", "host", serving=["a"], disk={"a": 1}),
          node("h3", "host", serving=["b"], disk={"b": 1})],
         node("me", disk={"a": 1, "b": 1}), ("b", False), "least-served model on disk"),
        # nothing usable on disk: the least-served overall, downloaded
        ([node("h1", "host", serving=["a"], disk={"a": 1}), node("h2", "host", serving=["a"], disk={"a": 1}),
          node("h3", "host", serving=["b"], disk={"b": 1})],
         node("me"), ("b", True), "least-served model"),
        # an unserved model that does not fit is passed over for one that does
        ([node("h", "host", serving=["small"], disk={"small": 1}, requested=["huge"])],
         node("me", vram_gb=8, disk={"huge": 40}), ("small", True), "least-served"),
        # of two unserved models on disk, the one more nodes ask for
        ([node("h1", "host", serving=["z"], requested=["p"]), node("h2", "host", serving=["z"], requested=["p", "q"])],
         node("me", disk={"p": 1, "q": 1}), ("p", False), "unserved model on disk"),
    ],
)
def test_assignment_priority(others, me, expected, reason_part):
    decision = placement.assign_model(me, mesh_of(me, *others))
    assert (decision.model, decision.download) == expected
    assert reason_part in decision.reason
    assert decision.decided_by == "default"


def test_assignment_skips_a_model_of_unknown_size_not_on_disk():
    me = node("me")
    decision = placement.assign_model(me, mesh_of(me, node("h", "host", requested=["mystery"])))
    assert decision.model is None


def test_assignment_uses_catalog_sizes_for_models_nobody_has():
    me = node("me", vram_gb=8)
    mesh = mesh_of(me, node("h", "host", requested=["wanted"]), catalog={"wanted": 2})
    assert placement.assign_model(me, mesh).model == "wanted"


def test_assignment_says_why_when_nothing_fits():
    me = node("me", vram_gb=1)
    decision = placement.assign_model(me, mesh_of(me, node("h", "host", serving=["big"], disk={"big": 5})))
    assert decision.model is None
    assert "no model fits this node (1.0 GiB of VRAM)" in decision.reason


def test_clients_are_never_assigned_a_model():
    me = node("me", role="client", vram_gb=0)
    assert placement.assign_model(me, mesh_of(me, node("h", "host", requested=["m"], disk={"m": 0}))).model is None


# -- promotion ----------------------------------------------------------------------


def test_standby_promotes_for_an_orphaned_model_it_has_on_disk():
    s = node("s", "standby", disk={"m": 1})
    decision = placement.should_promote(s, mesh_of(s, node("a", "host", serving=["other"])))
    assert (decision.promote, decision.model) == (True, "m")


def test_standby_does_not_promote_when_the_model_has_a_host():
    s = node("s", "standby", disk={"m": 1})
    assert not placement.should_promote(s, mesh_of(s, node("a", "host", serving=["m"]))).promote


def test_standby_does_not_promote_for_a_model_that_does_not_fit():
    s = node("s", "standby", vram_gb=4, disk={"m": 4})
    assert not placement.should_promote(s, mesh_of(s)).promote


def test_of_two_standbys_for_one_orphan_the_one_with_more_vram_promotes():
    small, big = node("a", "standby", vram_gb=8, disk={"m": 1}), node("b", "standby", vram_gb=16, disk={"m": 1})
    mesh = mesh_of(small, big)
    assert not placement.should_promote(small, mesh).promote
    assert placement.should_promote(big, mesh).promote


def test_of_two_equal_standbys_the_lower_node_id_promotes():
    one, two = node("n1", "standby", disk={"m": 1}), node("n2", "standby", disk={"m": 1})
    mesh = mesh_of(one, two)
    assert placement.should_promote(one, mesh).promote
    assert not placement.should_promote(two, mesh).promote


def test_two_orphans_go_to_two_standbys():
    one = node("n1", "standby", disk={"x": 1, "y": 1})
    two = node("n2", "standby", disk={"x": 1, "y": 1})
    mesh = mesh_of(one, two)
    models = {placement.should_promote(n, mesh).model for n in (one, two)}
    assert models == {"x", "y"}


def test_idle_active_nodes_promote_like_standbys():
    idle = node("i", "idle", disk={"m": 1})
    assert placement.should_promote(idle, mesh_of(idle)).promote


def test_clients_never_promote():
    c = node("c", "client", vram_gb=100, disk={"m": 1})
    assert not placement.should_promote(c, mesh_of(c)).promote


def test_a_standby_missing_from_the_table_is_added_before_deciding():
    s = node("s", "standby", disk={"m": 1})
    assert placement.should_promote(s, mesh_of(node("a", "host", serving=["x"]))).promote


nodes_strategy = st.lists(
    st.builds(
        lambda i, role, vram, disk: node(f"n{i}", role, vram_gb=vram, disk={m: 1 + k for k, m in enumerate(disk)}),
        st.integers(0, 30), st.sampled_from(["standby", "idle", "host", "client"]), st.integers(0, 8),
        st.lists(st.sampled_from(["a", "b", "c"]), unique=True),
    ),
    max_size=8, unique_by=lambda n: n.node_id,
)


@given(nodes_strategy)
@settings(max_examples=200, deadline=None)
def test_promotion_never_sends_two_nodes_to_one_model_and_only_sends_nodes_that_can_serve(nodes):
    mesh = MeshView("x", tuple(nodes))
    winners = default.promotion_winners(mesh)
    assert len(set(winners.values())) == len(winners)
    for node_id, model in winners.items():
        n = mesh.node(node_id)
        assert n.role in ("standby", "idle")
        assert default.fits(n.vram_bytes, n.size_of(model))
        assert not mesh.model(model).hosts


# -- election ---------------------------------------------------------------------


def test_election_picks_the_most_vram():
    group = (node("a", "host", vram_gb=8), node("b", "host", vram_gb=24), node("c", "host", vram_gb=16))
    assert placement.elect_host("m", group, mesh_of(*group)) == "b"


def test_election_tie_goes_to_the_lowest_node_id():
    group = (node("b", "host", vram_gb=8), node("a", "host", vram_gb=8))
    assert placement.elect_host("m", group, mesh_of(*group)) == "a"


def test_election_leaves_out_clients_and_passive_nodes():
    group = (node("a", "host", vram_gb=8), node("c", "client", vram_gb=99), node("s", "standby", vram_gb=99))
    assert placement.elect_host("m", group, mesh_of(*group)) == "a"


# -- split planning ------------------------------------------------------------------


def test_plan_is_solo_on_every_node_the_model_fits():
    group = (node("a", "host", vram_gb=8), node("b", "host", vram_gb=8), node("c", "host", vram_gb=2))
    plan = placement.plan_split("m", 4 * GB, group, mesh_of(*group))
    assert plan.mode == "solo" and plan.solo == ("a", "b")


def test_plan_splits_a_model_that_fits_no_node_in_proportion_to_vram():
    group = (node("a", "host", vram_gb=12, rtt_ms=0), node("b", "host", vram_gb=24, rtt_ms=3))
    plan = placement.plan_split("m", 23 * GB, group, mesh_of(*group))
    assert plan.mode == "split" and plan.host == "b"
    assert plan.shares == (("b", pytest.approx(2 / 3)), ("a", pytest.approx(1 / 3)))
    assert plan.workers == (("a", pytest.approx(1 / 3)),)


def test_plan_splits_when_forced_even_if_the_model_fits():
    group = (node("a", "host", vram_gb=8, rtt_ms=0), node("b", "host", vram_gb=8, rtt_ms=1))
    plan = placement.plan_split("m", GB, group, mesh_of(*group), force_split=True)
    assert plan.mode == "split" and [s[0] for s in plan.shares] == ["a", "b"]
    assert "split forced" in plan.reason


def test_forced_split_with_no_peer_runs_solo():
    group = (node("a", "host", vram_gb=8, rtt_ms=0),)
    plan = placement.plan_split("m", GB, group, mesh_of(*group), force_split=True)
    assert plan.mode == "solo" and plan.solo == ("a",)


def test_plan_skips_peers_beyond_the_rtt_limit():
    group = (node("a", "host", vram_gb=12, rtt_ms=0), node("b", "host", vram_gb=12, rtt_ms=5),
             node("far", "host", vram_gb=12, rtt_ms=200))
    plan = placement.plan_split("m", 20 * GB, group, mesh_of(*group, max_rtt_ms=80))
    assert [s[0] for s in plan.shares] == ["a", "b"]
    assert "skipped far (200 ms > 80 ms)" in plan.reason


def test_plan_waits_with_need_and_have_when_the_group_is_short():
    group = (node("a", "host", vram_gb=12, rtt_ms=0), node("b", "host", vram_gb=12, rtt_ms=1))
    plan = placement.plan_split("m", 47 * GB, group, mesh_of(*group))
    assert plan.mode == "wait" and plan.host == "a"
    assert plan.reason == "need 51.7 GiB, group has 24.0 GiB of 2 nodes"
    assert (plan.need_bytes, plan.have_bytes) == (default.need_bytes(47 * GB), 24 * GB)
    assert abs(plan.need_bytes - 51.7 * GB) < GB / 10


@given(st.lists(st.integers(1, 80), min_size=1, max_size=6), st.integers(1, 200), st.booleans())
@settings(max_examples=200, deadline=None)
def test_every_default_plan_passes_the_result_check(vrams, size_gb, forced):
    group = tuple(node(f"n{i}", "host", vram_gb=v, rtt_ms=float(i)) for i, v in enumerate(vrams))
    plan = placement.plan_split("m", size_gb * GB, group, mesh_of(*group), force_split=forced)
    from meshd.placement.hookspecs import RESULT_CHECKS

    assert RESULT_CHECKS["meshd_plan_split"](plan, {"group": group}) is None
    if plan.mode == "split":
        assert plan.have_bytes >= plan.need_bytes


# -- download gating --------------------------------------------------------------------


def test_download_allowed_when_the_model_fits():
    me = node("me", vram_gb=8)
    decision = placement.allow_download("m", 2 * GB, me, mesh_of(me))
    assert decision.allowed and "it fits" in decision.reason


def test_download_refused_when_the_model_does_not_fit_says_the_numbers():
    me = node("me", vram_gb=24)
    decision = placement.allow_download("big", 47 * GB, me, mesh_of(me))
    assert not decision.allowed
    assert decision.reason == "model big (47.0 GiB) needs 51.7 GiB, node has 24.0 GiB: not downloading"


def test_download_allowed_when_split_peers_will_share_it():
    me = node("me", vram_gb=24)
    decision = placement.allow_download("big", 47 * GB, me, mesh_of(me), split_peers_available=True)
    assert decision.allowed and "split peers" in decision.reason


def test_download_decision_without_a_mesh_view():
    assert placement.allow_download("m", GB, node("me", vram_gb=8)).allowed
