"""The tensor split end to end: real meshd nodes on loopback, real ggml-rpc-servers, the real
Gemma model, VRAM set by config so that the model fits no single node.

- two nodes: the host runs llama-server with ``--rpc`` entries that are 127.0.0.1 tunnel ports
  (its own share in a local rpc-server: a CPU host), every rpc-server listens on 127.0.0.1
  only, the ``openai`` SDK gets a streamed answer through every node's API and a passive
  client's; kill -9 of the worker: the host re-plans to waiting (503 + Retry-After), and
  serves again once the worker is back;
- three nodes short of VRAM two by two: waiting until the third joins, then one split over all;
- a forced split (both nodes fit it) whose worker's rpc-server dies, then is stopped: the host
  starts over each time, then runs solo once the worker is gone;
- a peer behind a 150 ms relay is left out of the split and stays in the mesh;
- a model too big for the node, refused alone, comes down from the local hub once a split
  peer joins, then splits;
- llama.cpp's device order for --tensor-split (--list-devices).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.harness.daemon import Meshd, children_of, port_open

pytestmark = pytest.mark.e2e

MODEL = "gemma-3-270m-q4_k_m"
FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}


@pytest.fixture
def procs():
    started: list[Meshd] = []
    yield started
    for n in reversed(started):
        n.stop()


def split_node(base: Path, name: str, bin_dir: str, model_path: str, vram_gb: float,
               join: str | None = None, **extra) -> Meshd:
    config = {
        "node": {"vram_gb": vram_gb},
        # loopback on a loaded 2-core machine: a wide RTT gate (its own test uses a relay)
        "models": {"serve": [model_path], "min_free_gb": 0.0, "max_rtt_ms": 1000.0},
        "llama": {"bin_dir": bin_dir, "ctx_size": 1024, "restart_min_s": 0.5,
                  "restart_max_s": 2.0, "rpc_cache_dir": str(base / "cache")},
        "mesh": dict(FAST, **({"join": [join]} if join else {})),
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return Meshd(base / name, config, name=name)


def token_of(node: Meshd) -> str:
    return node.ctl("token").stdout.strip().splitlines()[-1]


def model_entry(node: Meshd) -> dict:
    return next(m for m in node.status()["models"] if m["name"] == MODEL)


def streamed(node: Meshd) -> str:
    sdk = openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=120)
    pieces = []
    for chunk in sdk.chat.completions.create(
            model=MODEL, max_tokens=12, stream=True,
            messages=[{"role": "user", "content": "Count from one to five."}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


def post(node: Meshd) -> tuple[int, dict, dict]:
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(f"{node.api}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.load(e)


def llama_argv(node: Meshd) -> list[str]:
    pid = model_entry(node)["backend"]["pid"] if "backend" in model_entry(node) else None
    if pid is None:
        pid = node.status()["backends"][0]["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def rpc_listeners() -> list[str]:
    """Local addresses of every listening ggml-rpc-server (ss -ltnp)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if "ggml-rpc-server" in line]



def warm_split(node: Meshd, workers: int, timeout: float = 180) -> dict:
    def ready(n: Meshd):
        m = model_entry(n)
        split = m.get("split") or {}
        return (m["state"] == "warm" and (m.get("local") or {}).get("state") == "warm"
                and len(split.get("workers", [])) == workers and m)
    return node.wait_for(ready, f"{MODEL} warm as a split over {workers} nodes", timeout,
                         interval=0.25)


def test_two_nodes_split_a_model_neither_fits_and_replan_when_the_worker_dies(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    # the model is 0.24 GiB (0.26 GiB with the margin): neither 0.2 nor 0.15 GiB holds it
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 0.2).start()
    procs.append(a)
    a.wait_for(lambda n: model_entry(n)["state"].startswith("waiting"), "a waiting for VRAM", 60)
    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.15,
                   join=token_of(a)).start()
    procs.append(b)
    entry = warm_split(a, 2)
    a_id, b_id = a.status()["node_id"], b.status()["node_id"]
    split = entry["split"]
    assert split["host"] == a_id
    assert [w["node_id"] for w in split["workers"]] == [a_id, b_id]
    assert sum(w["share"] for w in split["workers"]) == pytest.approx(1.0, abs=1e-3)
    assert split["workers"][0]["share"] == pytest.approx(0.2 / 0.35, abs=1e-3)
    assert [t["node_id"] for t in split["tunnels"]] == [b_id]
    assert b.status()["role"] == "worker"

    # llama-server runs over 127.0.0.1 RPC endpoints: its own rpc-server and b's tunnel entry
    argv = llama_argv(a)
    rpc = argv[argv.index("--rpc") + 1].split(",")
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", r) for r in rpc) and len(rpc) == 2
    entry_port = split["tunnels"][0]["local_port"]
    assert rpc[1] == f"127.0.0.1:{entry_port}"
    weights = [float(w) for w in argv[argv.index("--tensor-split") + 1].split(",")]
    assert weights == pytest.approx([w["share"] for w in split["workers"]], abs=1e-3)
    # every rpc-server (a's own, b's) listens on loopback only
    listeners = rpc_listeners()
    assert len(listeners) >= 2 and all(addr.startswith("127.0.0.1:") for addr in listeners)

    # answers through both nodes' APIs and a passive client's
    client = Meshd(tmp_path / "c", {"node": {"client": True},
                                    "mesh": {"join": [token_of(a)], **FAST}}, name="client")
    client.start()
    procs.append(client)
    client.wait_for(lambda n: any(m["name"] == MODEL and m["state"] == "warm"
                                  for m in n.status()["models"]), "the client sees the model", 60)
    for node in (a, b, client):
        assert streamed(node).strip(), f"no answer through {node.name}"

    # kill -9 of the worker (its meshd; its rpc-server dies with it): a cannot run it alone
    b_children = children_of(b.pid)
    b.kill()
    for pid, _ in b_children:
        a.wait_for(lambda n, pid=pid: not Path(f"/proc/{pid}").exists(),
                   f"b's child {pid} gone", 20)
    a.wait_for(lambda n: model_entry(n)["state"].startswith("waiting"), "a waiting again", 60)
    status, headers, body = post(a)
    assert status == 503 and headers.get("Retry-After")
    assert "need" in model_entry(a)["reason"] and "need" in body["error"]["message"]

    # the worker comes back (same state dir, same identity): the split serves again
    b2 = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.15,
                    join=token_of(a))
    b2.start()
    procs.append(b2)
    warm_split(a, 2)
    assert streamed(a).strip()


def test_a_third_node_joining_a_waiting_group_starts_the_split(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 0.12).start()
    procs.append(a)
    a.wait_running()
    tok = token_of(a)
    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.1, join=tok).start()
    procs.append(b)
    a.wait_for(lambda n: len(n.status()["peers"]) == 1, "a sees b", 30)
    a.wait_for(lambda n: "group has" in (model_entry(n).get("reason") or "")
               or "need" in (model_entry(n).get("reason") or ""), "a waiting with numbers", 30)
    assert model_entry(a)["state"].startswith("waiting")
    c = split_node(tmp_path, "c", llama_bin_dir, gemma_model_path, 0.1, join=tok).start()
    procs.append(c)
    entry = warm_split(a, 3)
    assert {w["node_id"] for w in entry["split"]["workers"]} == {
        n.status()["node_id"] for n in (a, b, c)}
    assert streamed(b).strip()


class InFlight(threading.Thread):
    """A long streamed answer read chunk by chunk (bounded: 600 tokens, 120 s)."""

    def __init__(self, node: Meshd):
        super().__init__(daemon=True)
        self.node, self.chunks, self.ended = node, 0, ""
        self.first_chunk = threading.Event()
        self.start()

    def run(self) -> None:
        body = {"model": MODEL, "max_tokens": 600, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell a very long story."}]}
        req = urllib.request.Request(f"{self.node.api}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.startswith(b"data: {") and b'"error"' in line:
                        self.ended = f"error event: {line[:200]!r}"
                        return
                    if line.startswith(b"data: {"):
                        self.chunks += 1
                        self.first_chunk.set()
                    elif line.startswith(b"data: [DONE]"):
                        self.ended = "done"
                        return
                self.ended = "closed without [DONE]"
        except (OSError, urllib.error.URLError) as e:
            self.ended = f"connection error: {e}"
        finally:
            self.first_chunk.set()


def rpc_server_of(node: Meshd) -> int:
    """The pid of the ggml-rpc-server ``node``'s meshd runs (exactly one)."""
    pids = [pid for pid, comm in children_of(node.pid) if comm == "ggml-rpc-server"]
    assert len(pids) == 1, f"{node.name} runs rpc-servers {pids}"
    return pids[0]


def llama_pid(node: Meshd) -> int | None:
    return (model_entry(node).get("backend") or {}).get("pid")


def test_a_forced_split_survives_its_rpc_server_dying_or_stopping_and_goes_solo_without_it(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    # both nodes hold the model: only [models] split = true makes it a split.  a offers
    # more VRAM, so a is the host whatever node ids the two draw (ties go to the lower id)
    forced = {"models": {"split": True}, "llama": {"live_interval_s": 0.5, "live_misses": 3}}
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 1.0, **forced).start()
    procs.append(a)
    a.wait_running()
    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.8, join=token_of(a),
                   **forced).start()
    procs.append(b)
    entry = warm_split(a, 2)
    assert entry["split"]["host"] == a.status()["node_id"]
    shares = {w["node_id"]: w["share"] for w in entry["split"]["workers"]}
    assert shares == {a.status()["node_id"]: pytest.approx(1.0 / 1.8, abs=1e-3),
                      b.status()["node_id"]: pytest.approx(0.8 / 1.8, abs=1e-3)}
    assert streamed(a).strip()

    # the worker's rpc-server alone dies, mid-answer: the stream in flight ends (no hang),
    # its meshd starts another rpc-server, the host starts over
    first_llama, first_rpc = llama_pid(a), rpc_server_of(b)
    flight = InFlight(a)
    flight.first_chunk.wait(60)
    os.kill(first_rpc, 9)
    flight.join(90)
    assert not flight.is_alive(), "the request in flight hangs after its worker died"
    assert flight.chunks >= 1 and flight.ended.startswith("error event"), flight.ended
    a.wait_for(lambda n: llama_pid(n) not in (None, first_llama) and warm_split(n, 2),
               "a serving again on a new llama-server", 120)
    assert rpc_server_of(b) != first_rpc
    assert "starting it over" in a.log()
    assert streamed(a).strip() and streamed(b).strip()

    # the worker's rpc-server is stopped (SIGSTOP): no RPC answer ever comes, llama.cpp has
    # no receive timeout; b's liveness check restarts it and a starts over again
    second_llama, stopped = llama_pid(a), rpc_server_of(b)
    os.kill(stopped, 19)
    try:
        b.wait_for(lambda n: not Path(f"/proc/{stopped}").exists()
                   or Path(f"/proc/{stopped}/stat").read_text().split(") ")[1][0] == "Z",
                   "the stopped rpc-server ended by b", 60)
    finally:
        if Path(f"/proc/{stopped}").exists():
            os.kill(stopped, 18)
    a.wait_for(lambda n: llama_pid(n) not in (None, second_llama) and warm_split(n, 2),
               "a serving again after the stopped rpc-server", 120)
    assert "process-state check (stopped)" in b.log()
    assert streamed(a).strip()

    # the worker goes for good: the model fits a alone, so a runs it solo
    b.kill()
    a.wait_for(lambda n: model_entry(n)["state"] == "warm" and not model_entry(n).get("split")
               and llama_pid(n) is not None, "a serving solo", 120)
    argv = llama_argv(a)
    assert "--rpc" not in argv
    assert streamed(a).strip()


def test_a_peer_beyond_max_rtt_is_left_out_of_the_split_and_stays_in_the_mesh(
        tmp_path, procs, llama_bin_dir, gemma_model_path):
    # a (0.2 GiB) and b (0.15) hold the model together; c (0.15) is reached only through a
    # relay that adds 150 ms each way (this kernel has no netem): over max_rtt_ms = 100
    import dataclasses
    import subprocess
    import sys

    from meshd.mesh import tokens
    from tests.conftest import ROOT, free_port

    # c's links cross the relay: 300 ms a round trip, more on a loaded machine.  FAST's
    # 0.5 s probe would take c for dead (b reports a missed heartbeat, a's probe of c times
    # out), and c would re-dial a at a's own advertised address, around the relay: near.
    gate = {"models": {"max_rtt_ms": 100.0},
            "mesh": {"heartbeat_timeout_s": 6.0, "verify_timeout_s": 4.0}}
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 0.2, **gate).start()
    procs.append(a)
    a.wait_running()
    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.15, join=token_of(a),
                   **gate).start()
    procs.append(b)
    warm_split(a, 2)

    to_a, to_c = free_port(), free_port()
    c = split_node(tmp_path, "c", llama_bin_dir, gemma_model_path, 0.15, **gate)
    relay = subprocess.Popen(
        [sys.executable, str(ROOT / "bench/delay_relay.py"), "--delay-ms", "150",
         f"127.0.0.1:{to_a}=127.0.0.1:{a.mesh_port}", f"127.0.0.1:{to_c}=127.0.0.1:{c.mesh_port}"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        # c dials a through the relay, and every node dials c through it
        slow = dataclasses.replace(tokens.decode(token_of(a)), addrs=(f"127.0.0.1:{to_a}",))
        c.config["mesh"].update(join=[tokens.encode(slow)], advertise=[f"127.0.0.1:{to_c}"])
        c.start()
        procs.append(c)
        c_id = c.wait_running()["node_id"]

        def c_measured_far(n: Meshd):
            peer = next((p for p in n.status()["peers"] if p["node_id"] == c_id), None)
            return peer is not None and (peer.get("rtt_ms") or 0) > 100

        a.wait_for(c_measured_far, "a measuring c over 100 ms", 60)
        a_id, b_id = a.status()["node_id"], b.status()["node_id"]

        skipped_c = re.compile(rf"split over 2 nodes; skipped {c_id} \(\d+ ms > 100 ms\)")

        def split_without_c(n: Meshd):
            # the plan made once c was measured, not the a+b split from before c came
            entry = warm_split(n, 2)
            return ([w["node_id"] for w in entry["split"]["workers"]] == [a_id, b_id]
                    and skipped_c.search(entry["split"]["reason"] or "") and entry)

        a.wait_for(split_without_c, "a's split leaving c out, for its RTT", 120)
        # the log says why; the handshake measured c, so no plan ever took it for near
        assert re.search(rf"split over 2 nodes; skipped {c_id} \(\d+ ms > 100 ms\)", a.log())
        assert "split over 3 nodes" not in a.log()
        # meshctl explain says why, in numbers, beside each node's share
        explained = json.loads(a.ctl("explain", MODEL, "--json").stdout)["election"]
        part = {p["node_id"]: p for p in explained["nodes"]}
        assert part[c_id]["part"] == "left out", part[c_id]
        assert re.fullmatch(r"RTT \d+ ms > 100 ms \(\[models\] max_rtt_ms\)",
                            part[c_id]["reason"]), part[c_id]
        assert (part[a_id]["part"], part[b_id]["part"]) == ("split host", "split worker")
        # c stays in the mesh, and its API answers through the split
        assert any(p["node_id"] == c_id for p in a.status()["peers"])
        assert streamed(c).strip()
    finally:
        relay.kill()
        relay.wait(10)


HUB_REPO = "test/gemma-GGUF"
HUB_ENTRY = f"hf:{HUB_REPO}/{MODEL}.gguf"


@pytest.fixture
def gemma_hub(tmp_path, monkeypatch, gemma_model_path):
    """The local hub serving the Gemma GGUF (``HF_ENDPOINT`` for the daemons); its bytes."""
    from tests.harness.localhub import LocalHub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    data = Path(gemma_model_path).read_bytes()
    with LocalHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add(HUB_REPO, f"{MODEL}.gguf", data)
        yield hub, data


def test_a_model_too_big_for_the_node_comes_down_once_split_peers_join_then_splits(
        tmp_path, procs, llama_bin_dir, gemma_model_path, gemma_hub):
    # a (0.2 GiB) is to serve the model from the local hub: alone, the gate refuses it (too
    # big, no split peers); once b (0.15 GiB, holding the file) joins, the group holds it:
    # the gate is asked again, a downloads it, and hosts the split
    hub, data = gemma_hub
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 0.2,
                   models={"serve": [HUB_ENTRY]}).start()
    procs.append(a)
    a.wait_running()
    refusal = a.wait_for(lambda n: n.status()["downloads_refused"],
                         "a refusing the download alone", 60)
    assert refusal[0]["name"] == MODEL and "not downloading" in refusal[0]["reason"]
    assert not (tmp_path / "a" / "models" / f"{MODEL}.gguf").exists()
    assert hub.requests(method="GET") == []

    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.15,
                   join=token_of(a)).start()
    procs.append(b)
    entry = warm_split(a, 2, timeout=240)
    assert entry["split"]["host"] == a.status()["node_id"]
    assert (tmp_path / "a" / "models" / f"{MODEL}.gguf").read_bytes() == data
    log = a.log()
    assert "the mesh can hold" in log and "split peers will share it" in log
    assert streamed(a).strip() and streamed(b).strip()


def test_meshctl_download_on_an_idle_node_fills_a_waiting_group_which_then_splits(
        tmp_path, procs, llama_bin_dir, gemma_model_path, gemma_hub):
    # a (0.2 GiB) waits for VRAM; b (0.15 GiB) joined with no model: `meshctl download`
    # of a model b cannot hold alone proceeds (a and b hold it together), and b, now
    # holding the file of a waiting group, joins it: the split starts
    hub, data = gemma_hub
    a = split_node(tmp_path, "a", llama_bin_dir, gemma_model_path, 0.2).start()
    procs.append(a)
    a.wait_for(lambda n: model_entry(n)["state"].startswith("waiting"), "a waiting for VRAM", 60)
    b = split_node(tmp_path, "b", llama_bin_dir, gemma_model_path, 0.15, join=token_of(a),
                   models={"serve": []}).start()
    procs.append(b)
    b.wait_running()
    r = b.ctl("download", HUB_ENTRY)
    assert r.returncode == 0 and "downloading" in r.stdout, r.stdout + r.stderr
    entry = warm_split(a, 2, timeout=240)
    assert [w["node_id"] for w in entry["split"]["workers"]] == [
        a.status()["node_id"], b.status()["node_id"]]
    assert (tmp_path / "b" / "models" / f"{MODEL}.gguf").read_bytes() == data
    assert "joining the group" in b.log()
    assert streamed(b).strip()


def test_llama_cpp_takes_the_rpc_devices_in_the_order_of_rpc_and_gives_the_cpu_no_share(
        llama_bin_dir):
    # --tensor-split's weights go to the devices in --list-devices' order: the --rpc
    # entries as given; a CPU-only host's CPU is no device there (its share runs in a local
    # rpc-server, listed first by meshd's prepare)
    from tests.conftest import free_port

    ports = [free_port(), free_port()]
    servers = [subprocess.Popen([str(Path(llama_bin_dir) / "ggml-rpc-server"), "-H", "127.0.0.1",
                                 "-p", str(p)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for p in ports]
    try:
        for p in ports:
            assert port_open(p, 30), f"rpc-server on {p} never listened"
        given = [f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[0]}"]
        out = subprocess.run([str(Path(llama_bin_dir) / "llama-server"), "--rpc", ",".join(given),
                              "--list-devices"], capture_output=True, text=True, timeout=60)
        listed = re.findall(r"^\s+(\S+): (\S+) \(", out.stdout + out.stderr, re.M)
        assert listed == [("RPC0", given[0]), ("RPC1", given[1])], out.stdout + out.stderr
    finally:
        for s in servers:
            s.kill()
            s.wait(10)
