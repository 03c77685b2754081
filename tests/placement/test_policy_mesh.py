"""Placement plugins in a real mesh (issue 6): real ``meshd`` processes on loopback, each
configured through its TOML file, with the fast fake backend as llama-server and the Gemma
GGUF symlinked under the names a test needs.

- ``least_loaded``: a burst of concurrent slow streams from one client id goes to ONE host
  under the default hash, and over both hosts when the routing node runs least_loaded;
- ``pinned``: the pinned node is assigned the pinned model, the other node never takes
  it, not even when the pinned node leaves (the promotion hook declines);
- ``no_downloads``: a node with nothing on disk in a mesh serving a catalog model never
  asks the hub, neither for an assignment nor for ``meshctl download`` (refused: exit 3
  and the log say why); a ``[models] serve`` entry it lacks stops it with the reason.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import urllib.request
from pathlib import Path

import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir
from tests.models.test_download import hub  # noqa: F401 - the local hub fixture (HF_ENDPOINT)

pytestmark = pytest.mark.e2e

CATALOG_MODEL = "gemma-3-270m-q4_k_m"  # in meshd/catalog.toml; the fixture's file is it
BURST = 6
CHUNKS = 30
CHUNK_DELAY_MS = 60  # ~2 s per stream: every request of a burst is in flight at once


def fake_llama(base: Path) -> tuple[str, Path]:
    """A ``[llama] bin_dir`` whose llama-server is the slow fake, logging its requests."""
    requests_log = base / "requests.log"
    bin_dir = fake_llama_bin_dir(base, "--chunks", str(CHUNKS), "--chunk-delay-ms",
                                 str(CHUNK_DELAY_MS), "--request-log", str(requests_log))
    return bin_dir, requests_log


def node(tmp_path: Path, name: str, gguf: str, *, disk=(), serve=(), plugins=(),
         settings: dict | None = None, join: str | None = None) -> Meshd:
    base = tmp_path / name
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    for model in disk:
        os.symlink(gguf, models / f"{model}.gguf")
    bin_dir, requests_log = fake_llama(base)
    policy: dict = {"plugins": list(plugins)}
    policy.update(settings or {})
    config = {
        "node": {"models_dir": str(models)},
        "models": {"serve": list(serve), "assign_settle_s": 0.5, "min_free_gb": 0.0},
        "llama": {"bin_dir": bin_dir, "restart_min_s": 1.0},
        "policy": policy,
        "mesh": {"join": [join]} if join else {},
    }
    n = Meshd(base, config, name=name)
    n.requests_log = requests_log
    return n


def token(n: Meshd) -> str:
    return n.ctl("token").stdout.strip().splitlines()[-1]


def node_id(n: Meshd) -> str:
    """The node id ``n`` will have: its identity, made now in its state directory."""
    from meshd.mesh.identity import load_or_create
    from meshd.statedir import StateDir

    state = Path(n.config["node"]["state_dir"])
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    return load_or_create(StateDir(state)).node_id


def hosts_listed(n: Meshd, model: str) -> list[str]:
    with urllib.request.urlopen(f"{n.api}/v1/models", timeout=10) as r:
        for m in json.load(r)["data"]:
            if m["id"] == model:
                return m["meshd"]["hosts"]
    return []


def serving(n: Meshd) -> str | None:
    """The model ``n``'s own llama-server serves (``meshctl status``), None for none."""
    return n.status()["serving"]


def answered(n: Meshd) -> int:
    """Chat requests ``n``'s fake llama-server has answered (started, in fact)."""
    try:
        return n.requests_log.read_text().count("/v1/chat/completions")
    except FileNotFoundError:
        return 0


def stream_one(n: Meshd, model: str) -> int:
    body = json.dumps({"model": model, "user": "one-client", "stream": True,
                       "max_tokens": CHUNKS,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"{n.api}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    assert b"[DONE]" in data
    return r.status


def burst(n: Meshd, model: str, hosts: list[Meshd]) -> list[int]:
    """``BURST`` concurrent streams through ``n``; how many each of ``hosts`` answered."""
    before = [answered(h) for h in hosts]
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        statuses = list(pool.map(lambda _: stream_one(n, model), range(BURST)))
    assert statuses == [200] * BURST
    return [answered(h) - b for h, b in zip(hosts, before, strict=True)]


def stop_all(nodes: list[Meshd]) -> None:
    for n in nodes:
        if n.proc is not None:
            n.stop()
    for n in nodes:
        print(f"--- {n.name}: last lines of {n.log_path}")
        print("\n".join(n.log().splitlines()[-20:]))


def test_least_loaded_spreads_a_burst_that_the_hash_default_sends_to_one_host(
        tmp_path, gemma_model_path):
    # a and b host m-burst; c (least_loaded, like a and b) and d (the default) route to them
    a = node(tmp_path, "a", gemma_model_path, disk=["m-burst"], serve=["m-burst"],
             plugins=["least_loaded"])
    nodes = [a]
    try:
        a.start()
        a.wait_model_warm("m-burst", timeout=60)
        for name, plugins, disk in (("b", ["least_loaded"], "m-burst"),
                                    ("c", ["least_loaded"], "m-other"),
                                    ("d", [], "m-other")):
            n = node(tmp_path, name, gemma_model_path, disk=[disk], serve=[disk],
                     plugins=plugins, join=token(a))
            nodes.append(n)
            n.start()
            n.wait_model_warm(disk, timeout=60)
        b, c, d = nodes[1:]
        for n in (c, d):
            n.wait_for(lambda x: len(hosts_listed(x, "m-burst")) == 2,
                       f"m-burst with two hosts on {n.name}", timeout=60)

        by_hash = burst(d, "m-burst", [a, b])
        by_load = burst(c, "m-burst", [a, b])

        print(f"per host (a, b): hash default {by_hash}, least_loaded {by_load}")
        assert sorted(by_hash) == [0, BURST]  # one client id: one host, every time
        assert sum(by_load) == BURST and min(by_load) >= BURST // 2 - 1  # spread by load
    finally:
        stop_all(nodes)


def test_a_pinned_model_runs_on_its_pinned_node_and_no_other_takes_it(
        tmp_path, gemma_model_path):
    # both nodes have m-pin on disk and nothing to serve: assignment decides
    other = node(tmp_path, "other", gemma_model_path, disk=["m-pin"], plugins=["pinned"])
    pinned = node(tmp_path, "pinned", gemma_model_path, disk=["m-pin"], plugins=["pinned"])
    settings = {"pinned": {"m-pin": node_id(pinned)}}
    other.config["policy"].update(settings)
    pinned.config["policy"].update(settings)
    nodes = [other, pinned]
    try:
        other.start()
        other.wait_running()
        pinned.config["mesh"]["join"] = [token(other)]
        pinned.start()
        pinned.wait_model_warm("m-pin", timeout=60)
        assert "this node will serve m-pin: pinned to this node by [policy.pinned] " \
               "(decided by pinned)" in pinned.log()
        other.wait_for(lambda n: "no model for this node" in n.log(),
                       "the other node's assignment", timeout=30)
        assert hosts_listed(other, "m-pin") == [node_id(pinned)]
        assert serving(other) is None and answered(other) == 0

        # meshctl explain names the plugin that answered the assignment hook, on the
        # pinned node; the other node (a standby now) plans the model from its routing table
        explained = json.loads(pinned.ctl("explain", "m-pin", "--json").stdout)
        hooks = {h["hook"]: h for h in explained["election"]["hooks"]}
        assert (hooks["meshd_assign_model"]["answered_by"], hooks["meshd_assign_model"]["asked"],
                hooks["meshd_assign_model"]["answer"]) == (
            "pinned", ["pinned", "default"], "m-pin: pinned to this node by [policy.pinned]")
        assert explained["election"]["mode"] == "solo"
        assert [h["node_id"] for h in explained["routing"]["order"]] == [node_id(pinned)]
        # the other node stays idle or becomes a standby, depending on whether its assignment
        # ran before or after the pinned node announced m-pin (a standby routes once its
        # first routing table came); explain says which it did
        def settled(n):
            role = json.loads(n.ctl("status", "--json").stdout)["role"]
            answer = json.loads(n.ctl("explain", "m-pin", "--json").stdout)
            again = json.loads(n.ctl("status", "--json").stdout)["role"]
            order = [h["node_id"] for h in answer["routing"]["order"]]
            return role == again and order == [node_id(pinned)] and (role, answer["election"])

        role, seen = other.wait_for(settled, "the other node routing m-pin to the pinned one", 30)
        parts = {p["node_id"]: (p["part"], p["reason"]) for p in seen["nodes"]}
        assert parts[node_id(pinned)][0] == "solo"
        if role == "standby":
            assert seen["source"].startswith("planned now on this passive node from its routing")
            assert parts[node_id(other)] == ("not in the group",
                                             "a standby: passive nodes take no part in elections")
        else:
            assert role == "idle"
            assert seen["source"].startswith("planned now on this node, which is not in the group")
            assert parts[node_id(other)][0] == "not in the group"

        # the pinned node leaves: the other node hears it and the promotion hook declines
        pinned.stop()
        other.wait_for(lambda n: "not promoting: plugin pinned declined" in n.log(),
                       "the other node's promotion decision", timeout=30)
        assert serving(other) is None and "promoting to serve" not in other.log()
    finally:
        stop_all(nodes)


def test_no_downloads_never_asks_the_hub(tmp_path, gemma_model_path, hub):  # noqa: F811
    # the host has the catalog model on disk (the fixture's GGUF is it) and serves it
    host = node(tmp_path, "host", gemma_model_path, disk=[CATALOG_MODEL], serve=[CATALOG_MODEL])
    bare = node(tmp_path, "bare", gemma_model_path, plugins=["no_downloads"])
    nodes = [host, bare]
    try:
        host.start()
        host.wait_model_warm(CATALOG_MODEL, timeout=60)
        bare.config["mesh"]["join"] = [token(host)]
        bare.start()
        # the default would assign it the model with a download; no_downloads says no
        bare.wait_for(lambda n: "no model for this node" in n.log(), "the assignment",
                      timeout=30)
        assert "(no_downloads: on-disk models only) (decided by no_downloads)" in bare.log()
        r = bare.ctl("download", CATALOG_MODEL, check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "plugin no_downloads refused the download" in r.stderr
        assert f"download {CATALOG_MODEL} refused: {CATALOG_MODEL}: plugin no_downloads " \
               "refused the download" in bare.log()
        status = bare.status()
        assert status["serving"] is None and status["downloads"] == []
        assert hub.requests() == []

        # told to serve it: it stays up, idle, the refusal in its status, nothing downloaded
        bare.stop()
        alone = node(tmp_path, "alone", gemma_model_path, serve=[CATALOG_MODEL],
                     plugins=["no_downloads"])
        nodes.append(alone)
        alone.start()
        refused = alone.wait_for(lambda m: m.status()["downloads_refused"], "the refusal", 60)
        assert "plugin no_downloads refused the download" in refused[0]["reason"]
        assert alone.proc.poll() is None and alone.status()["serving"] is None
        assert hub.requests() == []
    finally:
        stop_all(nodes)
