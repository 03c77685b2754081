"""Several real meshd nodes with real llama-servers and the real Gemma model under several
names: requests cross the mesh through tunnels, /v1/models is mesh-wide, a node joining
with no model is assigned the unserved one, kill -9 of a host during a burst fails over
without a hang or a duplicate generation, and a drop leaves every routing table.

At most three llama-servers run at once (two cores): A serves m-one, B m-two, then D
(no model) is assigned m-three and stopped, then C serves m-two beside B for the drop.
The kill during a burst uses two hosts with the fake backend (E holds every request,
F answers), so that a request is certainly in flight on the host that is killed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir

pytestmark = pytest.mark.e2e

LLAMA = {"ctx_size": 1024, "restart_min_s": 1.0}


def models_dir(base, names: list[str], gguf: str):
    d = base / "models"
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(gguf, d / f"{name}.gguf")
    return str(d)


def node(tmp_path, name, llama_bin_dir, gguf, disk, serve=(), join=None) -> Meshd:
    base = tmp_path / name
    config = {
        "node": {"models_dir": models_dir(base, disk, gguf)},
        "models": {"serve": list(serve)},
        "llama": {"bin_dir": llama_bin_dir, **LLAMA},
    }
    if join:
        config["mesh"] = {"join": [join]}
    return Meshd(base, config, name=name)


def token(n: Meshd) -> str:
    return n.ctl("token").stdout.strip().splitlines()[-1]


def client(n: Meshd) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{n.api}/v1", api_key="x", max_retries=0, timeout=120)


def listed(n: Meshd) -> dict[str, dict]:
    with urllib.request.urlopen(f"{n.api}/v1/models", timeout=10) as r:
        return {m["id"]: m for m in json.load(r)["data"]}


def post(n: Meshd, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{n.api}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait_listed(n: Meshd, model: str, hosts: int = 1, timeout: float = 120):
    return n.wait_for(lambda x: len(listed(x).get(model, {}).get("meshd", {}).get("hosts", []))
                      >= hosts, f"{model} listed with {hosts} host(s) on {n.name}", timeout)


def ask(n: Meshd, model: str, user: str = "u", max_tokens: int = 8) -> str:
    r = client(n).chat.completions.create(
        model=model, user=user, max_tokens=max_tokens,
        messages=[{"role": "user", "content": "Say hello."}])
    assert r.model == model  # llama-server --alias: the answer names the model that made it
    return r.choices[0].message.content


def stream(n: Meshd, model: str) -> list[str]:
    pieces = []
    for chunk in client(n).chat.completions.create(
            model=model, max_tokens=12, stream=True,
            messages=[{"role": "user", "content": "Count to five."}]):
        assert chunk.model == model
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces


def fake_host(tmp_path, name: str, gguf: str, *flags: str, join: str) -> Meshd:
    """A node serving ``m-hold`` with the fake backend, which logs every request it reads."""
    base = tmp_path / name
    requests_log = base / "requests.log"
    bin_dir = fake_llama_bin_dir(base, "--request-log", str(requests_log), *flags)
    config = {
        "node": {"models_dir": models_dir(base, ["m-hold"], gguf)},
        "models": {"serve": ["m-hold"], "min_free_gb": 0.0},
        "llama": {"bin_dir": bin_dir, "restart_min_s": 1.0},
        "mesh": {"join": [join]},
    }
    n = Meshd(base, config, name=name)
    n.requests_log = requests_log
    return n


def requests_read(n: Meshd) -> int:
    try:
        return len(n.requests_log.read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_during_burst(tmp_path, gguf: str, a: Meshd, nodes: list[Meshd]) -> None:
    """E holds every request it gets (the fake backend's ``--hold``) and F answers: the
    kill of E happens while at least one request is certainly in flight there (E's
    request log has its line), and every request of the burst still gets its answer,
    generated exactly once, by F."""
    e = fake_host(tmp_path, "e", gguf, "--hold", join=token(a))
    f = fake_host(tmp_path, "f", gguf, join=token(a))
    nodes += [e, f]
    e.start()
    f.start()
    wait_listed(a, "m-hold", hosts=2)
    results: list[object] = []

    def one(i: int) -> object:
        try:
            ask(a, "m-hold", user=f"user-{i}", max_tokens=6)
            return 200
        except openai.APIStatusError as err:
            return err.status_code
        except Exception as err:  # noqa: BLE001 - a hang or transport error fails below
            return repr(err)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # one at a time until one is held on E: the host choice is by client id, so
        # each new user is a fresh draw; F answers the others at once
        futures = []
        while requests_read(e) == 0 and len(futures) < 40:
            futures.append(pool.submit(one, len(futures)))
            deadline = time.monotonic() + 10
            while (requests_read(e) == 0 and not futures[-1].done()
                   and time.monotonic() < deadline):
                time.sleep(0.02)
        assert requests_read(e) >= 1, f"none of {len(futures)} requests went to E"
        futures += [pool.submit(one, len(futures) + i) for i in range(6)]
        e.wait_for(lambda x: requests_read(f) >= 2, "F answering the burst", 30)
        e.kill()
        killed_at = time.monotonic() - t0
        results = [fut.result(timeout=120) for fut in futures]
    burst = len(results)
    print(f"burst of {burst}: killed E at {killed_at:.1f} s with {requests_read(e)} held, "
          f"done in {time.monotonic() - t0:.1f} s: {results}")
    assert results == [200] * burst
    assert "failed before responding" in a.log()
    # E answered none (it holds): F generated every request once, the failed-over ones too
    assert requests_read(f) == burst
    a.wait_for(lambda x: "m-hold" in listed(x) and len(listed(x)["m-hold"]["meshd"]["hosts"]) == 1,
               "E removed from m-hold's hosts on A", 30)
    f.stop()


def test_requests_cross_the_mesh_assignment_failover_and_drop(tmp_path, llama_bin_dir,
                                                               gemma_model_path):
    gguf = gemma_model_path
    a = node(tmp_path, "a", llama_bin_dir, gguf, ["m-one"], serve=["m-one"])
    nodes = [a]
    try:
        a.start()
        a.wait_running()
        b = node(tmp_path, "b", llama_bin_dir, gguf, ["m-two"], serve=["m-two"], join=token(a))
        nodes.append(b)
        b.start()
        wait_listed(a, "m-two")
        wait_listed(b, "m-one")

        # -- each node answers for the other's model, streamed and not ---------------------
        t0 = time.monotonic()
        assert ask(a, "m-two") and ask(b, "m-one")
        assert len(stream(a, "m-two")) > 1 and len(stream(b, "m-one")) > 1
        print(f"cross-mesh requests took {time.monotonic() - t0:.1f} s")
        for n in (a, b):
            models = listed(n)
            assert {"m-one", "m-two"} <= set(models)
            assert models["m-two"]["meshd"]["state"] == "warm"
        st = a.status()
        b_id = b.status()["node_id"]
        assert {p["node_id"]: p["serving"] for p in st["peers"]} == {b_id: "m-two"}
        by_name = {m["name"]: m for m in st["models"]}
        assert by_name["m-two"]["hosts"] == [b_id] and by_name["m-two"]["split"] is None

        # -- a node with no model is assigned the unserved one -------------------------------
        d = node(tmp_path, "d", llama_bin_dir, gguf, ["m-two", "m-three"], join=token(a))
        nodes.append(d)
        d.start()
        d.wait_model_warm("m-three")
        assert "will serve m-three: unserved model on disk" in d.log()
        wait_listed(a, "m-three")
        assert ask(a, "m-three")
        d.stop()
        a.wait_for(lambda x: "m-three" not in listed(x), "m-three gone from A after D left", 30)

        # -- kill -9 a host during a burst: failover, no hang, no duplicate ----------------
        kill_during_burst(tmp_path, gguf, a, nodes)

        # -- drop on B removes m-two everywhere, C's copy too ---------------------------------
        c = node(tmp_path, "c", llama_bin_dir, gguf, ["m-two"], serve=["m-two"], join=token(a))
        nodes.append(c)
        c.start()
        wait_listed(a, "m-two", hosts=2)
        out = b.ctl("drop", "m-two").stdout
        assert "m-two" in out
        a.wait_for(lambda x: "m-two" not in listed(x), "m-two gone from A's /v1/models", 30)
        c.wait_for(lambda x: x.status()["serving"] is None, "C stopped serving m-two", 30)
        status, body = post(a, {"model": "m-two", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and "m-one" in body["error"]["message"]
        assert {p["node_id"] for p in a.status()["peers"]} >= {b_id}  # B stays in the mesh
        assert ask(b, "m-one")
    finally:
        for n in nodes:
            n.stop()
