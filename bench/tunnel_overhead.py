#!/usr/bin/env python3
"""What a tunnel hop costs: a model on node B asked through node A's API vs B's own API.

Two real meshd daemons on loopback (B serves the model, A serves nothing and
joins B's mesh); every request through A crosses an mTLS tunnel to B's
llama-server.  The baseline is the same request sent straight to B's API in
the same run, alternated, so the ratio isolates the tunnel (both paths go
through one meshd API proxy).

Part A, fast fake backend (tests/harness/fakebackend.py stands in for llama-server
through a ``[llama] bin_dir`` holding a wrapper): chunks/s and requests/s
through the tunnel vs direct, at concurrency 1 and 8, and the added median
time to first chunk.

Part B, real llama-server with the real model: N streamed chat completions
each way, alternated: tokens/s ratio (issue 4's goal >= 0.97, issue 13's >= 0.98)
and added median time to first token (goal <= 5 ms).

    python bench/tunnel_overhead.py                    # both parts, a few minutes
    python bench/tunnel_overhead.py --part a --rounds 3
    python bench/tunnel_overhead.py --before /tmp/before   # an older tree's tunnel, same run
    python bench/tunnel_overhead.py --part a --pin   # daemons and nginx on one CPU (part A only)
    python bench/tunnel_overhead.py --part a --chunks 100 --chunk-delay-ms 5 --streams-1 4 \
        --streams-8 32 --rounds 2          # chunks one at a time, like tokens: CPU per chunk

nginx in front of B's API runs in both parts, alternated with the others: a
mature proxy as the extra hop, for scale (its own CPU is not counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from nginx_baseline import Nginx  # noqa: E402
from proxy_overhead import (  # noqa: E402
    add_pin_option,
    alternate_many,
    children,
    cpu_seconds,
    free_port,
    measure,
    pin_tasks,
    pinned,
    stream_request,
    wait_port,
)

from tests.conftest import find_llama_bin_dir, find_model  # noqa: E402
from tests.harness import daemon  # noqa: E402
from tests.harness.daemon import Meshd, fake_llama_bin_dir  # noqa: E402


def pair(base: Path, bin_dir: str, gguf: str, model: str, extra_args: list[str],
         tree: Path | None = None) -> tuple[Meshd, Meshd]:
    """B serves ``model`` (a link to ``gguf``); A, with nothing to serve, joins B's mesh.

    ``tree``: run both daemons from that source tree (``--before``), not this one.
    """
    models = base / "b-models"
    models.mkdir(parents=True)
    os.symlink(gguf, models / f"{model}.gguf")
    llama = {"bin_dir": bin_dir, "ctx_size": 2048, "extra_args": extra_args}
    saved = daemon.ROOT
    if tree is not None:
        daemon.ROOT = tree  # the harness starts meshd and meshctl with cwd=ROOT
    try:
        b = Meshd(base / "b", {"node": {"models_dir": str(models)}, "models": {"serve": [model]},
                               "llama": llama, "log": {"level": "info"}}, name="b")
        b.start()
        b.wait_model_warm(model, timeout=180)
        token = b.ctl("token").stdout.strip().splitlines()[-1]
        a = Meshd(base / "a", {"mesh": {"join": [token]}, "llama": llama,
                               "log": {"level": "info"}}, name="a")
        a.start()
        a.wait_for(lambda n: any(m["name"] == model and m["state"] == "warm"
                                 for m in n.status()["models"]), f"{model} seen from A", 60)
    finally:
        daemon.ROOT = saved
    return a, b


class Setup:
    """What one run compares: B's API straight (``direct``), A's API through the tunnel
    (``tunnel``), nginx in front of B's API (``nginx``: a mature proxy as the extra
    hop instead of the tunnel), and with ``--before`` the tunnel of daemons run from
    an older tree (``before``), all alternated."""

    def __init__(self, args, base: Path, bin_dir: str, gguf: str, model: str,
                 extra_args: list[str], cpus: set[int] | None = None):
        self.pairs: list[tuple[Meshd, Meshd]] = []
        self.nginx: Nginx | None = None
        try:
            a, b = pair(base / "now", bin_dir, gguf, model, extra_args)
            self.pairs.append((a, b))
            self.ways: list[tuple[str, int, list[int]]] = [
                ("direct", b.api_port, [b.pid]), ("tunnel", a.api_port, [a.pid, b.pid])]
            if args.before is not None:
                ba, bb = pair(base / "before", bin_dir, gguf, model, extra_args,
                              tree=args.before.resolve())
                self.pairs.append((ba, bb))
                # its own direct baseline too: each pair's B then serves the same
                # traffic (with only "direct" on the first B, the first pair did
                # twice the work and ran 5-20 % slower than a copy of itself)
                self.ways += [("before", ba.api_port, [ba.pid, bb.pid]),
                              ("b-direct", bb.api_port, [bb.pid])]
            if cpus:  # the daemons on the proxies' CPU, their backends with the load generator
                others = os.sched_getaffinity(0)
                for pa, pb in self.pairs:
                    for backend in children(pb.pid):
                        pin_tasks(backend, others)
                    pin_tasks(pa.pid, cpus)
                    pin_tasks(pb.pid, cpus)
            self.nginx = Nginx(b.api_port, free_port(), cpus)
            self.nginx.start(wait_port)
            self.ways.append(("nginx", self.nginx.port, [b.pid]))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for a, b in self.pairs:
            a.stop()
            b.stop()


def part_a(args, base: Path) -> None:
    gguf = find_model()
    if not gguf:
        print("Part A skipped: no model file to stand in as a GGUF")
        return
    setup = Setup(args, base / "a", fake_llama_bin_dir(base), gguf, "fake",
                  ["--chunks", str(args.chunks), "--chunk-delay-ms", str(args.chunk_delay_ms)],
                  cpus=args.proxy_cpus)
    try:
        request = stream_request("/v1/chat/completions", "fake", None)
        expect = args.chunks + 1
        spaced = f", {args.chunk_delay_ms:g} ms apart" if args.chunk_delay_ms else ""
        print(f"\nPart A: fake backend, {args.chunks} chunks per stream{spaced}, {args.rounds} rounds "
              "alternated, medians; 'direct' = B's API, 'tunnel' = A's API -> tunnel -> B, "
              "'nginx' = nginx -> B's API" + (", 'before' = the tunnel of --before's daemons"
                                              if args.before else ""))
        for concurrency, total in ((1, args.streams_1), (8, args.streams_8)):
            for _, port, _ in setup.ways:  # warm up: open the tunnels
                measure(port, request, concurrency, concurrency)
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in setup.ways}
            cpu: dict[str, list[float]] = {name: [] for name, _, _ in setup.ways}
            for _ in range(args.rounds):
                for name, port, pids in setup.ways:
                    c0 = sum(map(cpu_seconds, pids))
                    r = measure(port, request, total, concurrency)
                    cpu[name].append((sum(map(cpu_seconds, pids)) - c0) / (r["events"] / 1000))
                    runs[name].append(r)
            for name, rs in runs.items():
                bad = [s.events for r in rs for s in r["streams"] if s.events != expect]
                if bad:  # a lost or duplicated event is a bug, not noise
                    raise SystemExit(f"{name}: {len(bad)} stream(s) with the wrong number of "
                                     f"events (expected {expect}): {bad[:5]}")
            rate = {n: statistics.median(r["rate"] for r in rs) for n, rs in runs.items()}
            req = {n: statistics.median(len(r["streams"]) / r["wall"] for r in rs)
                   for n, rs in runs.items()}
            for name, _, _ in setup.ways:
                what = {"direct": "B's CPU", "b-direct": "B's CPU",
                        "nginx": "B's CPU (nginx not counted)"}.get(name, "A+B CPU")
                # the older tree's tunnel against its own B's API
                base = "b-direct" if name in ("before", "b-direct") else "direct"
                print(f"  concurrency {concurrency}: {name:8s} {rate[name]:8.0f} chunks/s "
                      f"(÷ {base} {rate[name] / rate[base]:.3f}), requests/s {req[name]:6.1f}; "
                      f"{what} {statistics.median(cpu[name]) * 1000:.1f} ms per 1,000 chunks")
        short = stream_request("/v1/chat/completions", "fake", 1)
        firsts: dict[str, list[float]] = {name: [] for name, _, _ in setup.ways}
        for _ in range(args.rounds):
            for name, port, _ in setup.ways:
                firsts[name] += [s.t_first - s.t0
                                 for s in measure(port, short, args.streams_1, 1)["streams"]]
        med = {n: statistics.median(v) for n, v in firsts.items()}
        def added(n: str) -> float:
            base = "b-direct" if n == "before" else "direct"
            return (med[n] - med[base]) * 1000

        print(f"  time to first chunk (1-chunk streams): direct {med['direct'] * 1000:.2f} ms; added "
              + ", ".join(f"{n} {added(n):+.2f} ms"
                          for n, _, _ in setup.ways if n not in ("direct", "b-direct")))
    finally:
        setup.stop()


def part_b(args, base: Path) -> None:
    bin_dir, gguf = find_llama_bin_dir(), find_model()
    if not bin_dir or not gguf:
        print("\nPart B skipped: no llama.cpp build or model (run scripts/build-llama.sh)")
        return
    setup = Setup(args, base / "b", bin_dir, gguf, "gemma", [])
    try:
        request = stream_request("/v1/chat/completions", "gemma", args.max_tokens,
                                 ', "temperature": 0, "seed": 1, "ignore_eos": true')
        for _, port, _ in setup.ways:
            measure(port, request, 1, 1)
        results = alternate_many([port for _, port, _ in setup.ways], request, args.real_requests)
        by_name = {name: r for (name, _, _), r in zip(setup.ways, results, strict=True)}
        d_tps, d_t = by_name["direct"]
        print(f"\nPart B: llama-server + {Path(gguf).name} on B, {args.real_requests} streamed "
              f"requests each way alternated, max_tokens {args.max_tokens}, medians")
        print(f"  direct (B's API): {d_tps:.1f} tokens/s, time to first token {d_t * 1000:.2f} ms")
        for name, (tps, ttft) in by_name.items():
            if name in ("direct", "b-direct"):
                continue
            base_tps, base_t = by_name["b-direct" if name == "before" else "direct"]
            print(f"  {name:7s}: {tps:.1f} tokens/s, ratio {tps / base_tps:.3f}; time to first "
                  f"token added {(ttft - base_t) * 1000:+.2f} ms")
    finally:
        setup.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams-1", type=int, default=50)
    parser.add_argument("--streams-8", type=int, default=64)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="part A: the fake backend pauses this long before each chunk, so each "
                             "crosses alone, as a real model's tokens do (0: as fast as it can)")
    parser.add_argument("--real-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="also run a pair of daemons from this source tree (an older commit: "
                             "git archive COMMIT | tar -x -C /tmp/before), alternated in the same run")
    add_pin_option(parser, "both pairs of daemons and nginx")
    args = parser.parse_args()
    args.proxy_cpus = pinned(parser, args)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp:
        if args.part in ("a", "all"):
            part_a(args, Path(tmp))
        if args.part in ("b", "all"):
            part_b(args, Path(tmp))
    print(f"\n(took {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
