"""Node names where people read them: ``[node] name``, ``meshctl status`` / ``peers`` (text
and ``--json``), the routing table, and the console's JSON.

The mesh is real (``MeshService`` objects over in-memory TLS, from ``test_names``);
the node is a real ``meshd.daemon.node.Node``; meshctl talks to the real control
socket.  Two peers share one name: both are listed, told apart by their ids.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.web.test.requesthelper import DummyRequest

from meshd import config as configmod
from meshd import nodename
from meshd.cli import meshctl
from meshd.config import Config, ConsoleConfig
from meshd.console import server as console
from meshd.daemon.control import listen_control
from meshd.daemon.node import Node
from meshd.placement.snapshot import ModelFile
from meshd.serving.routetable import CheckIn, NodeEntry, PassiveRegistry, RouteTable, build_table
from meshd.states import Role
from tests.mesh.test_names import link, service

GB = 2**30
HOSTILE = "<img src=x onerror=alert(1)>\x1b[31m\nINFO forged"

# -- [node] name ------------------------------------------------------------------------


def test_the_default_name_is_the_host_name(monkeypatch):
    monkeypatch.setattr(nodename.socket, "gethostname", lambda: "gpu-box-3")
    assert Config().node.name == "gpu-box-3"
    assert configmod.from_dict({}).node.name == "gpu-box-3"
    assert configmod.to_dict(Config())["node"]["name"] == "gpu-box-3"  # --check-config shows it


def test_a_configured_name_is_used():
    assert configmod.from_dict({"node": {"name": "rack2-gpu"}}).node.name == "rack2-gpu"


@pytest.mark.parametrize("value, words", [
    ("", "must not be empty"),
    ("x" * 65, "too long (at most 64)"),
    ("gpu\x1b[2J", "not printable"),
    ("gpu\nbox", "not printable"),
    (" gpu", "white space"),
])
def test_a_bad_name_is_refused_naming_the_key(value, words):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict({"node": {"name": value}})
    [problem] = e.value.problems
    assert problem.startswith("[node] name: ") and words in problem


def test_a_name_that_is_not_a_string_is_a_type_problem():
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict({"node": {"name": 7}})
    assert "[node] name: expected a string, got 7" in e.value.problems


# -- a node in a mesh of named peers --------------------------------------------------------


def named_mesh(tmp_path):
    """This node ("hub") with three peers: two share the name "gpu", one sends no name."""
    reactor = MemoryReactorClock()
    hub = service(tmp_path, "hub", {"name": "hub", "role": "idle"}, reactor)
    gpu1 = service(tmp_path, "g1", {"name": "gpu", "role": "idle"}, reactor, mesh=hub.mesh)
    gpu2 = service(tmp_path, "g2", {"name": "gpu", "role": "idle"}, reactor, mesh=hub.mesh)
    old = service(tmp_path, "old", {"role": "idle"}, reactor, mesh=hub.mesh)
    for peer in (gpu1, gpu2, old):
        link(hub, peer, reactor)
    node = Node(Config().replace("node", name="hub"), reactor=Clock(), node_id=hub.node_id,
                vram_bytes=8 * GB)
    node.mesh = hub
    return node, gpu1.node_id, gpu2.node_id, old.node_id


def test_status_json_leads_with_the_name_for_the_node_and_each_peer(tmp_path):
    node, g1, g2, old = named_mesh(tmp_path)
    doc = json.loads(json.dumps(node.status()))
    assert list(doc)[:2] == ["name", "node_id"] and doc["name"] == "hub"
    assert all(list(p)[:2] == ["name", "node_id"] for p in doc["peers"])
    assert sorted((p["node_id"], p["name"]) for p in doc["peers"]) == sorted(
        [(g1, "gpu"), (g2, "gpu"), (old, None)])
    # what the mesh is told, and what placement (and explain) sees
    assert node.local_info()["name"] == "hub"
    views = {v.node_id: v.name for v in node.mesh_view().nodes}
    assert views == {node.node_id: "hub", g1: "gpu", g2: "gpu", old: ""}


def test_status_text_leads_with_the_name_and_tells_two_of_one_name_apart(tmp_path):
    node, g1, g2, old = named_mesh(tmp_path)
    lines = meshctl.format_status(json.loads(json.dumps(node.status())))
    assert lines[0] == f"node     hub ({node.node_id})"
    head = next(i for i, line in enumerate(lines) if line == "PEERS") + 1
    assert lines[head].split()[:2] == ["NAME", "NODE"]
    rows = {line.split()[1]: line.split()[0] for line in lines[head + 1:head + 4]}
    assert rows == {meshctl.short_id(g1): "gpu", meshctl.short_id(g2): "gpu",
                    meshctl.short_id(old): "-"}  # no name: shown by its id alone


def test_models_and_splits_name_their_hosts():
    status = {
        "name": "hub", "node_id": "a" * 26, "peers": [{"name": "gpu-2", "node_id": "b" * 26}],
        "models": [{"name": "m", "state": "warm", "hosts": ["a" * 26, "b" * 26, "c" * 26],
                    "split": {"host": "a" * 26, "workers": [
                        {"node_id": "a" * 26, "share": 0.6}, {"node_id": "b" * 26, "share": 0.4}]}}],
    }
    text = "\n".join(meshctl.format_status(status))
    assert f"hub ({'a' * 12}), gpu-2 ({'b' * 12}), {'c' * 12}" in text
    assert f"hub ({'a' * 12}) 60% (host), gpu-2 ({'b' * 12}) 40%" in text


def test_meshctl_never_passes_a_control_character_to_the_terminal():
    lines = meshctl.table([{"name": "evil\x1b[2J\x07box", "node_id": "n1"}], meshctl.PEER_COLUMNS)
    assert "\x1b" not in "".join(lines) and "\x07" not in "".join(lines)
    assert "evil[2Jbox" in lines[1]


@pytest_twisted.ensureDeferred
async def test_meshctl_status_and_peers_over_the_control_socket(tmp_path, capsys):
    from twisted.internet import reactor

    node, g1, g2, _ = named_mesh(tmp_path)
    path = str(tmp_path / "control.sock")
    port = await listen_control(path, node, reactor=reactor)
    try:
        assert await deferToThread(meshctl.main, ["--socket", path, "peers"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:2] == ["NAME", "NODE"]
        assert sorted(line.split()[0] for line in out[1:]) == ["-", "gpu", "gpu"]
        assert await deferToThread(meshctl.main, ["--socket", path, "--json", "peers"]) == 0
        peers = json.loads(capsys.readouterr().out)
        assert {p["node_id"]: p["name"] for p in peers if p["name"]} == {g1: "gpu", g2: "gpu"}
        assert all(list(p)[0] == "name" for p in peers)
        assert await deferToThread(meshctl.main, ["--socket", path, "status", "--json"]) == 0
        assert list(json.loads(capsys.readouterr().out))[0] == "name"
    finally:
        await port.stopListening()


# -- the routing table ---------------------------------------------------------------------


def test_the_routing_table_carries_names_for_active_and_standby_nodes():
    registry = PassiveRegistry()
    req = CheckIn.from_body(CheckIn(Role.STANDBY, None, 30.0, 8 * GB,
                                    (ModelFile("m", GB),), name="spare-1").to_body())
    assert req.name == "spare-1"
    registry.check_in("conn", "s1", req, now=0.0)
    table = build_table(mesh_id="m1", source="a1", standby=registry.standbys(), nodes=[
        NodeEntry("a1", Role.HOST, GB, ("127.0.0.1:1",), serving=("m",), name="gpu-box-1")])
    back = RouteTable.from_body(json.loads(json.dumps(table.to_body())))
    assert [n.name for n in back.active_nodes] == ["gpu-box-1"]
    assert [(s.node_id, s.name) for s in back.standby] == [("s1", "spare-1")]
    assert back.active_nodes[0].view().name == "gpu-box-1"


def test_a_table_from_an_older_node_has_no_names_and_a_hostile_one_is_cleaned():
    body = {"etag": "e", "mesh_id": "m", "source": "a1", "hosts": [], "standby": [],
            "active_nodes": [{"node_id": "a1", "role": "host", "vram_bytes": 0, "addrs": [],
                              "serving": [], "loading": [], "available_models": []},
                             {"node_id": "a2", "role": "idle", "vram_bytes": 0, "addrs": [],
                              "serving": [], "loading": [], "available_models": [],
                              "name": HOSTILE}]}
    old, hostile = RouteTable.from_body(body).active_nodes
    assert old.name == "" and "name" not in old.to_body()
    assert hostile.name == "<img src=x onerror=alert(1)>[31mINFO forged"
    assert CheckIn.from_body({"kind": "standby", "name": "\x00"}).name == ""


# -- the console ----------------------------------------------------------------------------


def test_the_console_json_carries_a_hostile_name_cleaned_and_never_as_markup(tmp_path):
    reactor = MemoryReactorClock()
    hub = service(tmp_path, "hub", {"name": "hub", "role": "idle"}, reactor)
    bad = service(tmp_path, "bad", {"name": HOSTILE, "role": "idle"}, reactor, mesh=hub.mesh)
    link(hub, bad, reactor)
    config = Config(console=ConsoleConfig(enabled=True, listen="127.0.0.1:3131"))
    node = Node(config.replace("node", name="hub"), reactor=Clock(), node_id=hub.node_id,
                vram_bytes=8 * GB)
    node.mesh = hub
    clock = Clock()
    feed = console.StatusFeed(node, config, clock=clock,
                              vram=console.VramUse(node, clock=clock, measure=lambda pids: 0))
    # GET /api/status
    request = DummyRequest([b"api", b"status"])
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:3131"])
    body = console._Status(feed).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    for raw in (body, b"".join(_stream(feed).written)):
        text = raw.decode()
        assert "<" not in text and ">" not in text and "\x1b" not in text  # escaped in JSON
        assert "\\u003cimg src=x onerror=alert(1)\\u003e" in text
    doc = json.loads(body)
    [peer] = doc["peers"]
    assert (peer["name"], peer["node_id"]) == ("<img src=x onerror=alert(1)>[31mINFO forged",
                                               bad.node_id)
    assert doc["name"] == "hub"


def _stream(feed) -> DummyRequest:
    request = DummyRequest([])
    assert feed.add_client(request)
    return request


def test_the_page_shows_names_as_text_only():
    """Names come from peers: the page builds every element with createElement and puts
    strings in as text nodes; no HTML parser ever sees one."""
    page = console.load_page().decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink
    assert "document.createTextNode(String(c))" in page
    assert 'el("span", { class: "name" }, n.name)' in page  # the card leads with the name
    assert "label(s.name, s.node_id)" in page  # and so does the header


def test_a_passive_node_names_an_active_node_from_its_table():
    table = RouteTable(etag="e", mesh_id="m", source="a1", active_nodes=(
        NodeEntry("a1", Role.HOST, name="gpu-box-1"), NodeEntry("a2", Role.IDLE)))
    assert table.name_of("a1") == "gpu-box-1"
    assert table.name_of("a2") == "" and table.name_of("nobody") == ""


def test_a_passive_nodes_status_names_the_hosts_of_its_table():
    # what a passive node's status says (meshd.passive.node.PassiveNode.status): its
    # table's names, so `meshctl status` on a client shows hosts by name too
    status = {
        "name": "laptop", "node_id": "c" * 26, "role": "client",
        "route": {"active_nodes": ["a" * 26, "b" * 26], "names": {"a" * 26: "gpu-box-1"}},
        "models": [{"name": "m", "state": "warm", "hosts": ["a" * 26, "b" * 26]}],
    }
    text = "\n".join(meshctl.format_status(status))
    assert f"gpu-box-1 ({'a' * 12}), {'b' * 12}" in text


def test_a_passive_node_reports_the_names_its_table_lists():
    from tests.passive.test_passive import standby

    p = standby(0, 8, [])
    p.client.table = RouteTable(etag="e", mesh_id="m", source="a1", active_nodes=(
        NodeEntry("a1", Role.HOST, name="gpu-box-1"), NodeEntry("a2", Role.IDLE)),
        standby=(NodeEntry("s1", Role.STANDBY, name="spare"),))
    assert p.status()["names"] == {"a1": "gpu-box-1", "s1": "spare"}
