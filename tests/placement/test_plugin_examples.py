"""The example plugins in plugins/: each alone, and each loaded from a real TOML file."""

from __future__ import annotations

import importlib.util
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from meshd import config as configmod
from meshd.placement import plugins
from meshd.placement import rules as placement
from meshd.placement.snapshot import GB, MeshView, ModelFile, NodeView

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"


def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", PLUGINS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def node(node_id, role="host", vram_gb=8, disk=(), serving=(), requested=(), rtt_ms=None, load=0):
    return NodeView(
        node_id=node_id, role=role, vram_bytes=int(vram_gb * GB), serving=tuple(serving),
        available_models=tuple(ModelFile(m, int(s * GB)) for m, s in dict(disk).items()),
        requested_models=tuple(requested), rtt_ms=rtt_ms, load=load,
    )


def from_toml(tmp_path, text):
    """A manager built the way the daemon builds it: config file, then plugins."""
    path = tmp_path / "meshd.toml"
    path.write_text(textwrap.dedent(text))
    cfg = configmod.load(str(path))
    return plugins.load(cfg, plugins_dir=None, entry_points=[], search_dirs=[str(PLUGINS_DIR)])


@pytest.mark.parametrize("name", ["least_loaded", "pinned", "no_downloads", "rtt_aware"])
def test_example_registers_cleanly_and_is_documented(name):
    module = example(name)
    assert module.__doc__ and "[policy]" in module.__doc__
    manager = plugins.PolicyManager()
    assert manager.add(module, name) == []
    assert manager.check_pending() == []


# -- least_loaded ----------------------------------------------------------------------


def test_least_loaded_picks_the_host_with_fewest_requests_in_flight():
    ll = example("least_loaded")
    hosts = (node("a", load=5), node("b", load=1), node("c", load=3))
    assert ll.meshd_select_host("m", "client", hosts) == "b"


def test_least_loaded_spreads_clients_over_equally_loaded_hosts():
    ll = example("least_loaded")
    hosts = (node("a", load=0), node("b", load=0), node("c", load=9))
    counts = Counter(ll.meshd_select_host("m", f"client-{i}", hosts) for i in range(300))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 100


def test_least_loaded_from_a_config_file_routes_by_load_not_by_hash(tmp_path):
    manager = from_toml(tmp_path, """
        [policy]
        plugins = ["least_loaded"]
    """)
    hosts = (node("a", load=7), node("b", load=0), node("c", load=7))
    mesh = MeshView("client", hosts)
    by_load = Counter(placement.choose_host("m", f"c{i}", hosts, mesh, policy=manager) for i in range(60))
    by_hash = Counter(placement.choose_host("m", f"c{i}", hosts, mesh) for i in range(60))
    assert by_load == {"b": 60}
    assert len(by_hash) == 3


# -- pinned --------------------------------------------------------------------------

PINS = {"gemma": ("p1", "p2")}


CLIENT = MeshView("client", ())


def test_pinned_selects_only_pinned_hosts():
    pn = example("pinned")
    hosts = (node("p1"), node("x"), node("p2"))
    chosen = {pn.meshd_select_host("gemma", f"c{i}", hosts, CLIENT, PINS) for i in range(50)}
    assert chosen == {"p1", "p2"}


def test_pinned_keeps_requests_on_this_node_when_it_is_a_pinned_host():
    pn = example("pinned")
    hosts = (node("p1"), node("x"), node("p2"))
    on_p2 = MeshView("p2", hosts)
    assert {pn.meshd_select_host("gemma", f"c{i}", hosts, on_p2, PINS) for i in range(50)} == {"p2"}
    # a host that is not pinned sends the pinned model's requests to the pinned ones
    on_x = MeshView("x", hosts)
    assert {pn.meshd_select_host("gemma", f"c{i}", hosts, on_x, PINS) for i in range(50)} == {"p1", "p2"}


def test_pinned_has_no_opinion_on_unpinned_models_or_when_no_pinned_node_hosts():
    pn = example("pinned")
    assert pn.meshd_select_host("other", "c", (node("x"),), CLIENT, PINS) is None
    assert pn.meshd_select_host("gemma", "c", (node("x"),), CLIENT, PINS) is None


def test_pinned_assigns_the_pinned_model_to_a_pinned_node():
    pn = example("pinned")
    me = node("p1", role="idle", disk={"other": 1})
    mesh = MeshView("p1", (me, node("h", serving=["x"])))
    assert pn.meshd_assign_model(me, mesh, PINS) == ("gemma", "pinned to this node by [policy.pinned]")


def test_pinned_never_assigns_a_model_pinned_elsewhere():
    pn = example("pinned")
    me = node("x", role="idle", disk={"gemma": 1, "other": 1})
    mesh = MeshView("x", (me, node("h", serving=["other"])))
    # the default would pick the unserved gemma on disk; pinned leaves it to p1/p2
    assert pn.meshd_assign_model(me, mesh, PINS)[0] == "other"


def test_pinned_refuses_promotion_of_other_nodes_for_a_pinned_model():
    pn = example("pinned")
    outsider = node("x", role="standby", vram_gb=80, disk={"gemma": 1})
    pinned = node("p1", role="standby", vram_gb=8, disk={"gemma": 1})
    mesh = MeshView("x", (outsider, pinned))
    assert pn.meshd_promote(outsider, mesh, PINS) is False
    assert pn.meshd_promote(pinned, mesh, PINS) == "gemma"


def test_pinned_without_settings_has_no_opinion():
    pn = example("pinned")
    me = node("x", role="standby", disk={"gemma": 1})
    assert pn.meshd_promote(me, MeshView("x", (me,)), {}) is None
    assert pn.meshd_assign_model(me, MeshView("x", (me,)), {}) is None


def test_pinned_rejects_a_pin_that_is_not_node_ids():
    pn = example("pinned")
    with pytest.raises(ValueError, match="gemma: expected a node id or a list of node ids"):
        pn.meshd_configure({"gemma": (3,)})


def test_pinned_from_a_config_file(tmp_path):
    manager = from_toml(tmp_path, """
        [policy]
        plugins = ["pinned"]

        [policy.pinned]
        gemma = ["p1"]
    """)
    hosts = (node("p1", serving=["gemma"]), node("x", serving=["gemma"]))
    mesh = MeshView("x", hosts)
    assert {placement.choose_host("gemma", f"c{i}", hosts, mesh, policy=manager) for i in range(30)} == {"p1"}
    standby = node("s", role="standby", vram_gb=80, disk={"gemma": 1})
    orphaned = MeshView("s", (standby, node("p1", role="standby", disk={"gemma": 1})))
    decision = placement.should_promote(standby, orphaned, policy=manager)
    assert not decision.promote and decision.decided_by == "pinned"


def test_pinned_bad_settings_from_a_config_file_are_a_check_problem(tmp_path):
    with pytest.raises(plugins.PluginError) as e:
        from_toml(tmp_path, """
            [policy]
            plugins = ["pinned"]

            [policy.pinned]
            gemma = []
        """)
    assert e.value.problems[0].startswith("[policy.pinned] gemma: expected a node id or a list of node ids")


# -- no_downloads ---------------------------------------------------------------------


def test_no_downloads_refuses_every_download():
    assert example("no_downloads").meshd_allow_download() is False


def test_no_downloads_assigns_only_models_on_disk():
    nd = example("no_downloads")
    me = node("me", role="idle", disk={"local": 1})
    mesh = MeshView("me", (me, node("h", requested=["wanted"], disk={"wanted": 1}), node("h2", serving=["local"])))
    model, reason = nd.meshd_assign_model(me, mesh)
    assert model == "local" and "on-disk models only" in reason


def test_no_downloads_leaves_a_node_with_nothing_on_disk_idle():
    nd = example("no_downloads")
    me = node("me", role="idle")
    mesh = MeshView("me", (me, node("h", requested=["wanted"], disk={"wanted": 1})))
    assert nd.meshd_assign_model(me, mesh)[0] is None


def test_no_downloads_from_a_config_file(tmp_path):
    manager = from_toml(tmp_path, """
        [policy]
        plugins = ["no_downloads"]
    """)
    me = node("me", role="idle", vram_gb=80)
    mesh = MeshView("me", (me, node("h", requested=["wanted"], disk={"wanted": 1})))
    download = placement.allow_download("wanted", GB, me, mesh, policy=manager)
    assert not download.allowed and download.decided_by == "no_downloads"
    assert placement.assign_model(me, mesh, policy=manager).model is None


# -- rtt_aware -------------------------------------------------------------------------


def test_rtt_aware_picks_the_nearest_host():
    ra = example("rtt_aware")
    hosts = (node("far", rtt_ms=90.0), node("near", rtt_ms=2.0))
    mesh = MeshView("me", (node("me", role="client"), *hosts))
    assert ra.meshd_select_host("m", "c", hosts, mesh, {}) == "near"


def test_rtt_aware_prefers_this_node_when_it_hosts_the_model():
    ra = example("rtt_aware")
    hosts = (node("me"), node("peer", rtt_ms=10.0))
    mesh = MeshView("me", hosts)
    assert ra.meshd_select_host("m", "c", hosts, mesh, {}) == "me"
    # even with a peer within the slack: no hop is nearer than none
    lan = (node("me"), node("peer", rtt_ms=0.2))
    assert {ra.meshd_select_host("m", f"c{i}", lan, MeshView("me", lan), {"slack_ms": 5})
            for i in range(50)} == {"me"}


def test_rtt_aware_spreads_over_hosts_within_the_slack():
    ra = example("rtt_aware")
    hosts = (node("a", rtt_ms=1.0), node("b", rtt_ms=3.0), node("c", rtt_ms=50.0))
    mesh = MeshView("me", (node("me", role="client"), *hosts))
    chosen = {ra.meshd_select_host("m", f"c{i}", hosts, mesh, {"slack_ms": 5}) for i in range(50)}
    assert chosen == {"a", "b"}
    assert {ra.meshd_select_host("m", f"c{i}", hosts, mesh, {"slack_ms": 0}) for i in range(50)} == {"a"}


def test_rtt_aware_has_no_opinion_before_any_rtt_is_measured():
    ra = example("rtt_aware")
    hosts = (node("a"), node("b"))
    assert ra.meshd_select_host("m", "c", hosts, MeshView("me", hosts), {}) is None


@pytest.mark.parametrize("settings", [{"slack_ms": -1}, {"slack_ms": "5"}, {"slak_ms": 5}])
def test_rtt_aware_rejects_bad_settings(settings):
    with pytest.raises(ValueError):
        example("rtt_aware").meshd_configure(settings)


def test_rtt_aware_from_a_config_file(tmp_path):
    manager = from_toml(tmp_path, """
        [policy]
        plugins = ["rtt_aware"]

        [policy.rtt_aware]
        slack_ms = 0
    """)
    hosts = (node("a", rtt_ms=30.0), node("b", rtt_ms=4.0))
    mesh = MeshView("me", (node("me", role="client"), *hosts))
    assert {placement.choose_host("m", f"c{i}", hosts, mesh, policy=manager) for i in range(20)} == {"b"}


def test_all_examples_together_from_a_config_file_ask_in_listed_order(tmp_path):
    manager = from_toml(tmp_path, """
        [policy]
        plugins = ["rtt_aware", "least_loaded", "pinned", "no_downloads"]

        [policy.pinned]
        gemma = ["b"]
    """)
    assert [p.name for p in manager.ordered()] == ["rtt_aware", "least_loaded", "pinned", "no_downloads", "default"]
    hosts = (node("a", load=0), node("b", load=3))
    # no RTT known: rtt_aware passes, least_loaded answers before pinned
    chosen = placement.choose_host("gemma", "c", hosts, MeshView("me", hosts), policy=manager)
    assert chosen == "a"
