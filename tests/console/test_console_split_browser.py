"""A split model in the console, in a real headless Chromium.

A real split needs three daemons with llama.cpp's rpc-server; what this test is
about is the page, so the console here is the real one (``meshd.console.server``:
page, ``/api/status``, event stream) on a real port, in front of a fake node whose
status is a split as ``meshd.daemon.node.Node._split_status`` reports it: the
host's (with its RPC tunnels) and a worker's (without).  The browser calls block,
so they run in a thread while the reactor serves the page.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from meshd.config import Config, ConsoleConfig
from meshd.console import server as console
from tests.conftest import free_port
from tests.harness.browser import Chromium

GB = 2**30
MODEL = "llama-70b-q4_k_m"
HOST = "a1b2c3d4e5f6a7b8c9d0"
WORKER = "ffee00112233445566aa"
IDLE = "0123456789abcdef0123"  # a peer outside the split

HOST_STATUS: dict[str, Any] = {
    "node_id": HOST, "mesh_id": "mesh-42", "role": "host", "serving": MODEL, "state": "running",
    "uptime_s": 60, "vram_bytes": 24 * GB,
    "peers": [
        {"node_id": WORKER, "addr": "10.0.0.2:7842", "role": "host", "serving": None,
         "vram_bytes": 16 * GB, "rtt_ms": 0.4, "state": "alive"},
        {"node_id": IDLE, "addr": "10.0.0.3:7842", "role": "standby", "serving": None,
         "vram_bytes": 8 * GB, "rtt_ms": 0.5, "state": "alive"},
    ],
    "models": [{
        "name": MODEL, "state": "warm", "hosts": [HOST], "size_bytes": 36 * GB,
        "split": {
            "host": HOST,
            "workers": [{"node_id": HOST, "share": 0.57}, {"node_id": WORKER, "share": 0.43}],
            "tunnels": [{"node_id": WORKER, "state": "listening", "local_port": 40123,
                         "connections": 0}],
        },
    }],
    "downloads": [],
}


def worker_view() -> dict[str, Any]:
    """The same split from the worker: the plan, no tunnels (only the host has them)."""
    s = copy.deepcopy(HOST_STATUS)
    s["node_id"], s["serving"], s["role"] = WORKER, None, "host"
    s["peers"] = [dict(HOST_STATUS["peers"][0], node_id=HOST, serving=MODEL)]
    del s["models"][0]["split"]["tunnels"]
    return s


class SplitNode:
    """What the console reads of a node; ``doc`` is its status, changed by the test."""

    def __init__(self) -> None:
        self.node_id = HOST
        self.served: dict[str, Any] = {}
        self.mesh = None
        self.downloader = None
        self.rebalancer = None
        self.status_listeners: list[Any] = []
        self.doc = copy.deepcopy(HOST_STATUS)

    def add_status_listener(self, cb) -> None:
        self.status_listeners.append(cb)

    def add_membership_listener(self, cb) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return copy.deepcopy(self.doc)

    def changed(self) -> None:
        for cb in self.status_listeners:
            cb()


def card(node_id: str) -> str:
    return f"document.querySelector('[data-node-id={json.dumps(node_id)}]')"


def split_of(node_id: str) -> str:
    """The text of the node card's split line; null while there is none (or no card)."""
    return f"(c => (e => e && e.textContent)(c && c.querySelector('.split')))({card(node_id)})"


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_a_split_model_shows_on_every_node_it_spans(tmp_path, chromium_bin):
    port = free_port()
    node = SplitNode()
    config = Config(console=ConsoleConfig(enabled=True, listen=f"127.0.0.1:{port}"))
    feed = console.StatusFeed(node, config, clock=reactor,
                              vram=console.VramUse(node, clock=reactor, measure=lambda pids: 0))
    site = console.Console(node, config, reactor=reactor, feed=feed)
    await site.listen()
    browser = Chromium(chromium_bin, tmp_path / "chromium-profile", tmp_path / "chromium.log")

    def call(f, *args, **kwargs):
        return deferToThread(f, *args, **kwargs)

    try:
        await call(browser.start)
        page = await call(browser.open, f"http://127.0.0.1:{port}/")
        # the host's view: its own card and the worker's say their share; the worker's
        # also its RPC tunnel; the idle peer's says nothing of the split
        host_line = await call(browser.wait_for, page, split_of(HOST), "the host's split line")
        assert host_line == f"{MODEL} — split, 57% (host)"
        worker_line = await call(browser.wait_for, page, split_of(WORKER), "the worker's")
        assert worker_line == f"{MODEL} — split, 43% (worker)RPC tunnel listening, 0 connections"
        assert await call(browser.evaluate, page,
                          f"{card(WORKER)}.querySelector('[data-tunnel]').dataset.tunnel") \
            == "listening"
        assert await call(browser.evaluate, page, f"{card(IDLE)}.querySelector('.split')") is None
        summary = f"document.querySelector('[data-split={json.dumps(MODEL)}]').textContent"
        assert await call(browser.evaluate, page, summary) \
            == f"split: this node 57% (host), {WORKER[:12]}… 43%"
        await call(browser.wait_for, page, "document.getElementById('live').className === 'on'",
                   "the event stream")

        # llama-server connects through the tunnel: the change arrives over the event stream
        node.doc["models"][0]["split"]["tunnels"][0].update(state="open", connections=2)
        node.changed()
        tunnel = f"{card(WORKER)}.querySelector('[data-tunnel]')"
        assert await call(browser.wait_for, page,
                          f"{tunnel}.dataset.tunnel === 'open' && {tunnel}.textContent",
                          "the tunnel open") == "RPC tunnel open, 2 connections"
        png = await call(browser.screenshot, page, tmp_path / "console-split.png")
        assert png.startswith(b"\x89PNG")

        # the worker's own console: the same shares, and no tunnel line (it has none)
        node.doc = worker_view()
        page = await call(browser.open, f"http://127.0.0.1:{port}/")
        worker_self = await call(browser.wait_for, page,
                                 f"{card(WORKER)} && {card(WORKER)}.classList.contains('self')"
                                 f" && {split_of(WORKER)}", "the worker's own card")
        assert worker_self == f"{MODEL} — split, 43% (worker)"
        assert await call(browser.evaluate, page, split_of(HOST)) == f"{MODEL} — split, 57% (host)"
        assert await call(browser.evaluate, page, "document.querySelector('[data-tunnel]')") \
            is None
        assert await call(browser.evaluate, page, summary) \
            == f"split: {HOST[:12]}… 57% (host), this node 43%"
    finally:
        await call(browser.stop)
        await site.stop()
