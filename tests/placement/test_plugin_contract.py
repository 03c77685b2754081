"""The plugin author's contract (docs/plugins.md), point by point, as a plugin author meets it.

Each test is named after the point of issue 14, item 7, that it holds: (a) host selection
decides everywhere and is asked once per request, (b) signatures meshd could not honour are
refused at load time, and the download gate fails closed, (c) ``default`` stays last,
(d) only marked functions are hooks, (e) ``--check-config`` finds what it promised to,
(g) a download refusal can say why.  The docs' own snippets are checked in
``test_docs_plugins.py`` (points f and h).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from meshd.config import Config
from meshd.passive.router import PassiveRouter
from meshd.placement import plugins
from meshd.placement.hookspecs import hookimpl
from meshd.placement.snapshot import GB
from meshd.serving.router import MeshRouter
from meshd.serving.routetable import NodeEntry, RouteTable, build_table
from tests.harness.meshfakes import make_node, peer, serve


def manager_with(*plugin_objects: tuple[str, object]) -> plugins.PolicyManager:
    """A manager asking each ``(name, object)`` in order, then the default."""
    from meshd.placement import default

    manager = plugins.PolicyManager()
    assert manager.add(default, "default", origin="built in") == []
    for name, obj in reversed(plugin_objects):
        assert manager.add(obj, name) == []
    return manager


class Recorder:
    """Records each host-selection call; answers ``choice`` (None: no opinion)."""

    def __init__(self, choice: str | None = None):
        self.choice = choice
        self.calls: list[tuple[tuple[str, ...], str]] = []

    @hookimpl
    def meshd_select_host(self, hosts, mesh):
        self.calls.append((tuple(h.node_id for h in hosts), mesh.self_id))
        return self.choice


def active_router(policy: plugins.PolicyManager) -> MeshRouter:
    """node-a hosts m1 and so does its peer node-b."""
    node = make_node("node-a")
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m1"])
    node.policy = policy
    router = MeshRouter(node, reactor=node.reactor, tunnel=lambda n, m: ("tunnel", n, m))
    node.router = router
    node.add_status_listener(router.invalidate)
    return router


# -- (a) meshd_select_host decides on every node, once per request ------------------------------


def test_a_on_a_hosting_node_the_hook_sees_every_host_with_this_node_marked():
    rec = Recorder()
    router = active_router(manager_with(("rec", rec)))
    router.upstreams("m1", "client")
    assert rec.calls == [(("node-a", "node-b"), "node-a")]  # this node is mesh.self_id


def test_a_the_default_keeps_this_nodes_llama_server_first():
    router = active_router(manager_with(("rec", Recorder())))
    for i in range(20):
        assert [u.name for u in router.upstreams("m1", f"c{i}")] == ["local", "node-b"]


def test_a_a_plugin_can_send_a_request_away_from_the_hosting_node():
    router = active_router(manager_with(("rec", Recorder("node-b"))))
    # the plugin's choice first, then this node's own llama-server to fail over to
    assert [u.name for u in router.upstreams("m1", "c")] == ["node-b", "local"]


def test_a_with_a_single_host_there_is_nothing_to_choose_and_the_hook_is_not_asked():
    rec = Recorder()
    node = make_node("node-a")
    serve(node, "m1")
    node.policy = manager_with(("rec", rec))
    router = MeshRouter(node, reactor=node.reactor, tunnel=lambda n, m: None)
    assert [u.name for u in router.upstreams("m1", "c")] == ["local"]
    assert rec.calls == []


IDS = [c * 26 for c in "abcdefgh"]


def passive_router(policy: plugins.PolicyManager, hosts: int) -> PassiveRouter:
    entries = tuple(NodeEntry(IDS[i], "host", 8 * GB, (f"127.0.0.1:{7000 + i}",), ("m1",))
                    for i in range(hosts))
    t = build_table(mesh_id="mesh1", source=IDS[0], nodes=entries, standby=())
    router = PassiveRouter(IDS[7], endpoint_for=lambda n, m: (n, m), policy=policy, started_at=0)
    router.update(RouteTable("t.1.1", t.mesh_id, t.source, t.hosts, t.active_nodes, t.standby))
    return router


def test_a_on_a_passive_client_the_hook_is_asked_once_per_request():
    rec = Recorder()
    router = passive_router(manager_with(("rec", rec)), hosts=3)
    ups = router.upstreams("m1", "alice")
    assert len(rec.calls) == 1
    assert rec.calls[0] == (tuple(IDS[:3]), IDS[7])  # every host; the client is none of them
    # its choice, then one host to fail over to: the next by node id
    assert len(ups) == 2 and ups[1].name == min(set(IDS[:3]) - {ups[0].name})


def test_a_on_a_passive_client_the_plugins_choice_goes_first():
    router = passive_router(manager_with(("rec", Recorder(IDS[2]))), hosts=3)
    assert [u.name for u in router.upstreams("m1", "c")] == [IDS[2], IDS[0]]


def write(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def load(cfg: Config, **kw):
    kw.setdefault("plugins_dir", None)
    kw.setdefault("entry_points", [])
    kw.setdefault("search_dirs", [])
    return plugins.load(cfg, **kw)


def problems_of(cfg: Config, **kw) -> list[str]:
    try:
        load(cfg, **kw)
    except plugins.PluginError as e:
        return e.problems
    return []


def policy(**changes) -> Config:
    return Config().replace("policy", **changes)


MARKER = "import pluggy\nhookimpl = pluggy.HookimplMarker('meshd')\n\n"


# -- (b) signatures meshd cannot honour are refused at load time; which hooks fail closed --------


def test_b_a_parameter_with_a_default_is_refused_at_load_time(tmp_path):
    path = write(tmp_path, "gate.py", MARKER + (
        "@hookimpl\n"
        "def meshd_allow_download(size_bytes, settings=None):\n"
        "    return size_bytes < settings['max_bytes']\n"))
    assert problems_of(policy(plugins=[path])) == [
        f"{path}:4: plugin gate ({path}): meshd_allow_download(size_bytes, settings=None): "
        "argument 'settings' has a default (settings=None), so meshd would never pass it "
        "(only arguments without a default are passed): write 'settings', not settings=None"
    ]


def test_b_star_args_and_star_star_kwargs_are_refused_at_load_time(tmp_path):
    for sig, shown in (("*args", "*args"), ("**kw", "**kw")):
        path = write(tmp_path, "stars.py", MARKER + f"@hookimpl\ndef meshd_select_host({sig}):\n    return None\n")
        [problem] = problems_of(policy(plugins=[path]))
        assert f"meshd_select_host({sig}): {shown} would always be empty" in problem


def test_b_a_download_gate_that_raises_fails_closed(tmp_path, caplog):
    import logging

    from meshd.placement import rules as placement
    from meshd.placement.snapshot import NodeView

    path = write(tmp_path, "gate.py", MARKER + (
        "@hookimpl\n"
        "def meshd_allow_download(settings):\n"
        "    return settings['missing']\n"))
    manager = load(policy(plugins=[path]))
    me = NodeView("me", vram_bytes=80 * GB)  # the default alone would allow it
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        decision = placement.allow_download("m", GB, me, policy=manager)
    assert not decision.allowed and decision.decided_by == "gate"
    assert decision.reason == (
        "m: plugin gate refused the download: the plugin failed (KeyError: 'missing', gate.py:6), "
        "and a download gate that fails refuses")
    assert ("plugin gate: meshd_allow_download failed: KeyError: 'missing' (gate.py:6); "
            "refusing the download") in caplog.text


def test_b_a_download_gate_with_an_invalid_answer_fails_closed(tmp_path):
    from meshd.placement import rules as placement
    from meshd.placement.snapshot import NodeView

    path = write(tmp_path, "gate.py", MARKER + "@hookimpl\ndef meshd_allow_download():\n    return 1\n")
    decision = placement.allow_download("m", GB, NodeView("me", vram_bytes=80 * GB),
                                        policy=load(policy(plugins=[path])))
    assert not decision.allowed and "the plugin failed (an invalid answer: expected True" in decision.reason


def test_b_every_other_hook_fails_over_to_the_next_plugin(tmp_path):
    from meshd.placement import rules as placement
    from meshd.placement.snapshot import MeshView, NodeView

    path = write(tmp_path, "boom.py", MARKER + "@hookimpl\ndef meshd_select_host():\n    raise RuntimeError('boom')\n")
    hosts = (NodeView("a"), NodeView("b"))
    mesh = MeshView("client", hosts)
    manager = load(policy(plugins=[path]))
    assert placement.choose_host("m", "c", hosts, mesh, policy=manager) == placement.choose_host("m", "c", hosts, mesh)


# -- (g) a download refusal can say why ----------------------------------------------------------


def test_g_a_download_gate_may_return_its_reason(tmp_path):
    from meshd.placement import rules as placement
    from meshd.placement.snapshot import NodeView

    path = write(tmp_path, "quota.py", MARKER + (
        "@hookimpl\n"
        "def meshd_allow_download(model, size_bytes):\n"
        "    if model == 'plain':\n"
        "        return False\n"
        "    if model == 'yes':\n"
        "        return True, 'within the monthly quota'\n"
        "    if size_bytes > 10:\n"
        "        return f'over the monthly quota by {size_bytes - 10} bytes'\n"
        "    return None\n"))
    manager = load(policy(plugins=[path]))
    me = NodeView("me", vram_bytes=80 * GB)

    def decide(model, size):
        d = placement.allow_download(model, size, me, policy=manager)
        return d.allowed, d.reason, d.decided_by

    assert decide("big", 15) == (False, "big: plugin quota refused the download: over the monthly quota by 5 bytes", "quota")
    assert decide("yes", 15) == (True, "yes: plugin quota allowed the download: within the monthly quota", "quota")
    assert decide("plain", 15) == (False, "plain: plugin quota refused the download", "quota")  # a bool still works
    allowed, reason, by = decide("small", 5)  # no opinion: the default, with its numbers
    assert allowed and by == "default" and reason.startswith("model small (")


# -- (c) default is always asked last, trylast or not --------------------------------------------


class Chooses:
    def __init__(self, host: str):
        self.host = host


class LastWord(Chooses):
    @hookimpl(trylast=True)
    def meshd_select_host(self):
        return self.host


class FirstWord(Chooses):
    @hookimpl(tryfirst=True)
    def meshd_select_host(self):
        return self.host


class PlainWord(Chooses):
    @hookimpl
    def meshd_select_host(self):
        return self.host


def test_c_a_trylast_plugin_is_asked_after_the_others_but_before_the_default(tmp_path):
    from meshd.placement import rules as placement
    from meshd.placement.snapshot import MeshView, NodeView

    hosts = (NodeView("a"), NodeView("b"))
    mesh = MeshView("a", hosts)  # the default would answer "a" (this node)
    manager = manager_with(("last", LastWord("b")))
    assert manager.hook_order("meshd_select_host") == ["last", "default"]
    assert placement.choose_host("m", "c", hosts, mesh, policy=manager) == "b"
    # the other plugins first, then the trylast one, then the default
    manager = manager_with(("last", LastWord("b")), ("plain", PlainWord("a")), ("first", FirstWord("a")))
    assert manager.hook_order("meshd_select_host") == ["first", "plain", "last", "default"]
    assert [p.name for p in manager.ordered()][-1] == "default"
    assert "last (object LastWord): select_host (trylast)" in manager.summary()


def test_c_the_default_stays_last_whatever_order_plugins_are_registered_in():
    from meshd.placement import default

    manager = plugins.PolicyManager()
    assert manager.add(LastWord("b"), "last") == []
    assert manager.add(default, "default", origin="built in") == []
    assert manager.add(LastWord("a"), "later") == []
    assert manager.hook_order("meshd_select_host")[-1] == "default"
    assert [p.name for p in manager.ordered()][-1] == "default"


def test_c_trylast_from_a_config_file_keeps_the_default_last(tmp_path):
    path = write(tmp_path, "late.py", MARKER + "@hookimpl(trylast=True)\ndef meshd_allow_download():\n    return False\n")
    manager = load(policy(plugins=[path]))
    assert manager.hook_order("meshd_allow_download") == ["late", "default"]


# -- (d) only functions marked @hookimpl are hooks -----------------------------------------------


def test_d_an_unmarked_meshd_function_is_refused_with_what_to_do(tmp_path):
    path = write(tmp_path, "unmarked.py", "def meshd_select_host(hosts):\n    return hosts[0].node_id\n")
    assert problems_of(policy(plugins=[path])) == [
        f"{path}:1: plugin unmarked ({path}): meshd_select_host is not marked as a hook, so it "
        "would never be called: put @hookimpl above it (hookimpl = pluggy.HookimplMarker(\"meshd\"))"
    ]


def test_d_an_unmarked_method_of_a_plugin_object_is_refused_too():
    class Unmarked:
        def meshd_promote(self):
            return False

    [problem] = plugins.PolicyManager().add(Unmarked(), "obj")
    assert "meshd_promote is not marked as a hook" in problem


def test_d_a_marked_function_with_any_name_is_a_hook_and_other_functions_are_not(tmp_path):
    path = write(tmp_path, "named.py", MARKER + (
        "def helper():\n    return 'b'\n\n"
        "@hookimpl(specname='meshd_select_host')\n"
        "def pick():\n    return helper()\n"))
    manager = load(policy(plugins=[path]))
    assert manager.plugins["named"].hooks == ("meshd_select_host",)


# -- (e) --check-config finds every problem at once, and shows the order -------------------------


def test_e_disabling_a_plugin_that_does_not_exist_is_a_problem():
    assert problems_of(policy(disable=["nosuch"])) == [
        "[policy] disable: 'nosuch': no plugin of that name is configured or found (known: default)"
    ]


def test_e_disabling_a_configured_plugin_is_fine_and_it_is_not_imported(tmp_path):
    path = write(tmp_path, "broken.py", "raise RuntimeError('never imported')\n")
    assert problems_of(policy(plugins=[path], disable=["broken"])) == []


def test_e_a_configured_plugins_dir_that_does_not_exist_is_a_problem(tmp_path):
    gone = str(tmp_path / "plugins.d")
    assert problems_of(policy(plugins_dir=gone), plugins_dir=plugins._FROM_CONFIG) == [
        f"[policy] plugins_dir: {gone}: no such directory"]
    afile = write(tmp_path, "afile", "")
    assert problems_of(policy(plugins_dir=afile), plugins_dir=plugins._FROM_CONFIG) == [
        f"[policy] plugins_dir: {afile}: not a directory"]


def test_e_a_glob_that_matches_nothing_is_a_problem(tmp_path):
    pattern = str(tmp_path / "*.py")
    assert problems_of(policy(plugins=[pattern])) == [f"[policy] plugins: {pattern}: matches no file"]


def test_e_settings_problems_show_even_when_another_plugin_does_not_load(tmp_path):
    bad = write(tmp_path, "bad.py", "def (:\n")
    picky = write(tmp_path, "picky.py", MARKER + (
        "@hookimpl\n"
        "def meshd_configure(settings):\n"
        "    raise ValueError('limit: required')\n"))
    problems = problems_of(policy(plugins=[bad, picky]))
    assert len(problems) == 2
    assert problems[0].startswith(f"{bad}:1: plugin bad: syntax error")
    assert problems[1] == f"[policy.picky] limit: required (plugin picky, {picky})"


def test_e_report_lists_the_loaded_plugins_in_the_order_they_are_asked(tmp_path):
    a = write(tmp_path, "a_first.py", MARKER + "@hookimpl\ndef meshd_select_host():\n    return None\n")
    b = write(tmp_path, "b_last.py", MARKER + "@hookimpl(trylast=True)\ndef meshd_allow_download():\n    return None\n")
    problems, order = plugins.report(policy(plugins=[a, b]), plugins_dir=None, entry_points=[], search_dirs=[])
    assert problems == []
    assert order[:2] == [f"a_first ({a}): select_host", f"b_last ({b}): allow_download (trylast)"]
    assert order[2].startswith("default (built in, meshd.placement.default): allow_download, ")


def test_e_check_config_prints_the_plugin_order_after_the_configuration(tmp_path):
    import subprocess
    import sys

    plugin = write(tmp_path, "site.py", MARKER + "@hookimpl\ndef meshd_select_host():\n    return None\n")
    cfg = tmp_path / "meshd.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}"\nmodels_dir = "{tmp_path}"\n'
                   f'[policy]\nplugins = ["{plugin}"]\nplugins_dir = ""\n')
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "meshd.cli.meshd", "--config", str(cfg), "--check-config"],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tail = r.stdout[r.stdout.index("# policy plugins"):].splitlines()
    assert tail[0] == "# policy plugins, asked in this order (first answer wins):"
    assert tail[1] == f"#   1. site ({plugin}): select_host"
    assert tail[2].startswith("#   2. default (built in, meshd.placement.default): ")
    # the output stays a TOML file: the order is in comments
    import tomllib

    assert tomllib.loads(r.stdout)["policy"]["plugins"] == [plugin]


def test_e_check_config_shows_every_plugin_problem_and_what_loaded(tmp_path):
    import subprocess
    import sys

    bad = write(tmp_path, "bad.py", "def (:\n")
    cfg = tmp_path / "meshd.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}"\nmodels_dir = "{tmp_path}"\n'
                   f'[policy]\nplugins = ["{bad}", "{tmp_path}/none*.py"]\ndisable = ["nosuch"]\n'
                   f'plugins_dir = "{tmp_path}/gone"\n')
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "meshd.cli.meshd", "--config", str(cfg), "--check-config"],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:1: plugin bad: syntax error" in r.stderr
    assert f"[policy] plugins: {tmp_path}/none*.py: matches no file" in r.stderr
    assert "[policy] disable: 'nosuch'" in r.stderr
    assert f"[policy] plugins_dir: {tmp_path}/gone: no such directory" in r.stderr
    assert "meshd: policy plugins that did load, asked in this order: default" in r.stderr
