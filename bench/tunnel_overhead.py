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
each way, alternated: tokens/s ratio (goal >= 0.97) and added median time to
first token (goal <= 5 ms).

    python bench/tunnel_overhead.py                    # both parts, a few minutes
    python bench/tunnel_overhead.py --part a --rounds 3
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

from proxy_overhead import alternate, cpu_seconds, measure, stream_request  # noqa: E402

from tests.conftest import find_llama_bin_dir, find_model  # noqa: E402
from tests.harness.daemon import Meshd, fake_llama_bin_dir  # noqa: E402


def pair(base: Path, bin_dir: str, gguf: str, model: str, extra_args: list[str]) -> tuple[Meshd, Meshd]:
    """B serves ``model`` (a link to ``gguf``); A, with nothing to serve, joins B's mesh."""
    models = base / "b-models"
    models.mkdir(parents=True)
    os.symlink(gguf, models / f"{model}.gguf")
    llama = {"bin_dir": bin_dir, "ctx_size": 2048, "extra_args": extra_args}
    b = Meshd(base / "b", {"node": {"models_dir": str(models)}, "models": {"serve": [model]},
                           "llama": llama, "log": {"level": "info"}}, name="b")
    b.start()
    b.wait_model_warm(model, timeout=180)
    token = b.ctl("token").stdout.strip().splitlines()[-1]
    a = Meshd(base / "a", {"mesh": {"join": [token]}, "llama": llama, "log": {"level": "info"}},
              name="a")
    a.start()
    a.wait_for(lambda n: any(m["name"] == model and m["state"] == "warm"
                             for m in n.status()["models"]), f"{model} seen from A", 60)
    return a, b


def part_a(args, base: Path) -> None:
    gguf = find_model()
    if not gguf:
        print("Part A skipped: no model file to stand in as a GGUF")
        return
    a, b = pair(base / "a", fake_llama_bin_dir(base), gguf, "fake", ["--chunks", str(args.chunks)])
    try:
        request = stream_request("/v1/chat/completions", "fake", None)
        expect = args.chunks + 1
        print(f"\nPart A: fake backend, {args.chunks} chunks per stream, {args.rounds} rounds "
              "alternated, medians; 'direct' = B's API, 'tunnel' = A's API -> tunnel -> B")
        for concurrency, total in ((1, args.streams_1), (8, args.streams_8)):
            measure(a.api_port, request, concurrency, concurrency)  # warm up: open the tunnels
            measure(b.api_port, request, concurrency, concurrency)
            direct, tunnel, cpu = [], [], []
            for _ in range(args.rounds):
                direct.append(measure(b.api_port, request, total, concurrency))
                c0 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
                r = measure(a.api_port, request, total, concurrency)
                cpu.append((cpu_seconds(a.pid) + cpu_seconds(b.pid) - c0) / (r["events"] / 1000))
                tunnel.append(r)
            for path, runs in (("direct", direct), ("tunnel", tunnel)):
                bad = [s.events for r in runs for s in r["streams"] if s.events != expect]
                if bad:  # a lost or duplicated event is a bug, not noise
                    raise SystemExit(f"{path}: {len(bad)} stream(s) with the wrong number of "
                                     f"events (expected {expect}): {bad[:5]}")
            d_rate = statistics.median(r["rate"] for r in direct)
            t_rate = statistics.median(r["rate"] for r in tunnel)
            d_req = statistics.median(len(r["streams"]) / r["wall"] for r in direct)
            t_req = statistics.median(len(r["streams"]) / r["wall"] for r in tunnel)
            print(f"  concurrency {concurrency}: chunks/s direct {d_rate:8.0f}, tunnel {t_rate:8.0f} "
                  f"(ratio {t_rate / d_rate:.3f}); requests/s direct {d_req:6.1f}, tunnel "
                  f"{t_req:6.1f}; A+B CPU via tunnel {statistics.median(cpu) * 1000:.1f} ms "
                  "per 1,000 chunks")
        short = stream_request("/v1/chat/completions", "fake", 1)
        d_s, t_s = [], []
        for _ in range(args.rounds):
            d_s += [s.t_first - s.t0 for s in measure(b.api_port, short, args.streams_1, 1)["streams"]]
            t_s += [s.t_first - s.t0 for s in measure(a.api_port, short, args.streams_1, 1)["streams"]]
        d_t, t_t = statistics.median(d_s), statistics.median(t_s)
        print(f"  time to first chunk (1-chunk streams): direct {d_t * 1000:.2f} ms, tunnel "
              f"{t_t * 1000:.2f} ms, added {(t_t - d_t) * 1000:.2f} ms")
    finally:
        a.stop()
        b.stop()


def part_b(args, base: Path) -> None:
    bin_dir, gguf = find_llama_bin_dir(), find_model()
    if not bin_dir or not gguf:
        print("\nPart B skipped: no llama.cpp build or model (run scripts/build-llama.sh)")
        return
    a, b = pair(base / "b", bin_dir, gguf, "gemma", [])
    try:
        request = stream_request("/v1/chat/completions", "gemma", args.max_tokens,
                                 ', "temperature": 0, "seed": 1, "ignore_eos": true')
        measure(a.api_port, request, 1, 1)
        measure(b.api_port, request, 1, 1)
        d_tps, t_tps, d_t, t_t = alternate(b.api_port, a.api_port, request, args.real_requests)
        print(f"\nPart B: llama-server + {Path(gguf).name} on B, {args.real_requests} streamed "
              f"requests each way alternated, max_tokens {args.max_tokens}, medians")
        print(f"  tokens/s: B's API {d_tps:.1f}, A's API through the tunnel {t_tps:.1f}, "
              f"ratio {t_tps / d_tps:.3f} (goal >= 0.97)")
        print(f"  time to first token: direct {d_t * 1000:.2f} ms, tunnel {t_t * 1000:.2f} ms, "
              f"added {(t_t - d_t) * 1000:.2f} ms (goal <= 5 ms)")
    finally:
        a.stop()
        b.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams-1", type=int, default=50)
    parser.add_argument("--streams-8", type=int, default=64)
    parser.add_argument("--real-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
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
