"""Loading plugins, ordering, disabling, settings, check-config problems, run-time isolation."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from meshd.config import Config
from meshd.placement import plugins
from meshd.placement import rules as placement
from meshd.placement.hookspecs import hookimpl
from meshd.placement.snapshot import GB, MeshView, ModelFile, NodeView

HOSTS = (NodeView("a", role="host", serving=("m",)), NodeView("b", role="host", serving=("m",)))
# as a passive client sees them: neither host is the asking node, so the default hashes
MESH = MeshView("me", HOSTS)


def config(plugin_list=(), disable=(), settings=None):
    return Config().replace(
        "policy", plugins=list(plugin_list), disable=list(disable), settings=dict(settings or {})
    )


def load(cfg, **kw):
    kw.setdefault("plugins_dir", None)
    kw.setdefault("entry_points", [])
    kw.setdefault("search_dirs", [])
    return plugins.load(cfg, **kw)


def check(cfg, **kw):
    try:
        load(cfg, **kw)
    except plugins.PluginError as e:
        return e.problems
    return []


def write(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# a plugin file as the docs write one: the marker, then the hooks
MARKED = """
    import pluggy
    hookimpl = pluggy.HookimplMarker("meshd")
"""
# the same, for a one-hook file written inline: the def is on line 4
ONE_HOOK = "import pluggy\nhookimpl = pluggy.HookimplMarker('meshd')\n@hookimpl\n"
ALWAYS_B = MARKED + """
    @hookimpl
    def meshd_select_host(hosts):
        return "b"
"""
ALWAYS_A = MARKED + """
    @hookimpl
    def meshd_select_host(hosts):
        return "a"
"""


def default_choice(client="client"):
    return placement.choose_host("m", client, HOSTS, MESH)


def client_choosing(host):
    """A client id for which the default picks ``host`` (so a plugin's effect shows)."""
    return next(f"c{i}" for i in range(100) if default_choice(f"c{i}") == host)


# -- where plugins come from ---------------------------------------------------------------


def test_the_default_plugin_is_registered_through_the_manager():
    manager = load(config())
    assert list(manager.plugins) == ["default"]
    assert "meshd_select_host" in manager.plugins["default"].hooks


def test_a_plugin_file_is_asked_before_the_default(tmp_path):
    manager = load(config([write(tmp_path, "always_b.py", ALWAYS_B)]))
    assert placement.choose_host("m", client_choosing("a"), HOSTS, MESH, policy=manager) == "b"
    assert [p.name for p in manager.ordered()] == ["always_b", "default"]


def test_the_plugin_listed_first_is_asked_first(tmp_path):
    a, b = write(tmp_path, "always_a.py", ALWAYS_A), write(tmp_path, "always_b.py", ALWAYS_B)
    assert placement.choose_host("m", "c", HOSTS, MESH, policy=load(config([a, b]))) == "a"
    assert placement.choose_host("m", "c", HOSTS, MESH, policy=load(config([b, a]))) == "b"


def test_a_plugin_that_returns_none_leaves_the_decision_to_the_default(tmp_path):
    path = write(tmp_path, "shrug.py", ONE_HOOK + "def meshd_select_host():\n    return None\n")
    client = client_choosing("b")
    assert placement.choose_host("m", client, HOSTS, MESH, policy=load(config([path]))) == "b"


def test_a_glob_loads_every_matching_file(tmp_path):
    write(tmp_path, "one.py", ALWAYS_A)
    write(tmp_path, "two.py", ONE_HOOK + "def meshd_allow_download():\n    return False\n")
    manager = load(config([str(tmp_path / "*.py")]))
    assert set(manager.plugins) == {"one", "two", "default"}


def test_a_module_name_on_sys_path_is_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "acme_policy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg, "hosts.py", ALWAYS_B)
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = load(config(["acme_policy_pkg.hosts"]))
    assert "hosts" in manager.plugins and manager.plugins["hosts"].origin == "module acme_policy_pkg.hosts"


def test_a_bare_name_is_found_in_the_search_dirs(tmp_path):
    write(tmp_path, "my_policy_xyz.py", ALWAYS_B)
    manager = load(config(["my_policy_xyz"]), search_dirs=[str(tmp_path)])
    assert "my_policy_xyz" in manager.plugins


def test_files_in_the_plugins_dir_load_without_being_named(tmp_path):
    write(tmp_path, "dropin.py", ALWAYS_B)
    manager = load(config(), plugins_dir=str(tmp_path))
    assert "dropin" in manager.plugins


def test_a_missing_default_plugins_dir_is_not_a_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS_DIR", str(tmp_path / "nope"))
    assert check(config(), plugins_dir=str(tmp_path / "nope")) == []


def test_a_file_named_in_the_config_and_in_the_plugins_dir_loads_once(tmp_path):
    path = write(tmp_path, "dropin.py", ALWAYS_B)
    manager = load(config([path]), plugins_dir=str(tmp_path))
    assert list(manager.plugins) == ["default", "dropin"]


class FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"fake.{name}", obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


class AlwaysB:
    @hookimpl
    def meshd_select_host(self, hosts):
        return "b"


def test_entry_point_plugins_are_registered_under_their_name():
    manager = load(config(), entry_points=[FakeEntryPoint("acme", AlwaysB())])
    assert placement.choose_host("m", client_choosing("a"), HOSTS, MESH, policy=manager) == "b"
    assert manager.plugins["acme"].origin == "entry point acme = fake.acme"


def test_an_entry_point_that_fails_to_import_is_a_problem_naming_it():
    problems = check(config(), entry_points=[FakeEntryPoint("acme", error=ImportError("no numpy"))])
    assert problems == ["plugin acme (entry point acme = fake.acme): cannot import: ImportError: no numpy"]


def test_two_plugins_with_one_name_is_a_problem(tmp_path):
    (tmp_path / "x").mkdir()
    a = write(tmp_path, "dup.py", ALWAYS_A)
    b = write(tmp_path / "x", "dup.py", ALWAYS_B)
    problems = check(config([a, b]))
    assert len(problems) == 1 and "already used by" in problems[0]


# -- disabling -------------------------------------------------------------------------


def test_disabling_a_plugin_by_name_keeps_it_from_being_imported(tmp_path):
    path = write(tmp_path, "broken.py", "raise RuntimeError('never imported')\n")
    manager = load(config([path], disable=["broken"]))
    assert "broken" not in manager.plugins


def test_disabling_one_default_hook_removes_only_that_hook():
    manager = load(config(disable=["default:select_host"]))
    default = manager.plugins["default"]
    assert "meshd_select_host" not in default.hooks and "meshd_promote" in default.hooks
    assert default.disabled == ("meshd_select_host",)
    assert manager.pm.hook.meshd_select_host.get_hookimpls() == []


def test_the_hook_prefix_is_optional_in_disable():
    manager = load(config(disable=["default:meshd_allow_download"]))
    assert "meshd_allow_download" not in manager.plugins["default"].hooks


def test_with_the_default_host_selection_disabled_a_plugin_decides_alone(tmp_path):
    # the plugin answers only for model "m"; with the default out, it is the only opinion
    path = write(tmp_path, "only_b.py", ALWAYS_B)
    manager = load(config([path], disable=["default:select_host"]))
    assert placement.choose_host("m", client_choosing("a"), HOSTS, MESH, policy=manager) == "b"


def test_a_decision_nobody_answers_falls_back_to_the_built_in_default():
    manager = load(config(disable=["default:select_host", "default:elect_host"]))
    client = client_choosing("b")
    assert placement.choose_host("m", client, HOSTS, MESH, policy=manager) == "b"
    group = (NodeView("a", role="host", vram_bytes=GB), NodeView("b", role="host", vram_bytes=2 * GB))
    assert placement.elect_host("m", group, MESH, policy=manager) == "b"


def test_a_download_nobody_allows_is_not_made():
    manager = load(config(disable=["default:allow_download"]))
    me = NodeView("me", vram_bytes=100 * GB)
    decision = placement.allow_download("m", GB, me, MESH, policy=manager)
    assert not decision.allowed and "no plugin allowed" in decision.reason


def test_disabling_the_whole_default_leaves_conservative_answers():
    manager = load(config(disable=["default"]))
    s = NodeView("s", role="standby", vram_bytes=8 * GB, available_models=(ModelFile("m", GB),))
    assert not placement.should_promote(s, MeshView("s", (s,)), policy=manager).promote
    assert placement.assign_model(s, MeshView("s", (s,)), policy=manager).model is None


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("nosuch:select_host", "[policy] disable: no plugin named 'nosuch' is loaded (loaded: default)"),
        ("default:selekt_host", "[policy] disable: default:meshd_selekt_host: meshd_selekt_host is not a meshd hook"),
        ("default:", "[policy] disable: 'default:': expected \"plugin\" or \"plugin:hook\""),
    ],
)
def test_a_bad_disable_entry_is_a_problem(entry, expected):
    assert check(config(disable=[entry])) == [expected]


# -- settings -------------------------------------------------------------------------


SETTINGS_PLUGIN = MARKED + """
    SEEN = []

    @hookimpl
    def meshd_configure(settings):
        if "host" not in settings:
            raise ValueError("host: required")
        SEEN.append(settings)

    @hookimpl
    def meshd_select_host(settings):
        return settings["host"]
"""


def test_each_plugin_gets_its_own_settings_table(tmp_path):
    path = write(tmp_path, "fixed.py", SETTINGS_PLUGIN)
    manager = load(config([path], settings={"fixed": {"host": "b"}}))
    assert placement.choose_host("m", client_choosing("a"), HOSTS, MESH, policy=manager) == "b"
    assert [dict(s) for s in manager.plugins["fixed"].obj.SEEN] == [{"host": "b"}]


def test_configure_rejecting_settings_is_a_problem_naming_the_table(tmp_path):
    path = write(tmp_path, "fixed.py", SETTINGS_PLUGIN)
    problems = check(config([path]))
    assert problems == [f"[policy.fixed] host: required (plugin fixed, {path})"]


def test_a_settings_table_for_no_loaded_plugin_is_a_problem():
    assert check(config(settings={"pinnned": {"m": ["a"]}})) == [
        "[policy.pinnned]: no plugin named 'pinnned' is loaded (loaded: default)"
    ]


# -- check-config problems --------------------------------------------------------------


def test_check_reports_a_missing_module():
    problems = check(config(["no_such_meshd_plugin_module"]))
    assert problems == ["[policy] plugins: no_such_meshd_plugin_module: no module named 'no_such_meshd_plugin_module' on sys.path"]


def test_check_reports_a_missing_file(tmp_path):
    assert check(config([str(tmp_path / "gone.py")])) == [f"[policy] plugins: {tmp_path}/gone.py: no such file"]


def test_check_reports_a_syntax_error_with_file_and_line(tmp_path):
    path = write(tmp_path, "bad.py", "x = 1\ndef meshd_select_host(:\n    pass\n")
    problems = check(config([path]))
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: plugin bad: syntax error")


def test_check_reports_an_import_error_with_file_and_line(tmp_path):
    path = write(tmp_path, "needs.py", "import os\nimport not_installed_anywhere_xyz\n")
    problems = check(config([path]))
    assert problems == [
        f"{path}:2: plugin needs: cannot import: ModuleNotFoundError: No module named 'not_installed_anywhere_xyz'"
    ]


def test_check_reports_a_misspelled_hook_with_a_suggestion(tmp_path):
    path = write(tmp_path, "typo.py", "\n\ndef meshd_selct_host(hosts):\n    return None\n")
    problems = check(config([path]))
    assert problems == [f"{path}:3: plugin typo ({path}): meshd_selct_host matches no meshd hook (did you mean meshd_select_host?)"]


def test_check_reports_an_argument_the_hook_does_not_have(tmp_path):
    path = write(tmp_path, "args.py", ONE_HOOK + "def meshd_select_host(model, host):\n    return None\n")
    problems = check(config([path]))
    assert len(problems) == 1
    assert f"{path}:3: plugin args ({path}): meshd_select_host(model, host): 'host' not among the hook's arguments" in problems[0]


def test_check_reports_a_plugin_without_hooks(tmp_path):
    path = write(tmp_path, "empty.py", "def helper():\n    return 1\n")
    assert check(config([path])) == [
        f"plugin empty ({path}): defines no hooks (functions marked @hookimpl, "
        "where hookimpl = pluggy.HookimplMarker(\"meshd\"))"
    ]


def test_check_rejects_hook_wrappers(tmp_path):
    body = """
        import pluggy
        hookimpl = pluggy.HookimplMarker("meshd")

        @hookimpl(wrapper=True)
        def meshd_select_host(hosts):
            return (yield)
    """
    path = write(tmp_path, "wrap.py", body)
    problems = check(config([path]))
    assert len(problems) == 1 and "is a hook wrapper" in problems[0]


def test_check_collects_every_problem_at_once(tmp_path):
    a = write(tmp_path, "typo.py", "def meshd_selct_host():\n    pass\n")
    b = write(tmp_path, "bad.py", "def (:\n")
    assert len(check(config([a, b, "no_such_meshd_plugin_module"]))) == 3


def test_a_hookimpl_for_a_marked_function_with_another_name_uses_specname(tmp_path):
    body = """
        import pluggy
        hookimpl = pluggy.HookimplMarker("meshd")

        @hookimpl(specname="meshd_select_host")
        def pick(hosts):
            return "b"
    """
    manager = load(config([write(tmp_path, "spec.py", body)]))
    assert placement.choose_host("m", client_choosing("a"), HOSTS, MESH, policy=manager) == "b"


def test_imported_meshd_functions_do_not_count_as_the_plugins_hooks(tmp_path):
    body = """
        import pluggy
        from meshd.placement.default import meshd_select_host

        hookimpl = pluggy.HookimplMarker("meshd")

        @hookimpl
        def meshd_allow_download():
            return False
    """
    manager = load(config([write(tmp_path, "reuse.py", body)]))
    assert manager.plugins["reuse"].hooks == ("meshd_allow_download",)


def test_check_pending_reports_an_unknown_hook_registered_behind_the_managers_back():
    manager = plugins.PolicyManager()

    class Sneaky:
        def meshd_nonexistent(self):
            return 1

    import pluggy

    Sneaky.meshd_nonexistent = pluggy.HookimplMarker("meshd")(Sneaky.meshd_nonexistent)
    manager.pm.register(Sneaky(), name="sneaky")
    problems = manager.check_pending()
    assert len(problems) == 1 and "meshd_nonexistent" in problems[0]


def test_plugins_check_returns_no_problems_for_a_good_config(tmp_path):
    path = write(tmp_path, "ok.py", ALWAYS_B)
    assert plugins.check(config([path]), plugins_dir=None, entry_points=[], search_dirs=[]) == []


# -- run-time isolation ---------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


RAISES = MARKED + """
    @hookimpl
    def meshd_select_host(hosts):
        return {}["missing"]
"""


def test_a_plugin_that_raises_gets_the_default_decision_and_a_log_line(tmp_path, caplog):
    manager = load(config([write(tmp_path, "raiser.py", RAISES)]))
    client = client_choosing("b")
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        assert placement.choose_host("m", client, HOSTS, MESH, policy=manager) == "b"
    [record] = caplog.records
    assert record.getMessage() == (
        "plugin raiser: meshd_select_host failed: KeyError: 'missing' (raiser.py:7); "
        "using the next plugin's answer"
    )
    assert record.exc_info is None  # one line for the operator, no traceback


@pytest.mark.parametrize(
    "body, problem",
    [
        (ONE_HOOK + "def meshd_select_host(hosts):\n    return 1\n", "expected a node_id (str), got int 1"),
        (ONE_HOOK + "def meshd_select_host(hosts):\n    return 'zzz'\n", "'zzz' is not one of the hosts (a, b)"),
        (ONE_HOOK + "def meshd_select_host(hosts):\n    return hosts[0]\n", "expected a node_id (str), got NodeView"),
    ],
)
def test_an_invalid_answer_gets_the_default_decision_and_a_log_line(tmp_path, caplog, body, problem):
    manager = load(config([write(tmp_path, "wrong.py", body)]))
    client = client_choosing("b")
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        assert placement.choose_host("m", client, HOSTS, MESH, policy=manager) == "b"
    [record] = caplog.records
    assert record.getMessage().startswith("plugin wrong: meshd_select_host returned an invalid answer: ")
    assert problem in record.getMessage()


def test_a_broken_plugin_never_breaks_any_decision(tmp_path):
    body = "".join(
        f"@hookimpl\ndef {hook}():\n    raise RuntimeError('boom')\n\n"
        for hook in ("meshd_select_host", "meshd_assign_model", "meshd_promote", "meshd_elect_host",
                     "meshd_plan_split", "meshd_allow_download")
    )
    manager = load(config([write(tmp_path, "boom.py", textwrap.dedent(MARKED) + body)]))
    s = NodeView("s", role="standby", vram_bytes=8 * GB, available_models=(ModelFile("x", GB),))
    mesh = MeshView("a", (*HOSTS, s))
    assert placement.choose_host("m", "c", HOSTS, mesh, policy=manager) in ("a", "b")
    assert placement.assign_model(s, mesh, policy=manager).model == "x"
    assert placement.should_promote(s, mesh, policy=manager).model == "x"
    assert placement.plan_split("m", GB, HOSTS, mesh, policy=manager).mode in ("solo", "wait")
    # the download gate fails closed: a broken gate refuses, and says so
    download = placement.allow_download("x", GB, s, mesh, policy=manager)
    assert not download.allowed and download.decided_by == "boom"
    assert "plugin boom refused the download: the plugin failed (RuntimeError: boom" in download.reason


def test_decided_by_names_the_plugin_that_answered(tmp_path):
    path = write(tmp_path, "nodl.py", ONE_HOOK + "def meshd_allow_download():\n    return False\n")
    manager = load(config([path]))
    decision = placement.allow_download("m", GB, NodeView("me", vram_bytes=8 * GB), MESH, policy=manager)
    assert (decision.allowed, decision.decided_by) == (False, "nodl")
    assert decision.reason == "m: plugin nodl refused the download"


def test_repeated_failures_are_logged_once_per_interval_with_a_count(tmp_path, caplog):
    clock = Clock()
    manager = load(config([write(tmp_path, "raiser.py", RAISES)]), clock=clock, report_every_s=60)
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        for _ in range(5):
            placement.choose_host("m", "c", HOSTS, MESH, policy=manager)
        assert len(caplog.records) == 1
        clock.now = 61
        placement.choose_host("m", "c", HOSTS, MESH, policy=manager)
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage().endswith("(4 more since the last report)")


class SteppingTimer:
    """Each reading is ``step`` seconds after the previous one."""

    def __init__(self, step):
        self.step, self.now = step, 0.0

    def __call__(self):
        self.now += self.step
        return self.now


def test_a_slow_hook_is_reported_naming_the_plugin(tmp_path, caplog):
    manager = load(config([write(tmp_path, "slowpoke.py", ALWAYS_B)]), timer=SteppingTimer(0.2), slow_call_s=0.05)
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        assert placement.choose_host("m", "c", HOSTS, MESH, policy=manager) == "b"
    [record] = caplog.records
    assert record.getMessage().startswith("plugin slowpoke: meshd_select_host took 200 ms (hooks must return within 50 ms")


def test_a_fast_hook_is_not_reported(tmp_path, caplog):
    manager = load(config([write(tmp_path, "quick.py", ALWAYS_B)]), timer=SteppingTimer(0.001), slow_call_s=0.05)
    with caplog.at_level(logging.WARNING, logger="meshd.policy"):
        placement.choose_host("m", "c", HOSTS, MESH, policy=manager)
    assert caplog.records == []


def test_trace_env_logs_every_hook_call_and_who_answered(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MESHD_TRACE_HOOKS", "1")
    manager = load(config([write(tmp_path, "always_b.py", ALWAYS_B)]))
    with caplog.at_level(logging.INFO, logger="meshd.policy"):
        placement.choose_host("m", "c", HOSTS, MESH, policy=manager)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "trace: meshd_select_host(model='m', client_id='c', hosts=(a, b), mesh=<mesh me: 2 nodes>) asking always_b, default",
        "trace: meshd_select_host -> 'b' (answered by always_b)",
    ]


def test_without_the_trace_env_hook_calls_are_not_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MESHD_TRACE_HOOKS", raising=False)
    manager = load(config([write(tmp_path, "always_b.py", ALWAYS_B)]))
    with caplog.at_level(logging.DEBUG, logger="meshd.policy"):
        placement.choose_host("m", "c", HOSTS, MESH, policy=manager)
    assert not [r for r in caplog.records if r.getMessage().startswith("trace:")]


# -- schema keys the lead may add: [policy] plugins_dir, slow_hook_ms ---------------------


def policy_only(**policy):
    from types import SimpleNamespace

    base = {"plugins": [], "disable": [], "settings": {}}
    return SimpleNamespace(policy=SimpleNamespace(**{**base, **policy}))


def test_the_plugins_dir_comes_from_the_config_when_the_schema_has_it(tmp_path):
    write(tmp_path, "dropin.py", ALWAYS_B)
    manager = plugins.load(policy_only(plugins_dir=str(tmp_path)), entry_points=[], search_dirs=[])
    assert "dropin" in manager.plugins


def test_the_slow_threshold_comes_from_the_config_when_the_schema_has_it():
    manager = plugins.load(policy_only(slow_hook_ms=5.0), plugins_dir=None, entry_points=[])
    assert manager.slow_call_s == pytest.approx(0.005)
