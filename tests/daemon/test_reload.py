"""Live reload (``meshd.daemon.reload``): what each changed key does, a broken file, the
notify sequence, the API key, ``[models] serve``, and ``meshctl reload`` over the real
control socket.

The node, the policy plugins (real files, imported as the daemon imports them), the
election (a real ``Rebalancer`` with recording start/stop), the API and the notify
socket are real; time is a ``Clock``.  The real-systemd form is
``tests/daemon/test_systemd_reload.py``.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import pytest_twisted
import toml
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

from meshd import config as configmod
from meshd.cli import meshctl
from meshd.config import ApiConfig, Config
from meshd.daemon.backends import LocalBackends
from meshd.daemon.control import listen_control
from meshd.daemon.node import Node, RoleParts
from meshd.daemon.reload import Effect, Reloader, changes, running_config
from meshd.daemon.sdnotify import Notifier
from meshd.errors import Refused
from meshd.mesh.desired import Want
from meshd.placement import plugins
from meshd.placement.election import Rebalancer
from meshd.serving.api import ApiServer
from tests.harness.localhub import gguf_bytes

GIB = 1024**3

PLUGIN = """\
import pluggy

hookimpl = pluggy.HookimplMarker("meshd")
VERSION = {version}


@hookimpl
def meshd_elect_host(model, group, mesh, settings):
    return settings.get("host")
"""


class Setup:
    """A node with a config file on disk, its plugins directory and a Reloader."""

    def __init__(self, tmp: Path, notifier: Notifier, *, entry_points=()):
        self.tmp = tmp
        self.path = tmp / "meshd.toml"
        self.models = tmp / "models"
        self.models.mkdir()
        self.plugins_dir = tmp / "plugins.d"
        self.plugins_dir.mkdir()
        for name in ("alpha", "beta", "gamma"):
            (self.models / f"{name}.gguf").write_bytes(gguf_bytes(name=name))
        self.doc = {
            "node": {
                "state_dir": str(tmp / "state"),
                "models_dir": str(self.models),
                "control_socket": str(tmp / "control.sock"),
                "vram_gb": 8.0,
            },
            "policy": {"plugins_dir": str(self.plugins_dir)},
            "log": {"level": "info"},
        }
        self.entry_points = list(entry_points)
        self.notifier = notifier
        notifier.was_ready = True  # as after the start's READY=1
        self.clock = Clock()
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.fetched: list[str] = []
        self.log_applied: list[tuple[str, str]] = []

    def write(self, **sections) -> None:
        for section, values in sections.items():
            self.doc.setdefault(section, {}).update(values)
        self.path.write_text(toml.dumps(self.doc))

    def load_policy(self, config: Config):
        return plugins.load_checked(config, entry_points=self.entry_points)

    def start(self, key_holders=()) -> Reloader:
        self.write()
        config = configmod.load(str(self.path))
        node = self.node = Node(config, reactor=self.clock, node_id="node-a", vram_bytes=8 * GIB)
        node.policy, problems = self.load_policy(config)
        assert problems == []
        node.rescan()
        self.rebalancer = Rebalancer(
            node, reactor=self.clock, start=self.started.append, stop=self.stopped.append
        )
        node.use(RoleParts(rebalancer=self.rebalancer))
        self.backends = LocalBackends(node, config, reactor=self.clock, notifier=self.notifier)
        first = None
        if config.models.serve:
            first = config.models.serve[0]
            self.backends.serve(first, str(self.models / f"{first}.gguf"), 1)
            node.wanted = list(config.models.serve[1:])
        self.reloader = Reloader(
            config,
            node=node,
            notifier=self.notifier,
            reread=lambda: configmod.load(str(self.path)),
            key_holders=key_holders,
            backends=self.backends,
            first=first,
            fetch=lambda r: self.fetched.append(r.name),
            load_policy=self.load_policy,
            apply_log=lambda level, fmt: self.log_applied.append((level, fmt)),
        )
        node.reloader = self.reloader.reload
        return self.reloader


@pytest.fixture
def notify(tmp_path):
    """A Notifier sending to a datagram socket of the test's: ``(notifier, received())``."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)

    def received() -> list[list[str]]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return out

    yield Notifier(path), received
    sock.close()


@pytest.fixture
def setup(tmp_path, notify):
    return Setup(tmp_path, notify[0])


# -- what each changed key does ------------------------------------------------------


def test_changes_name_each_key_applied_or_needing_a_restart():
    old = Config()
    new = (
        old.replace("log", level="debug")
        .replace("mesh", heartbeat_s=3.0)
        .replace("api", api_key="s3cret")
        .replace("models", serve=["alpha"])
        .replace("policy", plugins=["pinned"], settings={"pinned": {"m": "n"}})
        .replace("node", vram_gb=4.0)
    )
    found = {c.key: (c.effect, c.change) for c in changes(old, new)}
    assert found == {
        "[node] vram_gb": (Effect.RESTART, "None -> 4.0"),
        "[mesh] heartbeat_s": (Effect.RESTART, "2.0 -> 3.0"),
        "[api] api_key": (Effect.APPLIED, "set"),
        "[models] serve": (Effect.APPLIED, "[] -> ['alpha']"),
        "[policy] plugins": (Effect.APPLIED, "[] -> ['pinned']"),
        "[policy.pinned]": (Effect.APPLIED, "added"),
        "[log] level": (Effect.APPLIED, "'info' -> 'debug'"),
    }


def test_secrets_are_never_shown_in_a_change():
    old = Config().replace("api", api_key="old-key").replace("mesh", join=["meshd1.OLD"])
    new = old.replace("api", api_key="new-key").replace("mesh", join=["meshd1.NEW"])
    text = repr(changes(old, new))
    assert "old-key" not in text and "new-key" not in text and "meshd1" not in text
    assert {c.key: c.change for c in changes(old, new)} == {
        "[mesh] join": "changed",
        "[api] api_key": "changed",
    }


def test_the_running_config_takes_only_the_live_keys():
    old = Config()
    new = old.replace("log", level="debug").replace("mesh", heartbeat_s=3.0)
    running = running_config(old, new)
    assert running.log.level == "debug"
    assert running.mesh.heartbeat_s == 2.0


def test_a_reload_applies_the_log_level_and_logs_each_key_that_needs_a_restart(setup, caplog):
    reloader = setup.start()
    setup.write(log={"level": "debug", "format": "json"}, mesh={"heartbeat_s": 3.0})
    with caplog.at_level(logging.INFO, logger="meshd.daemon.reload"):
        answer = reloader.reload()
    assert setup.log_applied == [("debug", "json")]
    assert {c["key"] for c in answer["applied"]} == {"[log] level", "[log] format"}
    assert answer["restart_needed"] == [{"key": "[mesh] heartbeat_s", "change": "2.0 -> 3.0"}]
    assert (
        "reload: [mesh] heartbeat_s 2.0 -> 3.0: needs a restart (systemctl restart "
        "meshd); running with the old value until then"
    ) in caplog.messages
    assert "reload: [log] level 'info' -> 'debug': applied" in caplog.messages
    # the node runs on with the old value of a key that needs a restart
    assert setup.node.config.mesh.heartbeat_s == 2.0
    assert setup.node.config.log.level == "debug"


def test_a_reload_of_an_unchanged_file_changes_nothing_and_says_so(setup):
    reloader = setup.start()
    answer = reloader.reload()
    assert (answer["applied"], answer["restart_needed"]) == ([], [])
    assert setup.log_applied == []
    assert meshctl.reload_lines(answer)[:2] == [f"reloaded {setup.path}", "no setting changed"]


def test_the_real_log_apply_sets_the_root_level():
    from meshd import logs

    root = logging.getLogger()
    before = root.level
    try:
        logs.apply("warning", "text")
        assert root.level == logging.WARNING
        logs.apply("debug", "json")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


# -- a broken file -------------------------------------------------------------------


BROKEN = {
    "not TOML": ("[log\nlevel = 'debug'\n", "not valid TOML"),
    "a bad value": ("[log]\nlevel = 'loud'\n", "[log] level: 'loud' is not one of"),
    "an unknown key": ("[api]\napi_kye = 'x'\n", "[api] api_kye: unknown key"),
    "a model that cannot be resolved": (
        "[models]\nserve = ['/nowhere/none.gguf']\n",
        "[models] serve[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_file_changes_nothing_and_the_reload_says_why(setup, case):
    reloader = setup.start()
    policy, config = setup.node.policy, setup.node.config
    text, reason = BROKEN[case]
    # the broken file also asks for changes that would be applied: none may be
    setup.path.write_text(
        text + "\n[node]\nvram_gb = 2.0\n"
        if case == "not TOML"
        else text + "\n[policy]\nplugins = ['pinned']\n"
    )
    with pytest.raises(Refused) as refused:
        reloader.reload()
    assert reason in refused.value.reason
    assert refused.value.reason.startswith(f"{setup.path} not reloaded, nothing changed: ")
    assert setup.node.policy is policy
    assert setup.node.config is config and reloader.config is config
    assert setup.log_applied == []


def test_a_plugin_with_a_syntax_error_changes_nothing_and_names_its_file_and_line(setup):
    (setup.plugins_dir / "steady.py").write_text(PLUGIN.format(version=1))
    reloader = setup.start()
    policy = setup.node.policy
    (setup.plugins_dir / "broken.py").write_text("def meshd_elect_host(:\n")
    setup.write(log={"level": "debug"})
    with pytest.raises(Refused) as refused:
        reloader.reload()
    assert f"{setup.plugins_dir / 'broken.py'}:1: plugin broken: syntax error" in (
        refused.value.reason
    )
    assert setup.node.policy is policy
    assert setup.log_applied == []  # the log level of the same file is not applied either


def test_every_problem_is_in_the_answer_not_only_the_first(setup):
    reloader = setup.start()
    (setup.plugins_dir / "broken.py").write_text("import nosuchmodule_here\n")
    setup.write(models={"serve": ["/nowhere/none.gguf"]})
    with pytest.raises(Refused) as refused:
        reloader.reload()
    assert "[models] serve[0]" in refused.value.reason
    assert "plugin broken: cannot import" in refused.value.reason


def test_a_refused_reload_is_logged_with_every_problem(setup, caplog):
    reloader = setup.start()
    setup.path.write_text("[log]\nlevel = 'loud'\n")
    with caplog.at_level(logging.ERROR, logger="meshd.daemon.reload"), pytest.raises(Refused):
        reloader.reload()
    assert any(
        m.startswith("reload refused, nothing changed: ") and "'loud'" in m for m in caplog.messages
    )


# -- the notify sequence ---------------------------------------------------------------


def test_a_reload_says_reloading_with_monotonic_usec_then_ready(setup, notify):
    _, received = notify
    reloader = setup.start()
    received()
    setup.write(log={"level": "debug"})
    reloader.reload()
    sent = received()
    assert [m[0] for m in sent] == ["RELOADING=1", "READY=1"]
    assert sent[0][1].startswith("MONOTONIC_USEC=") and int(sent[0][1].split("=")[1]) > 0
    assert f"STATUS=idle, serving nothing, API on {ApiConfig().listen}" in sent[1]


def test_a_refused_reload_still_ends_with_ready_and_says_so_in_the_status(setup, notify):
    _, received = notify
    reloader = setup.start()
    received()
    setup.path.write_text("[log]\nlevel = 'loud'\n")
    with pytest.raises(Refused):
        reloader.reload()
    sent = received()
    assert [m[0] for m in sent] == ["RELOADING=1", "READY=1"]
    assert any(f.startswith("STATUS=last reload refused, nothing changed") for f in sent[1])


def test_no_reload_and_no_notify_before_the_start_said_ready(setup, notify):
    _, received = notify
    reloader = setup.start()
    setup.notifier.was_ready = False
    reloader.not_now = lambda: None if setup.notifier.was_ready else "meshd is still starting"
    received()
    with pytest.raises(Refused, match="still starting"):
        reloader.reload()
    assert received() == []  # a READY=1 now would end systemd's start job early


# -- policy plugins ---------------------------------------------------------------------


def test_drop_in_plugins_are_imported_again_and_their_settings_read_again(setup, caplog):
    (setup.plugins_dir / "steady.py").write_text(PLUGIN.format(version=1))
    setup.doc["policy"]["steady"] = {"host": "node-a"}
    reloader = setup.start()
    assert setup.node.policy.plugins["steady"].obj.VERSION == 1
    (setup.plugins_dir / "steady.py").write_text(PLUGIN.format(version=2))
    (setup.plugins_dir / "newer.py").write_text(PLUGIN.format(version=7))
    setup.write(policy={"steady": {"host": "node-b"}})
    with caplog.at_level(logging.INFO, logger="meshd.daemon.reload"):
        answer = reloader.reload()
    policy = setup.node.policy
    assert policy.plugins["steady"].obj.VERSION == 2
    assert dict(policy.plugins["steady"].settings) == {"host": "node-b"}
    assert [p.partition(" ")[0] for p in answer["plugins"]] == ["newer", "steady", "default"]
    assert {"key": "[policy.steady]", "change": "changed"} in answer["applied"]
    assert any(
        m.startswith("reload: policy plugins, asked in this order: newer") for m in caplog.messages
    )


def test_a_removed_drop_in_plugin_is_no_longer_asked(setup):
    (setup.plugins_dir / "steady.py").write_text(PLUGIN.format(version=1))
    reloader = setup.start()
    (setup.plugins_dir / "steady.py").unlink()
    reloader.reload()
    assert list(setup.node.policy.plugins) == ["default"]


class EntryPoint:
    name = "installed"
    value = "installed_policy:plugin"

    def __init__(self, module):
        self.module = module

    def load(self):
        return self.module


def test_an_entry_point_plugin_gets_its_settings_again_and_the_log_says_code_needs_a_restart(
    tmp_path, notify, caplog
):
    import types

    module = types.ModuleType("installed_policy")
    exec(PLUGIN.format(version=1), module.__dict__)  # noqa: S102 - the test's own plugin text
    setup = Setup(tmp_path, notify[0], entry_points=[EntryPoint(module)])
    reloader = setup.start()
    setup.write(policy={"installed": {"host": "node-a"}})
    with caplog.at_level(logging.INFO, logger="meshd.daemon.reload"):
        answer = reloader.reload()
    assert dict(setup.node.policy.plugins["installed"].settings) == {"host": "node-a"}
    note = (
        "plugin installed (entry point installed = installed_policy:plugin): settings read "
        "again, code as imported at start: a new version of it needs a restart "
        "(systemctl restart meshd)"
    )
    assert note in answer["notes"]
    assert f"reload: {note}" in caplog.messages


# -- [api] api_key ------------------------------------------------------------------


class NoModels:
    def models(self):
        return []


_pool = HTTPConnectionPool(reactor, persistent=False)


async def _models(url: str, key: str | None) -> int:
    headers = {"Authorization": [f"Bearer {key}"]} if key else {}
    response = await treq.get(url, headers=headers, pool=_pool)
    await response.content()
    return response.code


@pytest_twisted.ensureDeferred
async def test_a_new_api_key_is_asked_of_the_next_request(setup):
    api = ApiServer(NoModels(), ApiConfig(api_key="old-key"), reactor=reactor)
    port = reactor.listenTCP(0, api.site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/v1/models"
    try:
        setup.doc["api"] = {"api_key": "old-key"}
        reloader = setup.start(key_holders=[api])
        assert await _models(url, "old-key") == 200
        setup.write(api={"api_key": "new-key"})
        answer = reloader.reload()
        assert answer["applied"] == [{"key": "[api] api_key", "change": "changed"}]
        assert await _models(url, "old-key") == 401
        assert await _models(url, "new-key") == 200
        setup.write(api={"api_key": ""})
        reloader.reload()
        assert await _models(url, None) == 200
    finally:
        api.pool.close()
        await port.stopListening()


# -- [models] serve --------------------------------------------------------------------


def test_a_new_first_model_replaces_this_nodes_model_through_the_election(setup):
    setup.doc["models"] = {"serve": ["alpha"]}
    reloader = setup.start()
    assert setup.started == ["alpha"]
    setup.write(models={"serve": ["beta"]})
    answer = reloader.reload()
    assert setup.stopped == ["alpha"]
    assert setup.started == ["alpha", "beta"]
    assert setup.rebalancer.target == "beta"
    assert "stopped serving alpha: [models] serve names beta first now" in answer["notes"]


def test_an_emptied_serve_list_stops_this_nodes_model_and_leaves_it_idle(setup):
    setup.doc["models"] = {"serve": ["alpha", "beta"]}
    reloader = setup.start()
    setup.write(models={"serve": []})
    reloader.reload()
    assert setup.stopped == ["alpha"]
    assert setup.rebalancer.target is None
    assert setup.node.wanted == []
    assert setup.node.local_info()["requested_models"] == []


def test_the_other_entries_are_announced_as_wanted_without_touching_this_nodes_model(setup):
    setup.doc["models"] = {"serve": ["alpha", "beta"]}
    reloader = setup.start()
    setup.write(models={"serve": ["alpha", "gamma"]})
    answer = reloader.reload()
    assert (setup.started, setup.stopped) == (["alpha"], [])
    assert setup.node.local_info()["requested_models"] == ["gamma"]
    assert "models wanted from the mesh: gamma" in answer["notes"]


def test_an_idle_node_given_a_model_serves_it(setup):
    reloader = setup.start()
    setup.write(models={"serve": ["gamma"]})
    reloader.reload()
    assert setup.started == ["gamma"]
    assert setup.rebalancer.target == "gamma"


def test_a_model_not_on_disk_is_downloaded_first(setup):
    reloader = setup.start()
    from meshd.models.catalog import load_catalog

    name = next(iter(load_catalog().entries))
    setup.write(models={"serve": [name]})
    answer = reloader.reload()
    assert setup.fetched == [name]
    assert setup.started == []
    assert f"serving {name}: not on disk, downloading it first" in answer["notes"]


def test_a_model_dropped_mesh_wide_is_not_served_again_by_a_reload(setup):
    reloader = setup.start()
    setup.node.desired.decide("beta", Want.DROPPED, by="another-node")
    setup.write(models={"serve": ["beta"]})
    answer = reloader.reload()
    assert setup.started == []
    assert "not serving beta: it was dropped mesh-wide (meshctl drop)" in answer["notes"]


def test_a_standby_keeps_serving_nothing_and_the_reload_says_why(setup):
    setup.doc["node"]["standby"] = True
    reloader = setup.start()
    setup.write(models={"serve": ["alpha"]})
    answer = reloader.reload()
    assert setup.started == []
    assert any("not used by a standby node" in n for n in answer["notes"])


# -- meshctl reload over the real control socket ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_meshctl_reload_prints_what_was_applied_and_exits_0(setup, capsys):
    setup.start()
    sock = str(setup.tmp / "control.sock")
    port = await listen_control(sock, setup.node, reactor=reactor)
    try:
        setup.write(log={"level": "debug"}, mesh={"heartbeat_s": 3.0})
        assert await deferToThread(meshctl.main, ["--socket", sock, "reload"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"reloaded {setup.path}"
        assert "applied: [log] level 'info' -> 'debug'" in out
        assert "needs a restart: [mesh] heartbeat_s 2.0 -> 3.0 (systemctl restart meshd)" in out
        assert out[-2:] == [
            "policy plugins, asked in this order:",
            "  1. default (built in, meshd.placement.default): "
            + setup.node.policy.summary()[0].split(": ", 1)[1],
        ]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_meshctl_reload_of_a_broken_file_exits_3_with_the_reason(setup, capsys):
    setup.start()
    sock = str(setup.tmp / "control.sock")
    port = await listen_control(sock, setup.node, reactor=reactor)
    try:
        setup.path.write_text("[log]\nlevel = 'loud'\n")
        assert await deferToThread(meshctl.main, ["--socket", sock, "reload"]) == 3
        err = capsys.readouterr().err
        assert err.startswith(f"meshctl: refused: {setup.path} not reloaded, nothing changed: ")
        assert "[log] level: 'loud' is not one of debug, info, warning, error" in err
        assert setup.node.config.log.level == "info"
    finally:
        await port.stopListening()


def test_the_console_asks_for_the_new_api_key_and_its_chat_follows_it():
    from meshd.console import server as console
    from tests.console.test_console import (
        FakeAgent,
        FakeNode,
        FakeResponse,
        chat_request,
        make_config,
        make_feed,
        render,
    )

    clock = Clock()
    node = FakeNode(clock)
    config = make_config(console_listen="0.0.0.0:3131", api_key="old-key")
    agent = FakeAgent(FakeResponse(200, {b"content-type": [b"application/json"]}, [b"{}"]))
    c = console.Console(
        node, config, reactor=clock, feed=make_feed(node, clock, config), agent=agent
    )
    c.use_api_key("new-key")
    assert (
        render(c, chat_request(headers={b"authorization": b"Bearer old-key"})).responseCode == 401
    )
    assert (
        render(c, chat_request(headers={b"authorization": b"Bearer new-key"})).responseCode == 200
    )
    # no key on a console open to the network: its chat is off, and says why
    c.use_api_key("")
    assert not c.feed.chat and "[api] api_key is not set" in c.feed.chat_reason
    assert c.feed.status()["console"]["api_key_required"] is False
