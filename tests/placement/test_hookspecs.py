"""The hook specifications and the frozen snapshots handed to them."""

from __future__ import annotations

import dataclasses
import inspect

import pluggy
import pytest

from meshd.placement import hookspecs, plugins
from meshd.placement import rules as placement
from meshd.placement.snapshot import GB, MeshView, ModelFile, NodeView, SplitPlan, freeze

DECISIONS = [
    "meshd_select_host", "meshd_assign_model", "meshd_promote",
    "meshd_elect_host", "meshd_plan_split", "meshd_allow_download",
]


def spec(name):
    return getattr(hookspecs, name)


def test_every_hook_name_starts_with_meshd():
    names = hookspecs.hook_names()
    assert set(DECISIONS) <= set(names)
    assert all(n.startswith("meshd_") for n in names)


def test_hookimpl_marker_belongs_to_project_meshd():
    assert hookspecs.PROJECT == "meshd"
    pm = pluggy.PluginManager("meshd")
    pm.add_hookspecs(hookspecs)

    class P:
        @hookspecs.hookimpl
        def meshd_elect_host(self, group):
            return group[-1].node_id

    pm.register(P())
    group = (NodeView("a"), NodeView("b"))
    assert pm.hook.meshd_elect_host(model="m", group=group, mesh=MeshView("a"), settings={}) == "b"


@pytest.mark.parametrize("name", DECISIONS)
def test_decision_hooks_are_first_answer_wins(name):
    assert spec(name).meshd_spec["firstresult"] is True


def test_configure_hook_is_not_first_answer_wins():
    assert spec("meshd_configure").meshd_spec["firstresult"] is False


@pytest.mark.parametrize("name", hookspecs.hook_names())
def test_every_hookspec_documents_when_arguments_and_return(name):
    doc = inspect.getdoc(spec(name)) or ""
    assert "Called" in doc, f"{name}: say when it is called"
    assert "Return" in doc or "Raise" in doc, f"{name}: say what to return"
    for arg in inspect.signature(spec(name)).parameters:
        if arg != "settings":  # explained once, in the module docstring
            assert f"``{arg}``" in doc, f"{name}: argument {arg} undocumented"


@pytest.mark.parametrize("name", DECISIONS)
def test_every_decision_hook_has_a_result_check(name):
    assert name in hookspecs.RESULT_CHECKS


# -- each hook is called with its documented arguments ---------------------------


class Recorder:
    """A plugin taking every argument of every decision hook, answering nothing."""

    def __init__(self):
        self.calls = {}

    def _record(self, name, **kwargs):
        self.calls[name] = kwargs

    @hookspecs.hookimpl
    def meshd_select_host(self, model, client_id, hosts, mesh, settings):
        self._record("meshd_select_host", model=model, client_id=client_id, hosts=hosts, mesh=mesh, settings=settings)

    @hookspecs.hookimpl
    def meshd_assign_model(self, node, mesh, settings):
        self._record("meshd_assign_model", node=node, mesh=mesh, settings=settings)

    @hookspecs.hookimpl
    def meshd_promote(self, node, mesh, settings):
        self._record("meshd_promote", node=node, mesh=mesh, settings=settings)

    @hookspecs.hookimpl
    def meshd_elect_host(self, model, group, mesh, settings):
        self._record("meshd_elect_host", model=model, group=group, mesh=mesh, settings=settings)

    @hookspecs.hookimpl
    def meshd_plan_split(self, model, size_bytes, host, group, mesh, force_split, tensor_split,
                         settings):
        self._record("meshd_plan_split", model=model, size_bytes=size_bytes, host=host, group=group,
                     mesh=mesh, force_split=force_split, tensor_split=tensor_split,
                     settings=settings)

    @hookspecs.hookimpl
    def meshd_allow_download(self, model, size_bytes, node, split_peers_available, mesh, settings):
        self._record("meshd_allow_download", model=model, size_bytes=size_bytes, node=node,
                     split_peers_available=split_peers_available, mesh=mesh, settings=settings)


@pytest.fixture
def recorded():
    rec = Recorder()
    manager = plugins.PolicyManager()
    assert manager.add(rec, "recorder", settings={"k": [1, 2]}) == []
    a = NodeView("a", role="host", vram_bytes=8 * GB, serving=("m",), available_models=(ModelFile("m", GB),))
    b = NodeView("b", role="idle", vram_bytes=4 * GB, available_models=(ModelFile("m", GB),))
    mesh = MeshView("a", (a, b))
    placement.choose_host("m", "client", (a, b), mesh, policy=manager)
    placement.assign_model(b, mesh, policy=manager)
    placement.should_promote(b, mesh, policy=manager)
    placement.plan_split("m", GB, (a, b), mesh, force_split=True, policy=manager)
    placement.allow_download("m", GB, b, mesh, split_peers_available=True, policy=manager)
    return rec.calls


@pytest.mark.parametrize("name", DECISIONS)
def test_each_hook_is_called_with_exactly_its_documented_arguments(recorded, name):
    assert set(recorded[name]) == set(inspect.signature(spec(name)).parameters)


def test_hooks_receive_frozen_views_not_live_objects(recorded):
    for name, kwargs in recorded.items():
        for arg, value in kwargs.items():
            if arg in ("node",):
                assert isinstance(value, NodeView), name
            if arg in ("hosts", "group"):
                assert isinstance(value, tuple) and all(isinstance(v, NodeView) for v in value), name
            if arg == "mesh":
                assert isinstance(value, MeshView), name


def test_hooks_receive_the_plugins_own_settings_read_only(recorded):
    settings = recorded["meshd_select_host"]["settings"]
    assert dict(settings) == {"k": (1, 2)}
    with pytest.raises(TypeError):
        settings["k"] = 3


def test_plan_split_hook_gets_the_elected_host_and_the_force_flag(recorded):
    call = recorded["meshd_plan_split"]
    assert call["host"] == "a"  # the most VRAM
    assert call["force_split"] is True


# -- what each hook may return --------------------------------------------------------

HOSTS = {"hosts": (NodeView("a"), NodeView("b"))}
GROUP = {"group": (NodeView("a"), NodeView("b"))}


@pytest.mark.parametrize(
    "hook, value, kwargs, ok",
    [
        ("meshd_select_host", "a", HOSTS, True),
        ("meshd_select_host", "zzz", HOSTS, False),
        ("meshd_select_host", NodeView("a"), HOSTS, False),
        ("meshd_select_host", 0, HOSTS, False),
        ("meshd_elect_host", "b", GROUP, True),
        ("meshd_elect_host", "c", GROUP, False),
        ("meshd_assign_model", ("m", "why"), {}, True),
        ("meshd_assign_model", (None, "why"), {}, True),
        ("meshd_assign_model", "m", {}, False),
        ("meshd_assign_model", ("", "why"), {}, False),
        ("meshd_assign_model", ("m", 3), {}, False),
        ("meshd_promote", True, {}, True),
        ("meshd_promote", False, {}, True),
        ("meshd_promote", "m", {}, True),
        ("meshd_promote", 1, {}, False),
        ("meshd_promote", "", {}, False),
        ("meshd_allow_download", True, {}, True),
        ("meshd_allow_download", "metered link", {}, True),  # a refusal, with its reason
        ("meshd_allow_download", (False, "metered link"), {}, True),
        ("meshd_allow_download", (True, "fits the quota"), {}, True),
        ("meshd_allow_download", "", {}, False),
        ("meshd_allow_download", (1, "why"), {}, False),
        ("meshd_allow_download", (False, ""), {}, False),
        ("meshd_allow_download", (False,), {}, False),
        ("meshd_allow_download", 1, {}, False),
        ("meshd_plan_split", SplitPlan("solo", solo=("a",)), GROUP, True),
        ("meshd_plan_split", SplitPlan("solo"), GROUP, False),
        ("meshd_plan_split", SplitPlan("solo", solo=("x",)), GROUP, False),
        ("meshd_plan_split", SplitPlan("split", host="a", shares=(("a", 0.5), ("b", 0.5))), GROUP, True),
        ("meshd_plan_split", SplitPlan("split", host="a", shares=(("b", 0.5), ("a", 0.5))), GROUP, False),
        ("meshd_plan_split", SplitPlan("split", host="a", shares=(("a", 0.5), ("b", 0.6))), GROUP, False),
        ("meshd_plan_split", SplitPlan("split", host="a", shares=(("a", 1.0), ("x", 0.0))), GROUP, False),
        ("meshd_plan_split", SplitPlan("split", host="x", shares=(("x", 1.0),)), GROUP, False),
        ("meshd_plan_split", SplitPlan("wait", host="a", reason="need 2 GiB"), GROUP, True),
        ("meshd_plan_split", SplitPlan("wait", host="a"), GROUP, False),
        ("meshd_plan_split", SplitPlan("maybe", host="a"), GROUP, False),
        ("meshd_plan_split", {"mode": "solo"}, GROUP, False),
    ],
)
def test_result_checks_accept_valid_and_reject_invalid_answers(hook, value, kwargs, ok):
    problem = hookspecs.RESULT_CHECKS[hook](value, kwargs)
    assert (problem is None) is ok, problem


# -- snapshots ------------------------------------------------------------------------


def test_node_view_is_frozen():
    n = NodeView("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.load = 3


def test_node_view_turns_lists_into_tuples():
    n = NodeView("a", serving=["m"], available_models=[ModelFile("m", 1)], addrs=["1.2.3.4:7842"])
    assert n.serving == ("m",) and n.available_models == (ModelFile("m", 1),)
    assert hash(n) == hash(NodeView("a", serving=("m",), available_models=(ModelFile("m", 1),), addrs=("1.2.3.4:7842",)))


def test_mesh_models_are_the_union_of_requested_on_disk_and_served():
    mesh = MeshView("a", (
        NodeView("a", role="host", serving=("x",), available_models=(ModelFile("x", 5),)),
        NodeView("b", role="idle", requested_models=("y",), available_models=(ModelFile("z", 7),)),
    ), catalog=(ModelFile("y", 9), ModelFile("unrequested", 1)))
    assert [m.name for m in mesh.models] == ["x", "y", "z"]
    assert mesh.model("x").hosts == ("a",) and mesh.model("x").on_disk == ("a",)
    assert mesh.model("y").size_bytes == 9 and mesh.model("y").requested_by == ("b",)
    assert mesh.model("z").hosts == () and mesh.model("z").size_bytes == 7


def test_hosts_of_leaves_out_split_workers_and_sorts_by_node_id():
    mesh = MeshView("c", (
        NodeView("c", role="host", serving=("m",)),
        NodeView("w", role="worker", serving=("m",)),
        NodeView("a", role="host", serving=("m",)),
    ))
    assert [n.node_id for n in mesh.hosts_of("m")] == ["a", "c"]
    assert mesh.hosts_of("other") == ()


def test_with_node_replaces_a_node_by_id():
    mesh = MeshView("a", (NodeView("a", load=1), NodeView("b")))
    updated = mesh.with_node(NodeView("a", load=5))
    assert updated.node("a").load == 5 and len(updated.nodes) == 2
    assert mesh.node("a").load == 1


def test_freeze_makes_nested_settings_read_only():
    frozen = freeze({"a": {"b": [1, {"c": 2}]}})
    assert frozen["a"]["b"] == (1, freeze({"c": 2}))
    with pytest.raises(TypeError):
        frozen["a"]["b2"] = 1
