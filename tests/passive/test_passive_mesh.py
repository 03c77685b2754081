"""Passive nodes with real daemons on loopback: a ``--client`` beside its node, a client
whose active node dies, a standby promoting when the only host of a model is killed,
and one active node answering 500 passive clients.

Real llama-servers with the real Gemma model where the issue asks for them (at most
three at a time, small context, a few tokens); the fast fake backend where only the
route protocol is under test.  Durations are printed (run with -s); every process
is started here and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import DEFAULT_MODEL_NAME as MODEL
from tests.conftest import ROOT
from tests.harness.daemon import Meshd, fake_llama_bin_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}


def gemma_node(base: Path, name: str, bin_dir: str, model_path: str, **extra) -> Meshd:
    config = {"models": {"serve": [model_path]},
              "llama": {"bin_dir": bin_dir, "ctx_size": 1024, "restart_min_s": 1.0},
              "mesh": dict(FAST)}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return Meshd(base / name, config, name=name)


def token_of(node: Meshd) -> str:
    return node.ctl("token").stdout.strip().splitlines()[-1]


def sdk(node: Meshd) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(node: Meshd, model: str = MODEL, max_tokens: int = 4) -> str:
    r = sdk(node).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=max_tokens)
    return r.choices[0].message.content or ""


def table_of(n: Meshd):
    s = n.status()
    route = s.get("route") or {}
    return s if route.get("table") and s["models"] else None


@pytest.fixture
def procs():
    started: list[Meshd] = []
    yield started
    for n in reversed(started):
        n.stop()


def test_a_client_beside_its_node_gets_streamed_answers_through_the_openai_sdk(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    a = gemma_node(tmp_path, "a", llama_bin_dir, gemma_model_path).start()
    procs.append(a)
    a.wait_model_warm(MODEL)
    # same machine, same state and models directories as the GPU node; its own API port
    # and control socket; a fresh identity (nothing written to the shared state dir)
    c = Meshd(tmp_path / "c", {"node": {"state_dir": a.config["node"]["state_dir"],
                                        "models_dir": a.config["node"]["models_dir"]},
                               "mesh": {"join": [token_of(a)], **FAST}}, name="client")
    ident_before = sorted(os.listdir(Path(a.config["node"]["state_dir"]) / "identity"))
    c.start("--client")
    procs.append(c)
    s = c.wait_for(table_of, "the client's routing table", 30)
    assert s["role"] == "client" and s["node_id"] != a.status()["node_id"]
    assert s["peers"] == [] and s["mesh_id"] == a.status()["mesh_id"]
    ids = [m.id for m in sdk(c).models.list()]
    assert ids == [MODEL]
    stream = sdk(c).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, stream=True)
    chunks = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert len(chunks) >= 2, chunks
    assert chat(c)
    # the node counts it as a passive client, and it is nobody's peer
    a.wait_for(lambda n: n.status()["passive"]["clients"] == 1, "passive count", 10)
    assert a.status()["peers"] == []
    assert sorted(os.listdir(Path(a.config["node"]["state_dir"]) / "identity")) == ident_before


def test_a_client_switches_when_its_active_node_dies_and_keeps_answering(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    a = gemma_node(tmp_path, "a", llama_bin_dir, gemma_model_path).start()
    procs.append(a)
    a.wait_model_warm(MODEL)
    b = gemma_node(tmp_path, "b", llama_bin_dir, gemma_model_path,
                   mesh={"join": [token_of(a)]}).start()
    procs.append(b)
    b.wait_serving_warm(MODEL)
    a.wait_for(lambda n: len(n.status()["peers"]) == 1, "a sees b", 20)
    c = Meshd(tmp_path / "c", {"node": {"client": True},
                               "mesh": {"join": [token_of(a)], "refresh_s": 30.0, **FAST}},
              name="client").start()
    procs.append(c)
    c.wait_for(lambda n: len((n.status().get("route") or {}).get("active_nodes", [])) == 2,
               "a table with both active nodes", 30)
    via = c.status()["route"]["via"]
    victim, other = (a, b) if via == a.status()["node_id"] else (b, a)
    assert chat(c)
    t0 = time.monotonic()
    victim.kill()
    s = c.wait_for(lambda n: (n.status().get("route") or {}).get("via") == other.status()["node_id"]
                   and n.status(), "the client checking in with the other node", 20)
    switched = time.monotonic() - t0
    answers = [chat(c) for _ in range(5)]  # every one answered (failover where needed)
    print(f"client switched active node {switched:.2f} s after kill -9; "
          f"history {[h['what'] for h in s['route']['history']]}")
    assert all(answers)
    other.wait_for(lambda n: n.status()["passive"]["clients"] == 1, "the client counted", 10)


def test_a_standby_promotes_when_the_only_host_of_a_model_is_killed(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    fake = fake_llama_bin_dir(tmp_path)
    a = gemma_node(tmp_path, "a", llama_bin_dir, gemma_model_path).start()
    procs.append(a)
    a.wait_model_warm(MODEL)
    # b serves another model (the fake backend), so an active node is left after a dies
    b_models = tmp_path / "b" / "models"
    b_models.mkdir(parents=True)
    os.symlink(gemma_model_path, b_models / "other.gguf")
    b = Meshd(tmp_path / "b", {"models": {"serve": ["other"]}, "llama": {"bin_dir": fake},
                               "mesh": {"join": [token_of(a)], **FAST}}, name="b").start()
    procs.append(b)
    b.wait_model_warm("other", 30)
    a.wait_for(lambda n: len(n.status()["peers"]) == 1, "a sees b", 20)
    # the standby has the model on disk (same name) and real llama.cpp to run it
    s_models = tmp_path / "s" / "models"
    s_models.mkdir(parents=True)
    os.symlink(gemma_model_path, s_models / f"{MODEL}.gguf")
    s = Meshd(tmp_path / "s", {"node": {"standby": True},
                               "llama": {"bin_dir": llama_bin_dir, "ctx_size": 1024},
                               "mesh": {"join": [token_of(a)], "refresh_s": 30.0, **FAST}},
              name="standby").start()
    procs.append(s)
    s.wait_for(lambda n: n.status()["role"] == "standby" and table_of(n), "standby table", 30)
    a.wait_for(lambda n: n.status()["passive"]["standby"] == 1 or
               b.status()["passive"]["standby"] == 1, "the standby counted", 10)
    assert s.status()["peers"] == [] and all(p["role"] != "standby" for p in a.status()["peers"])
    assert chat(b)  # through b's tunnel to a
    t_kill = time.time()
    a.kill()
    first_ok = None
    deadline = time.monotonic() + 120
    failures = 0
    while time.monotonic() < deadline:
        try:
            if chat(b, max_tokens=2):
                first_ok = time.time()
                break
        except openai.APIError:
            failures += 1
        time.sleep(0.2)
    assert first_ok is not None, s.log()[-3000:]
    st = s.status()
    p = st["promotion"]
    assert st["role"] == "host" and p["model"] == MODEL
    print(f"model unavailable for {first_ok - t_kill:.2f} s ({failures} failed requests): "
          f"detection {p['table_at'] - t_kill:.3f} s, decision {p['decided_at'] - p['table_at']:.3f} s, "
          f"model load {p['warm_at'] - p['serving_at']:.2f} s")
    # it joined the gossip: b lists it as a peer serving the model
    b.wait_for(lambda n: any(x["serving"] == MODEL for x in n.status()["peers"]), "s in b's peers", 20)


SPARES_WAIT = """
import pluggy

hookimpl = pluggy.HookimplMarker("meshd")


@hookimpl
def meshd_assign_model(node, mesh):
    return None, "spares wait as standbys"
"""


def test_an_unassigned_node_stands_by_and_promotes_when_the_only_active_node_dies(
        tmp_path, procs):
    """b joins active, assignment gives it nothing (a plugin): it leaves the gossip and
    checks in as a standby.  kill -9 a (the only active node and host): b decides from its
    last table, promotes, and is an active node of the same mesh that a rejoins."""
    fake = fake_llama_bin_dir(tmp_path)
    from tests.conftest import find_model

    for name in ("a", "b"):
        models = tmp_path / name / "models"
        models.mkdir(parents=True)
        os.symlink(find_model() or __file__, models / "m1.gguf")
    a = Meshd(tmp_path / "a", {"models": {"serve": ["m1"]}, "llama": {"bin_dir": fake},
                               "mesh": dict(FAST)}, name="a").start()
    procs.append(a)
    a.wait_model_warm("m1", 30)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "spares_wait.py").write_text(SPARES_WAIT)
    b = Meshd(tmp_path / "b", {"llama": {"bin_dir": fake}, "policy": {"plugins_dir": str(plugins)},
                               "models": {"assign_settle_s": 0.3},
                               "mesh": {"join": [token_of(a)], "refresh_s": 30.0, **FAST}},
              name="b").start()
    procs.append(b)
    st = b.wait_for(lambda n: (n.status()["role"] == "standby" and table_of(n)),
                    "b a standby with a table", 30)
    assert "spares wait as standbys" in st["route"]["reason"] and st["peers"] == []
    assert st["mesh_id"] == a.status()["mesh_id"]
    a.wait_for(lambda n: n.status()["peers"] == [] and n.status()["passive"]["standby"] == 1,
               "a: b left the gossip and checks in as a standby", 10)
    assert "becoming a standby" in b.log()
    t_kill = time.time()
    a.kill()
    first_ok = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if chat(b, "m1", max_tokens=2):
                first_ok = time.time()
                break
        except openai.APIError:
            pass
        time.sleep(0.2)
    assert first_ok is not None, b.log()[-3000:]
    st = b.status()
    p = st["promotion"]
    assert st["role"] == "host" and p["model"] == "m1"
    assert p["because"] == "every active node is unreachable"
    print(f"only active node killed: b decided {p['decided_at'] - t_kill:.2f} s after kill -9, "
          f"m1 answered again after {first_ok - t_kill:.2f} s")
    assert "deciding from that table with its hosts dead" in b.log()
    # an active node of the same mesh: it issues tokens, and a (restarted) rejoins it
    assert token_of(b)
    a.start()
    b.wait_for(lambda n: [x["node_id"] for x in n.status()["peers"]] == [a.status()["node_id"]],
               "a rejoined b", 30)
    assert b.status()["mesh_id"] == a.status()["mesh_id"]


def test_a_client_follows_a_standby_takeover_after_the_only_active_node_is_killed(
        tmp_path, procs):
    """a hosts m1 and is the only active node; s1 and s2 stand by with m1 on disk (s1 has
    more VRAM), c is a passive client.  kill -9 a: s1 promotes, c finds it among the
    standbys of its last table and answers m1 again through it, and s2 (the tie-break's
    loser) checks in with s1.  No second active node: the table's standby entries carry
    where each standby listens once promoted (c used to retry the dead host for minutes,
    answering 503)."""
    fake = fake_llama_bin_dir(tmp_path)
    from tests.harness.localhub import gguf_bytes

    for name in ("a", "s1", "s2"):
        models = tmp_path / name / "models"
        models.mkdir(parents=True)
        (models / "m1.gguf").write_bytes(gguf_bytes())  # the fake backend serves it
    a = Meshd(tmp_path / "a", {"models": {"serve": ["m1"]}, "llama": {"bin_dir": fake},
                               "mesh": dict(FAST)}, name="a").start()
    procs.append(a)
    a.wait_model_warm("m1", 30)
    standbys = []
    for name, vram_gb in (("s1", 2.0), ("s2", 1.0)):
        s = Meshd(tmp_path / name, {"node": {"standby": True, "vram_gb": vram_gb},
                                    "llama": {"bin_dir": fake},
                                    "mesh": {"join": [token_of(a)], "refresh_s": 30.0, **FAST}},
                  name=name).start()
        procs.append(s)
        standbys.append(s)
    s1, s2 = standbys
    a.wait_for(lambda n: n.status()["passive"]["standby"] == 2, "a counts both standbys", 30)
    # the client's first table is built after both standbys checked in: it lists them
    c = Meshd(tmp_path / "c", {"node": {"client": True},
                               "mesh": {"join": [token_of(a)], "refresh_s": 30.0, **FAST}},
              name="client").start()
    procs.append(c)
    c.wait_for(table_of, "the client's routing table", 30)
    assert chat(c, "m1", max_tokens=2)
    s1_id, a_id = s1.status()["node_id"], a.status()["node_id"]
    assert c.status()["route"]["via"] == a_id
    t_kill = time.time()
    a.kill()
    first_ok = None
    failures = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if chat(c, "m1", max_tokens=2):
                first_ok = time.time()
                break
        except openai.APIError:
            failures += 1
        time.sleep(0.2)
    assert first_ok is not None, c.log()[-3000:]
    route = c.status()["route"]
    assert route["via"] == s1_id and route["active_nodes"] == [s1_id]
    st = s1.status()
    assert st["role"] == "host" and st["promotion"]["model"] == "m1"
    # the standby that lost the tie-break found the winner, and stands by there
    s2.wait_for(lambda n: (n.status().get("route") or {}).get("via") == s1_id,
                "s2 checking in with s1", 30)
    assert s2.status()["role"] == "standby" and s2.status().get("promotion") is None
    s1.wait_for(lambda n: n.status()["passive"] == {**n.status()["passive"], "clients": 1,
                                                    "standby": 1},
                "s1 counts the client and s2", 10)
    print(f"only active node killed: s1 decided {st['promotion']['decided_at'] - t_kill:.2f} s "
          f"after kill -9; the client answered m1 again after {first_ok - t_kill:.2f} s "
          f"({failures} failed requests)")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_one_active_node_keeps_answering_500_passive_clients_refreshing_every_second(
        tmp_path, procs):
    fake = fake_llama_bin_dir(tmp_path)
    models = tmp_path / "a" / "models"
    models.mkdir(parents=True)
    from tests.conftest import find_model

    os.symlink(find_model() or __file__, models / "m1.gguf")
    a = Meshd(tmp_path / "a", {"models": {"serve": ["m1"]}, "llama": {"bin_dir": fake},
                               "log": {"level": "info"}}, name="a").start()
    procs.append(a)
    a.wait_model_warm("m1", 30)
    tok = token_of(a)
    swarms = []
    try:
        for i in range(2):
            out = tmp_path / f"swarm{i}.json"
            swarms.append((subprocess.Popen(
                [sys.executable, str(ROOT / "bench/passive_swarm.py"), "--token", tok,
                 "--count", "250", "--refresh-s", "1", "--seconds", "30", "--ramp-s", "6",
                 "--out", str(out)], cwd=ROOT), out))
        a.wait_for(lambda n: n.status()["passive"]["clients"] == 500, "500 passive clients", 25,
                   interval=0.5)
        s0, c0, t0 = a.status(), _cpu_s(a.pid), time.monotonic()
        time.sleep(8)
        s1, c1, t1 = a.status(), _cpu_s(a.pid), time.monotonic()
        assert s1["passive"]["clients"] == 500
        requests = s1["passive"]["requests"] - s0["passive"]["requests"]
        # the API keeps answering while it does
        body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": 3}).encode()
        r = urllib.request.urlopen(urllib.request.Request(
            a.api + "/v1/chat/completions", data=body,
            headers={"content-type": "application/json"}), timeout=10)
        assert r.status == 200
        print(f"500 passive clients at 1 s: {requests / (t1 - t0):.0f} route requests/s, "
              f"active node CPU {100 * (c1 - c0) / (t1 - t0):.1f} % of a core, "
              f"{1e6 * (c1 - c0) / max(1, requests):.0f} µs CPU per route request")
        assert requests > 500 * (t1 - t0) * 0.5  # most clients kept refreshing
    finally:
        results = []
        for proc, out in swarms:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if out.exists():
                results.append(json.loads(out.read_text()))
    assert sum(r["with_table"] for r in results) == 500, results
