"""``meshctl explain MODEL`` through the real control socket, with a real Node and election
behind it: the human output, ``--json``, ``--client``, and an unknown model's exit status."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from meshd.cli import meshctl
from meshd.daemon.control import listen_control
from meshd.placement.snapshot import GB
from meshd.serving.router import MeshRouter
from tests.harness.meshfakes import make_node, peer
from tests.placement.test_rebalance import rebalancer


def split_forced_node():
    """node-a (16 GiB) with [models] split: one near peer shares the model, one far peer
    is left out for its RTT; node-a hosts the split."""
    node = make_node("node-a", vram_gb=16, disk={"m": 2 * GB}, split=True)
    node.mesh.members["node-b"] = peer("node-b", vram_gb=8, waiting=["m"])
    node.mesh.members["node-c"] = dataclasses.replace(
        peer("node-c", vram_gb=8, waiting=["m"]), rtt_ms=120.0)
    node.mesh.members["node-d"] = peer("node-d", vram_gb=8, serving=["other"])
    node.router = MeshRouter(node, reactor=node.reactor, tunnel=lambda n, m: None)
    r, _ = rebalancer(node)
    r.serve("m")
    return node


@pytest_twisted.async_yield_fixture
async def control(tmp_path):
    from twisted.internet import reactor

    node = split_forced_node()
    path = str(tmp_path / "control.sock")
    port = await listen_control(path, node, reactor=reactor)
    yield path, node
    await port.stopListening()


def run(*argv):
    return deferToThread(meshctl.main, list(argv))


def row(lines: list[str], first: str) -> str:
    return next(line for line in lines if line.strip().startswith(first))


def cells(line: str) -> list[str]:
    """A table row's cells: columns are two or more spaces apart."""
    return re.split(r"\s{2,}", line.strip())


@pytest_twisted.ensureDeferred
async def test_explain_shows_the_decision_each_nodes_part_and_the_hooks(control, capsys):
    path, node = control
    assert await run("--socket", path, "explain", "m") == 0
    lines = capsys.readouterr().out.splitlines()
    host = f"{node.config.node.name} (node-a)"  # [node] name (the host name), then the id
    assert row(lines, "decision") == (f"decision   split, host {host}: split forced: split over "
                                      "2 nodes; skipped node-c (120 ms > 80 ms)")
    assert row(lines, "settings") == "settings   split on, tensor_split -, max_rtt_ms 80"
    assert row(lines, "size").startswith("size       2.0 GiB, needs 2.2 GiB of VRAM (a node runs")
    assert row(lines, "this node") == ("this node  runs it: split forced: split over 2 nodes; "
                                       "skipped node-c (120 ms > 80 ms)")
    assert cells(row(lines, "NODE ")) == ["NODE", "ROLE", "VRAM", "RTT", "FILE", "PART", "WHY"]
    assert cells(row(lines, host)) == [
        host, "idle", "16.0 GiB", "0 ms", "2.0 GiB", "split host",
        "elected host: 67% of the layers, 16.0 GiB of VRAM"]
    assert cells(row(lines, "node-b"))[4:] == [
        "no", "split worker", "33% of the layers, 8.0 GiB of VRAM, RTT 1 ms"]
    assert cells(row(lines, "node-c")) == [
        "node-c", "host", "8.0 GiB", "120 ms", "no", "left out",
        "RTT 120 ms > 80 ms ([models] max_rtt_ms)"]
    assert cells(row(lines, "node-d"))[5:] == [
        "not in the group", "not set to serve m (serves other)"]
    assert cells(row(lines, "plan_split"))[:3] == ["plan_split", "default", "default"]
    # no host is ready yet: what a request gets now
    assert lines[-1].startswith("  HTTP 503: model 'm' is not ready")


@pytest_twisted.ensureDeferred
async def test_explain_json_is_the_daemons_answer_with_the_client_given(control, capsys):
    path, node = control
    assert await run("--socket", path, "explain", "m", "--client", "10.1.2.3", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"]["client_id"] == "10.1.2.3"
    assert out == json.loads(json.dumps(node.explain("m", "10.1.2.3")))


@pytest_twisted.ensureDeferred
async def test_explain_of_an_unknown_model_exits_3_naming_the_known_ones(control, capsys):
    path, _ = control
    assert await run("--socket", path, "explain", "nosuch") == 3
    err = capsys.readouterr().err
    assert err == ("meshctl: refused: model 'nosuch' is not known in this mesh: no node serves, "
                   "waits for, asks for or has it on disk (known: m, other)\n")


def test_a_named_node_shows_its_name_first_and_its_id_beside_it():
    answer = {"model": "m", "node_id": "01HXABCDEFGHJKMNPQRSTVWXYZ", "name": "gpu-box-1",
              "dropped": False,
              "election": {"mode": "split", "host": "01HXABCDEFGHJKMNPQRSTVWXYZ",
                           "reason": "fits no single node", "nodes": [
                  {"node_id": "01HXABCDEFGHJKMNPQRSTVWXYZ", "name": "gpu-box-1", "part": "solo",
                   "reason": "fits: needs 1.1 GiB, has 8.0 GiB"}],
                  "inputs": [{"node_id": "01HXABCDEFGHJKMNPQRSTVWXYZ", "name": "gpu-box-1"}],
                  "hooks": [],
                  "settings": {}, "size_bytes": GB, "need_bytes": GB, "age_s": 3},
              "routing": {"client_id": "c", "order": [
                  {"node_id": "01HXABCDEFGHJKMNPQRSTVWXYZ", "name": "gpu-box-1", "local": True}],
                  "hooks": [], "answer": "one ready host: the host-selection hook is not asked"}}
    lines = meshctl.format_explain(answer)
    assert cells(row(lines, "node ")) == ["node", "gpu-box-1 (01HXABCDEFGH)"]
    assert cells(row(lines, "decision")) == [
        "decision", "split, host gpu-box-1 (01HXABCDEFGH): fits no single node"]
    assert cells(row(lines, "gpu-box-1 (01HXABCDEFGH)"))[-2:] == [
        "solo", "fits: needs 1.1 GiB, has 8.0 GiB"]
    assert "  1. gpu-box-1 (01HXABCDEFGH) (this node)" in lines


def test_a_dropped_model_with_no_election_reads_so():
    lines = meshctl.format_explain({"model": "m", "node_id": "a", "dropped": True,
                                    "dropped_reason": "dropped mesh-wide (meshctl drop)",
                                    "election": None, "routing": {}})
    assert cells(row(lines, "dropped")) == ["dropped", "dropped mesh-wide (meshctl drop)"]
    assert cells(row(lines, "decision")) == ["decision", "no election on record"]


@pytest_twisted.ensureDeferred
async def test_the_control_endpoint_without_a_model_is_bad_usage(control):
    path, _ = control

    def ask():
        try:
            meshctl.request(path, "GET", "/explain", timeout_s=10)
        except meshctl.Fail as e:
            return e.code, str(e)
        return None

    assert await deferToThread(ask) == (
        meshctl.EXIT_USAGE, "bad request: 'model': expected a non-empty query parameter ?model=...")
