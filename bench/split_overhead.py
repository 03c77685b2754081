#!/usr/bin/env python3
"""What meshd's tensor split costs: tokens/s, re-plan time and load time (issue 11).

One invocation, one model, one prompt, one ``n_predict``; every tokens/s figure is
llama-server's own (``POST /completion``, ``timings.predicted_per_second``, asked on the
llama-server port, so meshd's API proxy is not in it), the median of ``--runs`` runs
after a warm-up, with its ratio to line 1.  Every line's processes are started first and
stay up (idle while the others run); then each round runs every line once (order
reversed every other round), so the drift of a shared machine hits every line alike,
and the ratios are given both of the medians and as the median of the per-round ratios.

1. ``direct``: two ggml-rpc-servers started here, llama-server ``--rpc`` to both over
   plain loopback, ``--tensor-split 0.5,0.5`` (llama.cpp's own RPC, 1.00);
2. ``bare relay``: the same, the second rpc-server reached through two chained
   ``bench/delay_relay.py`` processes (entry -> exit -> rpc-server): what any two-hop
   relay costs on this machine;
3. ``meshd``: two real meshd nodes forming a split (``[models] tensor_split = [0.5, 0.5]``,
   VRAM set so the model fits neither alone), asked on the host's llama-server port;
4. and 5. lines 2 and 3 with 5 ms and 20 ms added RTT between host and worker (the entry
   relay delays each way by half; for meshd the mesh connection between the two nodes
   goes through a delaying relay, as in tests/placement/test_split_e2e.py).
Each line has its own rpc-servers (same binary, same flags): rpc-server serves one
client at a time, so two llama-servers cannot share a pair.

Beside tokens/s: CPU per generated token of the relay processes (the relays, or both
meshd daemons) and of llama.cpp (llama-server + rpc-servers), from /proc/PID/stat; the
llama-server load time of each line; round trips per token on the host-worker link,
from the slope of ms/token over the added RTT.

6. re-plan: three meshd nodes a (0.2 GiB), b (0.1), c (0.1), split over all three; kill -9
   of c's meshd (its rpc-server dies by pdeathsig) and the time until a's API streams a
   token again (bounded streaming requests, polled), with the rpc-servers' tensor cache
   warm (kept) and cold (its files deleted before the kill), with the llama-server load
   time it contains (a's log: "started pid" to "ready on");
7. model load time (llama-server start to ready), cache cold and warm: each line's
   llama-server starts twice (a meshd line: the pair is stopped and started again on the
   same cache dirs, a fresh split; the second start is the one measured).

    export MESHD_LLAMA_BIN_DIR=~/.cache/meshd/llama.cpp-11434.0.0/bin
    export MESHD_TEST_MODEL=~/.cache/meshd/models/gemma-3-270m-q4_k_m.gguf
    python3 bench/split_overhead.py            # about 8 minutes on 2 cores
    python3 bench/split_overhead.py --quick    # fewer runs and re-plans

Every process is started here and ended by its PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.mesh import tokens  # noqa: E402
from tests.conftest import find_llama_bin_dir, find_model, free_port  # noqa: E402
from tests.harness.daemon import Meshd, children_of, port_open  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PROMPT = "Write a short story about a robot who learns to paint."
FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}
RELAY = ROOT / "bench" / "delay_relay.py"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total



# -- processes started here ------------------------------------------------------------


class Procs:
    """Every child this bench starts, ended by its PID (never by name)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[Meshd] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def relay(self, delay_ms: float, routes: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(RELAY), "--delay-ms", f"{delay_ms:g}",
                                 *routes], stdout=subprocess.PIPE, stderr=open(log, "ab"),
                                text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"delay_relay did not start (see {log})")
        return proc

    def end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def node(self, node: Meshd) -> Meshd:
        with contextlib.redirect_stdout(io.StringIO()):  # the harness's "started meshd ..."
            node.start()
        self.nodes.append(node)
        return node

    def end_node(self, node: Meshd) -> None:
        node.stop()
        if node in self.nodes:
            self.nodes.remove(node)

    def end_all(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        for proc in reversed(self.procs):
            self.end(proc)


# -- asking llama-server -----------------------------------------------------------------


def completion(port: int, n_predict: int, key: str | None = None) -> tuple[float, int]:
    """(generation tokens/s, tokens generated) from llama-server's own timings."""
    body = json.dumps({"prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "seed": 1,
                       "ignore_eos": True, "cache_prompt": False})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/completion", body, headers)
        r = conn.getresponse()
        data = json.loads(r.read())
    finally:
        conn.close()
    if r.status != 200:
        raise SystemExit(f"llama-server on {port} answered {r.status}: {data}")
    t = data["timings"]
    return float(t["predicted_per_second"]), int(t["predicted_n"])


def wait_health(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited ({proc.returncode}) while loading")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise SystemExit(f"llama-server on {port} not ready after {timeout_s:.0f} s")


class Line:
    """One line of the table: a llama-server kept running (idle between its runs) and the
    processes whose CPU is counted for it."""

    name = ""
    port = 0
    key: str | None = None
    rtt_ms = 0.0
    relay_pids: list[int]
    llama_pids: list[int]
    load_cold: float | None = None
    load_warm: float | None = None
    note = ""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.tokens = 0
        self.relay_cpu = 0.0
        self.llama_cpu = 0.0

    def run(self, n_predict: int, record: bool) -> None:
        r0, l0 = cpu_seconds(self.relay_pids), cpu_seconds(self.llama_pids)
        tps, n = completion(self.port, n_predict, self.key)
        if record:
            self.relay_cpu += cpu_seconds(self.relay_pids) - r0
            self.llama_cpu += cpu_seconds(self.llama_pids) - l0
            self.rates.append(tps)
            self.tokens += n

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def relay_ms_tok(self) -> float | None:
        return self.relay_cpu * 1000 / self.tokens if self.relay_pids else None

    @property
    def llama_ms_tok(self) -> float:
        return self.llama_cpu * 1000 / self.tokens


def wait_connect(port: int, timeout_s: float = 30) -> None:
    if not port_open(port, timeout_s):
        raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


# -- lines 1, 2, 4, 5: llama.cpp's own --rpc, straight or through bare relays -----------


class DirectLine(Line):
    """Two rpc-servers of its own (cache on, as meshd runs them), the second straight or,
    with ``rtt_ms`` set, through an entry relay (adding ``rtt_ms`` of round trip) and an
    exit relay; llama-server started twice: cache cold, then warm."""

    def __init__(self, procs: Procs, base: Path, bin_dir: str, model: str, name: str,
                 rtt_ms: float | None):
        super().__init__()
        self.name, self.rtt_ms = name, rtt_ms or 0.0
        d = base / name.replace(" ", "-").replace("+", "")
        rpc_ports = [free_port(), free_port()]
        self.caches = [d / "cache-0", d / "cache-1"]
        rpcs = []
        for port, cache in zip(rpc_ports, self.caches, strict=True):
            cache.mkdir(parents=True)
            rpcs.append(procs.start(
                [f"{bin_dir}/ggml-rpc-server", "-H", "127.0.0.1", "-p", str(port), "-c"],
                d / f"rpc-{port}.log", env={"LLAMA_CACHE": str(cache)}))
        for port in rpc_ports:
            wait_connect(port)
        second = f"127.0.0.1:{rpc_ports[1]}"
        self.relay_pids = []
        if rtt_ms is not None:
            exit_port, entry_port = free_port(), free_port()
            self.relay_pids.append(procs.relay(
                0, [f"127.0.0.1:{exit_port}=127.0.0.1:{rpc_ports[1]}"], d / "relay-exit.log").pid)
            self.relay_pids.append(procs.relay(
                rtt_ms / 2, [f"127.0.0.1:{entry_port}=127.0.0.1:{exit_port}"],
                d / "relay-entry.log").pid)
            second = f"127.0.0.1:{entry_port}"
        self.port = free_port()
        argv = [f"{bin_dir}/llama-server", "-m", model,
                "--rpc", f"127.0.0.1:{rpc_ports[0]},{second}", "--n-gpu-layers", "999",
                "--tensor-split", "0.5,0.5", "--ctx-size", "1024",
                "--host", "127.0.0.1", "--port", str(self.port)]
        for attempt in ("cold", "warm"):
            t0 = time.monotonic()
            llama = procs.start(argv, d / f"llama-{attempt}.log")
            wait_health(self.port, llama)
            setattr(self, f"load_{attempt}", time.monotonic() - t0)
            if attempt == "cold":
                procs.end(llama)  # rpc-server serves one client: this one must be gone
        self.llama_pids = [llama.pid] + [p.pid for p in rpcs]
        print(f"  {name}: up (load {self.load_cold:.2f} s cold, {self.load_warm:.2f} s warm)",
              flush=True)

    def cache_files(self) -> list[Path]:
        return rpc_cache_files(*self.caches)


# -- meshd nodes -----------------------------------------------------------------------------


def split_node(base: Path, name: str, bin_dir: str, model: str, vram_gb: float,
               join: str | None = None, cache: Path | None = None, fast: bool = True,
               **extra: Any) -> Meshd:
    """As tests/placement/test_split_e2e.py's, with a JSON log (timestamps to the µs);
    ``fast``: its quick heartbeat (a lost peer seen in 1.5 s), else meshd's default."""
    config: dict[str, Any] = {
        "node": {"vram_gb": vram_gb},
        "models": {"serve": [model], "min_free_gb": 0.0, "max_rtt_ms": 1000.0},
        "llama": {"bin_dir": bin_dir, "ctx_size": 1024, "restart_min_s": 0.5,
                  "restart_max_s": 2.0, "rpc_cache_dir": str(cache or base / f"{name}-cache")},
        "mesh": dict(FAST if fast else {}, **({"join": [join]} if join else {})),
        "log": {"level": "info", "format": "json"},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return Meshd(base / name, config, name=name)


def token_of(node: Meshd) -> str:
    return node.ctl("token").stdout.strip().splitlines()[-1]


def entry_of(node: Meshd, model: str) -> dict:
    return next(m for m in node.status()["models"] if m["name"] == model)


def warm_split(node: Meshd, model: str, workers: int, timeout: float = 180,
               not_pid: int | None = None) -> dict:
    def ready(n: Meshd):
        m = entry_of(n, model)
        split = m.get("split") or {}
        pid = (m.get("backend") or {}).get("pid")
        return (m["state"] == "warm" and (m.get("local") or {}).get("state") == "warm"
                and len(split.get("workers", [])) == workers and pid and pid != not_pid and m)
    return node.wait_for(ready, f"{model} warm as a split over {workers} nodes", timeout,
                         interval=0.2)


def llama_of(node: Meshd, model: str) -> tuple[int, int, str]:
    """(pid, port, API key) of the host's llama-server."""
    pid = entry_of(node, model)["backend"]["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
    return pid, int(argv[argv.index("--port") + 1]), env.get("LLAMA_API_KEY", "")


def log_events(node: Meshd, since: float = 0.0) -> list[tuple[float, str]]:
    """(wall-clock time, message) of ``node``'s JSON log lines at or after ``since``."""
    out = []
    for raw in node.log().splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        when = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
        if when >= since:
            out.append((when, event.get("message", "")))
    return out


def load_times(node: Meshd, since: float = 0.0) -> list[float]:
    """Seconds from each llama-server "started pid" to its "ready on" in ``node``'s log,
    for starts at or after ``since``."""
    started: dict[str, float] = {}
    out = []
    for when, msg in log_events(node, since):
        if not msg.startswith("llama-server["):
            continue
        if m := re.search(r": started pid (\d+)", msg):
            started[m.group(1)] = when
        elif (m := re.search(r": ready on \S+ \(pid (\d+)\)", msg)) and m.group(1) in started:
            out.append(when - started.pop(m.group(1)))
    return out


def replan_steps(node: Meshd, since: float, old_pid: int) -> dict[str, float]:
    """Seconds after ``since`` (the kill) of the steps of a re-plan, from ``node``'s log."""
    marks = {
        "seen": r"^split of .*: (?!ready)|^peer \S+ (down|left)",
        "old stopped": rf"^llama-server\[.*\]: pid {old_pid} .*stopped",
        "started": r"^llama-server\[.*\]: started pid",
        "ready": r"^llama-server\[.*\]: ready on",
    }
    steps: dict[str, float] = {}
    for when, msg in log_events(node, since):
        for step, pattern in marks.items():
            if step not in steps and re.search(pattern, msg):
                steps[step] = when - since
    return steps


def rpc_cache_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in (d / "rpc").glob("*") if p.is_file()]


class MeshdPair:
    """a (host) and b (worker), ``tensor_split = [0.5, 0.5]``; with ``rtt_ms`` the mesh
    connection between them goes through a delay_relay adding that round trip."""

    def __init__(self, procs: Procs, base: Path, bin_dir: str, model: str,
                 rtt_ms: float, caches: tuple[Path, Path]):
        self.procs, self.model = procs, Path(model).stem
        # the default heartbeat: less idle CPU while the other lines run
        even = {"models": {"tensor_split": [0.5, 0.5]}}
        self.a = split_node(base, "a", bin_dir, model, 0.2, cache=caches[0], fast=False,
                            **even)
        procs.node(self.a)
        self.a.wait_running()
        b = split_node(base, "b", bin_dir, model, 0.15, cache=caches[1], fast=False,
                       join=token_of(self.a), **even)
        self.relay: subprocess.Popen | None = None
        if rtt_ms:
            to_a, to_b = free_port(), free_port()
            self.relay = procs.relay(rtt_ms / 2, [
                f"127.0.0.1:{to_a}=127.0.0.1:{self.a.mesh_port}",
                f"127.0.0.1:{to_b}=127.0.0.1:{b.mesh_port}"], base / "relay.log")
            slow = dataclasses.replace(tokens.decode(token_of(self.a)),
                                       addrs=(f"127.0.0.1:{to_a}",))
            b.config["mesh"].update(join=[tokens.encode(slow)],
                                    advertise=[f"127.0.0.1:{to_b}"])
        self.b = procs.node(b)
        warm_split(self.a, self.model, 2)
        split = entry_of(self.a, self.model)["split"]
        if split["host"] != self.a.status()["node_id"]:
            raise SystemExit(f"{base}: b hosts the split, not a: {split}")
        self.load = (load_times(self.a) or [None])[-1]

    def stop(self) -> None:
        self.procs.end_node(self.b)
        self.procs.end_node(self.a)
        if self.relay is not None:
            self.procs.end(self.relay)


class MeshdLine(Line):
    """Two meshd nodes split the model (cache cold); stopped and started again on the
    same caches (a fresh split, cache warm), which one is measured."""

    def __init__(self, procs: Procs, base: Path, bin_dir: str, model: str, name: str,
                 rtt_ms: float):
        super().__init__()
        self.name, self.rtt_ms = name, rtt_ms
        d = base / name.replace(" ", "-").replace("+", "")
        caches = (d / "a-cache", d / "b-cache")
        first = MeshdPair(procs, d / "first", bin_dir, model, rtt_ms, caches)
        self.load_cold = first.load
        first.stop()
        self.pair = MeshdPair(procs, d / "again", bin_dir, model, rtt_ms, caches)
        self.load_warm = self.pair.load
        a, b = self.pair.a, self.pair.b
        pid, self.port, self.key = llama_of(a, self.pair.model)
        rpcs = [p for n in (a, b) for p, comm in children_of(n.pid) if comm == "ggml-rpc-server"]
        self.relay_pids, self.llama_pids = [a.pid, b.pid], [pid, *rpcs]
        if self.pair.relay is not None:
            b_id = b.status()["node_id"]
            peer = a.wait_for(lambda n: next((p for p in n.status()["peers"]
                                              if p["node_id"] == b_id and p.get("rtt_ms")),
                                             None), "a measuring b's RTT", 30)
            self.note = (f"heartbeat RTT {peer['rtt_ms']:.1f} ms; the delay relay, a third "
                         "process, not counted")
        print(f"  {name}: up (load {fmt(self.load_cold)} s cold, {fmt(self.load_warm)} s warm)",
              flush=True)


# -- line 6: re-plan after kill -9 -------------------------------------------------------------


def first_token(node: Meshd, model: str, timeout_s: float = 120) -> float:
    """Poll ``node``'s API with short streaming requests until one streams a token; the
    monotonic time it came."""
    body = json.dumps({"model": model, "max_tokens": 2, "stream": True,
                       "messages": [{"role": "user", "content": "Say hi."}]})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=5)
        try:
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status == 200:
                while line := r.readline():
                    if line.startswith(b"data: ") and b'"content"' in line:
                        chunk = json.loads(line[6:])
                        delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                        if delta.get("content"):
                            return time.monotonic()
            else:
                r.read()
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise SystemExit(f"no token through {node.name}'s API within {timeout_s:.0f} s\n"
                     + node.log()[-3000:])


def replan(procs: Procs, base: Path, bin_dir: str, model: str, cycles: list[str]
           ) -> tuple[list[tuple[str, float, float | None, str]], float | None]:
    """Kill -9 of c, one cycle per entry of ``cycles`` ("warm"/"cold"); each cycle starts
    c again and waits for the split over three first.  Returns (cache state, kill to first
    token s, llama-server load s in it, cache files at the kill) per cycle and the first
    three-node load (cold)."""
    name = Path(model).stem
    base = base / "replan"
    a = procs.node(split_node(base, "a", bin_dir, model, 0.2))
    a.wait_running()
    join = token_of(a)
    b = procs.node(split_node(base, "b", bin_dir, model, 0.1, join=join))
    c = procs.node(split_node(base, "c", bin_dir, model, 0.1, join=join))
    warm_split(a, name, 3)
    first_load = (load_times(a) or [None])[-1]
    first_token(a, name)
    caches = [n.dir.parent / f"{n.name}-cache" for n in (a, b, c)]
    out = []
    for i, kind in enumerate(cycles):
        if i:
            c = procs.node(split_node(base, "c", bin_dir, model, 0.1, join=join))
            warm_split(a, name, 3, not_pid=llama_of(a, name)[0])
            first_token(a, name)
        if kind == "cold":
            for f in rpc_cache_files(*caches):
                f.unlink()
        files = " ".join(f"{n.name}:{len(rpc_cache_files(d))}"
                         for n, d in zip((a, b, c), caches, strict=True))
        old_pid = llama_of(a, name)[0]
        wall0, t0 = time.time(), time.monotonic()
        c.kill()  # SIGKILL of c's meshd: its rpc-server goes by pdeathsig
        procs.nodes.remove(c)
        t1 = first_token(a, name)
        entry = warm_split(a, name, 2, timeout=30, not_pid=old_pid)
        loads = load_times(a, since=wall0)
        out.append((kind, t1 - t0, loads[-1] if loads else None, files))
        steps = replan_steps(a, wall0, old_pid)
        print(f"  re-plan {i + 1} ({kind} cache, cache files at the kill {files}): "
              f"{t1 - t0:.2f} s to the first token, llama-server load "
              f"{loads[-1] if loads else float('nan'):.2f} s; now "
              f"{len(entry['split']['workers'])} nodes; after the kill: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
              + f", first token {t1 - t0:.2f} s", flush=True)
    for n in (a, b):
        procs.end_node(n)
    return out, first_load


# -- the table ---------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def round_trips(lines: dict[float, Line]) -> str:
    """Round trips per token on the delayed link: the slope of s/token over added RTT."""
    if 0.0 not in lines or len(lines) < 2:
        return "-"
    far = max(lines)
    per_tok = {rtt: 1 / line.median for rtt, line in lines.items()}
    return f"{(per_tok[far] - per_tok[0.0]) / (far / 1000):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs a line, 2 re-plans")
    parser.add_argument("--runs", type=int, default=None, help="runs per line (default 10)")
    parser.add_argument("--n-predict", type=int, default=48)
    parser.add_argument("--rtts", default="5,20", help="added RTTs in ms (default 5,20)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    args.runs = args.runs or (3 if args.quick else 10)
    cycles = ["cold", "warm"] if args.quick else ["cold", "warm", "cold", "warm"]
    bin_dir, model = find_llama_bin_dir(), find_model()
    missing = [what for what, found in (("llama.cpp build", bin_dir), ("model", model))
               if not found]
    if bin_dir and not Path(bin_dir, "ggml-rpc-server").exists():
        missing.append("ggml-rpc-server")
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}.  Set MESHD_LLAMA_BIN_DIR to a llama.cpp bin "
            "directory holding llama-server and ggml-rpc-server, and MESHD_TEST_MODEL to the "
            "Gemma 270M GGUF (or build and fetch them into ~/.cache/meshd: scripts/build-llama.sh)")
    assert bin_dir and model
    rtts = [float(x) for x in args.rtts.split(",") if x]
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="split-bench-")
    base = Path(tmp)
    procs = Procs()
    print(f"model {Path(model).name}, prompt {len(PROMPT)} chars, n_predict {args.n_predict}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start",
          flush=True)
    try:
        print("setting up (every line keeps its processes; idle while the others run)")
        relay_lines: dict[float, Line] = {}
        meshd_lines: dict[float, Line] = {}
        direct = DirectLine(procs, base, bin_dir, model, "direct", None)
        lines: list[Line] = [direct]
        for rtt in [0.0, *rtts]:
            tag = f" +{rtt:g} ms" if rtt else ""
            relay_lines[rtt] = DirectLine(procs, base, bin_dir, model, f"bare relay{tag}", rtt)
            meshd_lines[rtt] = MeshdLine(procs, base, bin_dir, model, f"meshd{tag}", rtt)
            lines += [relay_lines[rtt], meshd_lines[rtt]]
        print(f"measuring: {args.runs} rounds after a warm-up round, every line once a round "
              "(order reversed every other round)", flush=True)
        for r in range(args.runs + 1):
            for line in lines if r % 2 else reversed(lines):
                line.run(args.n_predict, record=r > 0)
            if r:
                print(f"  round {r}: " + ", ".join(f"{line.rates[-1]:.1f}" for line in lines),
                      flush=True)
        direct_cache = [p.stat().st_size for p in direct.cache_files()]
        for line in lines:
            if isinstance(line, MeshdLine):
                line.pair.stop()
        for proc in list(procs.procs):
            procs.end(proc)
        print("re-plan", flush=True)
        replans, first_load = replan(procs, base, bin_dir, model, cycles)
        replan_caches = {n: [p.stat().st_size for p in rpc_cache_files(
            base / "replan" / f"{n}-cache")] for n in "abc"}
    finally:
        procs.end_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(logs kept in {tmp})")

    base_rate = lines[0].median

    def paired(line: Line, base: Line) -> float:
        """The median of the ratios within each round (the drift between rounds cancels)."""
        return statistics.median(x / y for x, y in zip(line.rates, base.rates, strict=True))

    print(f"\n{'line':16s} {'tokens/s':>8s} {'range':>11s} {'÷direct':>13s} {'÷relay':>13s} "
          f"{'load s':>11s} {'relay CPU':>9s} {'llama CPU':>9s}")
    print(f"{'':16s} {'median':>8s} {'':11s} {'medians/pair':>13s} {'medians/pair':>13s} "
          f"{'cold/warm':>11s} {'ms/token':>9s} {'ms/token':>9s}")
    for line in lines:
        vs_relay = ""
        if isinstance(line, MeshdLine):
            relay = relay_lines[line.rtt_ms]
            vs_relay = f"{line.median / relay.median:.3f}/{paired(line, relay):.3f}"
        vs_direct = f"{line.median / base_rate:.3f}/{paired(line, lines[0]):.3f}"
        load = f"{fmt(line.load_cold)}/{fmt(line.load_warm)}"
        print(f"{line.name:16s} {line.median:8.2f} {min(line.rates):5.1f}-{max(line.rates):<5.1f} "
              f"{vs_direct:>13s} {vs_relay:>13s} {load:>11s} "
              f"{fmt(line.relay_ms_tok, '.1f'):>9s} {line.llama_ms_tok:9.1f}  {line.note}")
    print("(÷: ratio of the medians / median of the per-round ratios; relay CPU: the two "
          "relays, or the two meshd daemons; llama CPU: llama-server and both rpc-servers)")
    print(f"\nround trips per token on the host-worker link (slope of s/token over the "
          f"added RTT): bare relay {round_trips(relay_lines)}, meshd {round_trips(meshd_lines)}")
    relay0, meshd0 = relay_lines[0.0], meshd_lines[0.0]
    extra = (meshd0.relay_ms_tok or 0.0) - (relay0.relay_ms_tok or 0.0)
    print(f"relay processes' CPU per token: two bare relays {fmt(relay0.relay_ms_tok, '.1f')} ms, "
          f"two meshd daemons {fmt(meshd0.relay_ms_tok, '.1f')} ms ({extra:+.1f} ms/token, "
          f"{extra * meshd0.median / 10:.1f} % of one core at {meshd0.median:.1f} tokens/s)")
    goal = relay0.median * 0.95
    print(f"speed goal (meshd within 5 % of the bare relay, >= {goal:.2f} tokens/s here): "
          f"meshd {meshd0.median:.2f} ({meshd0.median / relay0.median:.3f} of the relay, "
          f"{paired(meshd0, relay0):.3f} paired) -> "
          f"{'met' if min(meshd0.median / relay0.median, paired(meshd0, relay0)) >= 0.95 else 'NOT met'}"
          " (judge it against the spread of the lines above)")
    print("\nre-plan: a (0.2 GiB) + b (0.1) + c (0.1), kill -9 of c's meshd, until a's API "
          "streams a token again (split over a+b)")
    for kind in ("warm", "cold"):
        got = [r for r in replans if r[0] == kind]
        if got:
            times = [r[1] for r in got]
            loads = [r[2] for r in got if r[2] is not None]
            print(f"  cache {kind}: {statistics.median(times):.2f} s median "
                  f"({', '.join(f'{t:.2f}' for t in times)}); llama-server load in it "
                  f"{statistics.median(loads) if loads else float('nan'):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in loads)}); cache files at the kill "
                  + "; ".join(r[3] for r in got))
    warm_times = [r[1] for r in replans if r[0] == "warm"]
    if warm_times:
        print(f"  goal (under 15 s warm): {max(warm_times):.2f} s worst -> "
              f"{'met' if max(warm_times) < 15 else 'NOT met'}")
    print(f"\nmodel load time (llama-server start to ready), cache cold/warm: direct "
          f"{fmt(lines[0].load_cold)}/{fmt(lines[0].load_warm)} s; through meshd's tunnels "
          f"{fmt(meshd0.load_cold)}/{fmt(meshd0.load_warm)} s; three meshd nodes from "
          f"scratch {fmt(first_load)} s (cold)")
    print(f"rpc cache files (bytes) after the runs: the direct line's rpc-servers "
          f"{direct_cache}; the re-plan nodes {replan_caches}")
    print(f"\n(took {time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
