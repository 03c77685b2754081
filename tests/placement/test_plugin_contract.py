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
