"""The console's "why?" of a model: ``/api/explain`` answers what ``meshctl explain --json``
answers, from a real Node and election; the page asks for it from each model row."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock

from meshd.console import server as console
from meshd.placement.snapshot import GB
from tests.console.test_console import make_config, make_feed
from tests.harness.meshfakes import make_node, peer
from tests.placement.test_rebalance import rebalancer


def console_of(node):
    clock = node.reactor
    assert isinstance(clock, Clock)
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock))
    return StubTreq(c.root)


def get(treq, path):
    r = treq.get("http://127.0.0.1:3131" + path).result
    return r.code, json.loads(treq.content(r).result)


def test_api_explain_is_the_nodes_explanation():
    node = make_node("node-a", vram_gb=4, disk={"m": 4 * GB})
    node.mesh.members["node-b"] = peer("node-b", vram_gb=8, waiting=["m"])
    r, _ = rebalancer(node)
    r.serve("m")
    code, doc = get(console_of(node), "/api/explain?model=m")
    assert code == 200
    assert doc == json.loads(json.dumps(node.explain("m")))
    mine = next(p for p in doc["election"]["nodes"] if p["node_id"] == "node-a")
    assert (mine["part"], mine["reason"]) == (
        "waiting", "too small to run it alone: needs 4.4 GiB, has 4.0 GiB")


def test_api_explain_of_an_unknown_model_is_404_with_the_reason_and_no_model_is_400():
    node = make_node("node-a", disk={"m": GB})
    treq = console_of(node)
    code, doc = get(treq, "/api/explain?model=nosuch")
    assert code == 404
    assert doc["error"]["message"].startswith("model 'nosuch' is not known in this mesh")
    code, doc = get(treq, "/api/explain")
    assert (code, doc["error"]["code"]) == (400, "missing_model")


def test_each_model_row_of_the_page_has_a_why_button_that_asks_the_api():
    node = make_node("node-a")
    treq = console_of(node)
    r = treq.get("http://127.0.0.1:3131/").result
    html = treq.content(r).result.decode()
    assert '"data-why": m.name' in html and '"/api/explain?model="' in html
    assert 'id="explain-section"' in html
