"""Passive-node figures with real ``meshd`` daemons on loopback.

    python3 bench/passive_scale.py                    # everything
    python3 bench/passive_scale.py --only idle,rate   # no llama-server needed
    python3 bench/passive_scale.py --only promotion --runs 3 --json

- idle: one active node (the fast fake backend as its llama-server) and ``--clients``
  (500) passive clients (``bench/passive_swarm.py``, two processes) checking in every
  ``--refresh-s`` (30): the active node's CPU (utime + stime from /proc) over
  ``--window-s`` once every client holds a table, in % of one core, and per route request.
- rate: the same node under ``--rate-clients`` clients refreshing every 50 ms: the route
  requests/s it answered (the swarms share the machine's cores with it, so this is a
  floor) and its CPU per request (the ceiling it implies: 1 / that).
- promotion (real llama-server, real Gemma): active node A hosts the model, active node B
  serves another (fake backend), standby S has the model on disk; ``kill -9`` A and read
  S's promotion record: detection (kill -> the table without A's host), decision (table ->
  promote), model load (llama-server start -> warm), and how long requests for the model
  through B's API failed.

Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import DEFAULT_MODEL_NAME, find_llama_bin_dir, find_model  # noqa: E402
from tests.harness.daemon import Meshd, fake_llama_bin_dir  # noqa: E402

FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def active_node(base: Path) -> Meshd:
    models = base / "a" / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / "m1.gguf"
    if not link.exists():
        os.symlink(find_model(), link)
    a = Meshd(base / "a", {"models": {"serve": ["m1"]}, "llama": {"bin_dir": fake_llama_bin_dir(base)},
                           "log": {"level": "info"}}, name="active").start()
    a.wait_model_warm("m1", 60)
    return a


def swarms(token: str, total: int, refresh_s: float, seconds: float, ramp_s: float,
           procs: int = 2) -> list[subprocess.Popen]:
    return [subprocess.Popen(
        [sys.executable, str(ROOT / "bench/passive_swarm.py"), "--token", token,
         "--count", str(total // procs), "--refresh-s", str(refresh_s),
         "--seconds", str(seconds), "--ramp-s", str(ramp_s)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(procs)]


def end(ps: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in ps:
        try:
            text, _ = p.communicate(timeout=120)
            out.append(json.loads(text.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            p.kill()
            p.wait(10)
    return out


def measure(a: Meshd, window_s: float) -> dict:
    s0, c0, t0 = a.status(), cpu_s(a.pid), time.monotonic()
    time.sleep(window_s)
    s1, c1, t1 = a.status(), cpu_s(a.pid), time.monotonic()
    req = s1["passive"]["requests"] - s0["passive"]["requests"]
    cpu = c1 - c0
    return {"window_s": round(t1 - t0, 1), "clients": s1["passive"]["clients"],
            "requests": req, "requests_per_s": round(req / (t1 - t0), 1),
            "cpu_percent": round(100 * cpu / (t1 - t0), 2),
            "cpu_us_per_request": round(1e6 * cpu / req, 1) if req else None}


def bench_idle(base: Path, args: argparse.Namespace) -> dict:
    a = active_node(base / "idle")
    try:
        tok = a.ctl("token").stdout.strip().splitlines()[-1]
        base_cpu = measure(a, 10)  # the node alone: heartbeat-free, no peers
        ramp = 10.0
        ps = swarms(tok, args.clients, args.refresh_s, ramp + args.refresh_s * 1.5
                    + args.window_s + 10, ramp)
        a.wait_for(lambda n: n.status()["passive"]["clients"] >= args.clients, "clients",
                   ramp + 60, interval=1)
        time.sleep(args.refresh_s * 1.2)  # past the joins' own first refresh
        m = measure(a, args.window_s)
        m["node_alone_cpu_percent"] = base_cpu["cpu_percent"]
        m["refresh_s"] = args.refresh_s
        m["swarms"] = end(ps)
        return m
    finally:
        a.stop()


def bench_rate(base: Path, args: argparse.Namespace) -> dict:
    a = active_node(base / "rate")
    try:
        tok = a.ctl("token").stdout.strip().splitlines()[-1]
        ps = swarms(tok, args.rate_clients, 0.05, 5 + 20, 4)
        a.wait_for(lambda n: n.status()["passive"]["clients"] >= args.rate_clients, "clients", 60)
        time.sleep(2)
        m = measure(a, 15)
        if m["cpu_us_per_request"]:
            m["ceiling_requests_per_s"] = round(1e6 / m["cpu_us_per_request"])
        m["swarms"] = end(ps)
        return m
    finally:
        a.stop()


def bench_promotion(base: Path, run: int) -> dict:
    bin_dir, model = find_llama_bin_dir(), find_model()
    if not bin_dir or not model:
        raise SystemExit("promotion needs the llama.cpp build and the Gemma model (./dev)")
    d = base / f"promo{run}"
    started: list[Meshd] = []
    try:
        a = Meshd(d / "a", {"models": {"serve": [model]},
                            "llama": {"bin_dir": bin_dir, "ctx_size": 1024},
                            "mesh": dict(FAST)}, name="a").start()
        started.append(a)
        a.wait_model_warm(DEFAULT_MODEL_NAME)
        tok = a.ctl("token").stdout.strip().splitlines()[-1]
        (d / "b" / "models").mkdir(parents=True)
        os.symlink(model, d / "b" / "models" / "other.gguf")
        b = Meshd(d / "b", {"models": {"serve": ["other"]}, "llama": {"bin_dir": fake_llama_bin_dir(d)},
                            "mesh": {"join": [tok], **FAST}}, name="b").start()
        started.append(b)
        b.wait_model_warm("other", 60)
        (d / "s" / "models").mkdir(parents=True)
        os.symlink(model, d / "s" / "models" / f"{DEFAULT_MODEL_NAME}.gguf")
        s = Meshd(d / "s", {"node": {"standby": True},
                            "llama": {"bin_dir": bin_dir, "ctx_size": 1024},
                            "mesh": {"join": [tok], "refresh_s": 30.0, **FAST}},
                  name="standby").start()
        started.append(s)
        s.wait_for(lambda n: (n.status().get("route") or {}).get("table"), "standby table", 30)
        b.wait_for(lambda n: any(p["serving"] == DEFAULT_MODEL_NAME
                                 for p in n.status()["peers"]), "b sees a's model", 20)
        import openai

        api = openai.OpenAI(base_url=f"{b.api}/v1", api_key="x", max_retries=0, timeout=30)

        def ask() -> bool:
            r = api.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}])
            return bool(r.choices)

        ask()
        t_kill = time.time()
        a.kill()
        failed, first_ok = 0, None
        while time.time() - t_kill < 120:
            try:
                if ask():
                    first_ok = time.time()
                    break
            except openai.APIError:
                failed += 1
            time.sleep(0.1)
        p = s.status().get("promotion") or {}
        return {"detection_s": round(p["table_at"] - t_kill, 3),
                "decision_s": round(p["decided_at"] - p["table_at"], 3),
                "model_load_s": round(p["warm_at"] - p["serving_at"], 2),
                "unavailable_s": round(first_ok - t_kill, 2) if first_ok else None,
                "failed_requests": failed}
    finally:
        for n in reversed(started):
            n.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="idle,rate,promotion")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--refresh-s", type=float, default=30.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--rate-clients", type=int, default=200)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="passive-bench-") as tmp:
        base = Path(tmp)
        if "idle" in only:
            results["idle"] = bench_idle(base, args)
        if "rate" in only:
            results["rate"] = bench_rate(base, args)
        if "promotion" in only:
            runs = [bench_promotion(base, i) for i in range(args.runs)]
            results["promotion"] = {"runs": runs}
            for key in ("detection_s", "decision_s", "model_load_s", "unavailable_s"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                if vals:
                    results["promotion"][f"median_{key}"] = statistics.median(vals)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    if "idle" in results:
        r = results["idle"]
        print(f"{r['clients']} passive clients at refresh {r['refresh_s']:g} s: active node CPU "
              f"{r['cpu_percent']} % of one core ({r['node_alone_cpu_percent']} % alone), "
              f"{r['requests_per_s']} route requests/s, {r['cpu_us_per_request']} µs CPU each")
    if "rate" in results:
        r = results["rate"]
        print(f"route requests/s answered: {r['requests_per_s']} ({r['clients']} clients at 50 ms, "
              f"CPU {r['cpu_percent']} %, {r['cpu_us_per_request']} µs each: ceiling "
              f"~{r.get('ceiling_requests_per_s')} /s per core)")
    if "promotion" in results:
        for i, r in enumerate(results["promotion"]["runs"]):
            print(f"promotion run {i}: detection {r['detection_s']} s, decision {r['decision_s']} s, "
                  f"model load {r['model_load_s']} s; unavailable {r['unavailable_s']} s "
                  f"({r['failed_requests']} failed requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
