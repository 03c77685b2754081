#!/usr/bin/env python3
"""Load: many concurrent streams through one real meshd node (issue 12's proof).

Fake mode (the default): one ``meshd`` process serving a model whose
llama-server is the fast fake backend (``tests/harness/fakebackend.py``, run by
meshd's own supervisor); N concurrent streamed chat completions (default 1,000)
are opened against its API, each on its own connection, and the same N against
a second copy of the fake backend directly, in the same invocation, so the
figures come as a ratio to a baseline.  Reported per target: p50/p99 time to
first chunk (from the connect call to the first SSE event), the whole run's
wall time, the peak number of streams open at once and the errors (any
non-200, short or broken stream: must be 0); for meshd also its RSS before,
peak and after, its open descriptors before/peak/after and its CPU seconds.

``--ramp-s`` spreads the connects evenly over that many seconds (0: all at
once, a burst); ``--chunk-delay-ms`` makes each stream last (chunks x delay),
so with a ramp shorter than a stream every stream is still open at once (the
peak concurrency printed says so).

Real mode (``--real``): one meshd serving the real Gemma model
(``MESHD_TEST_MODEL``) with the real llama-server (``MESHD_LLAMA_BIN_DIR``),
64 concurrent streams (``--streams``); llama-server has a few slots, so most
wait in its queue: every one must be answered, none may fail or trip
``[api] first_byte_timeout_s`` (left at its default).  Reports the time to
first token distribution.

    python bench/load.py                                   # 1,000 streams, burst and ramped
    python bench/load.py --streams 1000 --ramp-s 0 --chunks 20
    python bench/load.py --real --streams 64 --max-tokens 16
    python bench/load.py --real --hogs 6        # on a machine overloaded by other work

``--hogs N`` starts N CPU-bound processes (busy loops, niced like nothing else)
for the real run, as an overloaded shared machine is: the case where a busy
llama-server's ``/health`` went unanswered and the liveness check restarted it.

The descriptor limit of this process is raised to its hard limit; meshd and
the fake backends inherit it.  Only 127.0.0.1 is dialled; every process is
started here and ended by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import find_llama_bin_dir, find_model, free_port  # noqa: E402
from tests.harness.daemon import Meshd, fake_llama_bin_dir, port_open  # noqa: E402
from tests.harness.loadgen import (  # noqa: E402
    Client,
    chat_request,
    median,
    peak_concurrency,
    percentile,
    raise_nofile,
    run_clients,
    sample,
    tcp_counters,
)


class Sampler:
    """Polls a process's RSS and descriptors every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid = pid
        self.interval_s = interval_s
        self.peak_rss_kb = 0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                s = sample(self.pid)
            except OSError:
                return
            self.peak_rss_kb = max(self.peak_rss_kb, s.rss_kb)
            self.peak_fds = max(self.peak_fds, s.fds)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


LAST_TCP: dict[str, int] = {}


def run(port: int, clients: list[Client], ramp_s: float, timeout_s: float) -> tuple[float, float]:
    """Run the clients; returns (wall seconds, this process's CPU share of wall).  The
    kernel's listen-overflow counters over the run are left in ``LAST_TCP``."""
    k0 = tcp_counters()
    c0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(run_clients(port, clients, ramp_s=ramp_s, timeout_s=timeout_s))
    wall = time.perf_counter() - t0
    LAST_TCP.update({k: v - k0[k] for k, v in tcp_counters().items()})
    return wall, (time.process_time() - c0) / wall


def describe(
    name: str, clients: list[Client], wall: float, client_cpu: float, expect_events: int | None
) -> int:
    """Print one target's line; returns its number of errors."""
    bad = [
        c
        for c in clients
        if c.errored() or (expect_events is not None and c.events != expect_events)
    ]
    ttfc = [c.ttfc for c in clients]
    print(
        f"  {name:8s}: time to first chunk p50 {median(ttfc) * 1000:7.1f} ms, "
        f"p99 {percentile(ttfc, 99) * 1000:7.1f} ms, max {max(ttfc) * 1000:7.1f} ms; "
        f"wall {wall:6.2f} s; peak open {peak_concurrency(clients)}; errors {len(bad)}; "
        f"client CPU {client_cpu:.0%} of wall; listen overflows "
        f"{LAST_TCP.get('ListenOverflows', 0)}, SYN retransmits {LAST_TCP.get('TCPSynRetrans', 0)}"
    )
    for c in bad[:5]:
        print(
            f"      e.g. status {c.status}, events {c.events}, complete {c.complete}, "
            f"error {c.error!r}, body {c.body[:160]!r}"
        )
    return len(bad)


def start_fake(chunks: int, delay_ms: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "tests/harness/fakebackend.py",
            "--port",
            str(port),
            "--chunks",
            str(chunks),
            "--chunk-delay-ms",
            str(delay_ms),
            "--first-delay-ms",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not port_open(port, 30):
        proc.kill()
        raise SystemExit("the direct fake backend did not start")
    print(f"  started the direct fake backend pid {proc.pid} on 127.0.0.1:{port}", file=sys.stderr)
    return proc, port


def node_for(base: Path, model_path: Path, bin_dir: str, llama: dict | None = None) -> Meshd:
    return Meshd(
        base / "node",
        {
            "llama": {"bin_dir": bin_dir, **(llama or {})},
            "log": {"level": "info"},
            "policy": {"plugins_dir": ""},
            "models": {"min_free_gb": 0.0},
        },
    )


def fake_mode(args, base: Path) -> int:
    from tests.harness.localhub import gguf_bytes

    model = base / "fake.gguf"
    model.write_bytes(gguf_bytes(name="fake"))
    flags = [
        "--chunks",
        str(args.chunks),
        "--chunk-delay-ms",
        str(args.chunk_delay_ms),
        "--first-delay-ms",
        "0",
    ]
    node = node_for(base, model, fake_llama_bin_dir(base, *flags))
    direct, direct_port = start_fake(args.chunks, args.chunk_delay_ms)
    node.start("--model", str(model))
    errors = 0
    try:
        node.wait_model_warm("fake", timeout=120)
        request = chat_request("fake", stream=True)
        expect = args.chunks + 1  # the chunks and [DONE]
        # warm up both ways (imports, first connections)
        for port in (direct_port, node.api_port):
            run(port, [Client(request) for _ in range(20)], 0.0, 60)
        time.sleep(1)
        print(
            f"\n{args.streams} concurrent streams, {args.chunks} chunks each, "
            f"{args.chunk_delay_ms:g} ms before each but the first; fake backend; "
            f"descriptor limit {raise_nofile()}"
        )
        for ramp in args.ramp_s:
            for round_ in range(args.rounds):
                print(f" ramp {ramp:g} s, round {round_ + 1}:")
                clients = [Client(request) for _ in range(args.streams)]
                wall, cpu = run(direct_port, clients, ramp, args.timeout_s)
                errors += describe("direct", clients, wall, cpu, expect)
                time.sleep(1)
                before = sample(node.pid)
                clients = [Client(request) for _ in range(args.streams)]
                with Sampler(node.pid) as peak:
                    wall, cpu = run(node.api_port, clients, ramp, args.timeout_s)
                time.sleep(2)  # let closes settle
                after = sample(node.pid)
                errors += describe("meshd", clients, wall, cpu, expect)
                d_p99 = percentile([c.ttfc for c in clients], 99)
                print(
                    f"            RSS {before.rss_kb / 1024:.1f} MiB before, "
                    f"{peak.peak_rss_kb / 1024:.1f} peak, {after.rss_kb / 1024:.1f} after; "
                    f"descriptors {before.fds} before, {peak.peak_fds} peak, {after.fds} after; "
                    f"CPU {after.cpu_s - before.cpu_s:.2f} s "
                    f"({(after.cpu_s - before.cpu_s) / wall:.0%} of wall); p99 goal 250 ms: "
                    f"{'met' if d_p99 < 0.25 else 'NOT met'}"
                )
                time.sleep(1)
    finally:
        node.stop()
        direct.terminate()
        direct.wait(10)
    return errors


def real_mode(args, base: Path) -> int:
    bin_dir, gguf = find_llama_bin_dir(), find_model()
    if not bin_dir or not gguf:
        raise SystemExit(
            "no llama.cpp build or model: set MESHD_LLAMA_BIN_DIR and MESHD_TEST_MODEL"
        )
    model = base / "gemma.gguf"
    os.symlink(gguf, model)
    node = node_for(base, model, bin_dir, {"ctx_size": args.ctx_size, "extra_args": args.llama_arg})
    node.start("--model", str(model))
    errors = 0
    try:
        node.wait_model_warm("gemma", timeout=300)
        extra = ', "temperature": 0, "seed": 1, "ignore_eos": true'
        request = chat_request("gemma", stream=True, max_tokens=args.max_tokens, extra=extra)
        run(node.api_port, [Client(request)], 0.0, 120)  # warm up
        since = len(node.log())
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.hogs)]
        if hogs:
            print(f"\n{len(hogs)} CPU hogs running (pids {', '.join(str(h.pid) for h in hogs)})")
        print(
            f"\n{args.streams} concurrent streams to llama-server ({Path(gguf).name}, "
            f"ctx {args.ctx_size}, slots: llama.cpp's default) through meshd, "
            f"max_tokens {args.max_tokens}, ignore_eos; [api] first_byte_timeout_s default"
        )
        before = sample(node.pid)
        clients = [Client(request) for _ in range(args.streams)]
        try:
            with Sampler(node.pid) as peak:
                wall, cpu = run(node.api_port, clients, 0.0, args.timeout_s)
        finally:
            for h in hogs:
                h.kill()
                h.wait(10)
        after = sample(node.pid)
        expect = args.max_tokens + 1  # roughly: one event per token, and [DONE]
        errors += describe("meshd", clients, wall, cpu, None)
        short = [c.events for c in clients if c.events < expect]
        ttft = sorted(c.ttfc for c in clients)
        deciles = ", ".join(f"p{p} {percentile(ttft, p):.2f} s" for p in (10, 25, 50, 75, 90, 99))
        print(f"  time to first token: min {ttft[0]:.2f} s, {deciles}, max {ttft[-1]:.2f} s")
        print(f"  streams with fewer than {expect} events: {len(short)}")
        tripped = node.log()[since:].count("first_byte_timeout_s")
        print(f"  log lines naming first_byte_timeout_s during the run: {tripped}")
        print(
            f"  meshd RSS {before.rss_kb / 1024:.1f} MiB before, {peak.peak_rss_kb / 1024:.1f} "
            f"peak, {after.rss_kb / 1024:.1f} after; CPU {after.cpu_s - before.cpu_s:.2f} s"
        )
        errors += tripped
        said = [
            line
            for line in node.log()[since:].splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
        ]
        print(f"  meshd warnings and errors during the run: {len(said)}")
        for line in said[:8]:
            print(f"    {line[:200]}")
    finally:
        node.stop()
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real",
        action="store_true",
        help="the real llama-server and Gemma instead of the fake backend",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="concurrent streams (default 1000, or 64 with --real)",
    )
    parser.add_argument("--chunks", type=int, default=20, help="fake: SSE chunks per stream")
    parser.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=100.0,
        help="fake: pause before each chunk (a stream lasts chunks x this)",
    )
    parser.add_argument(
        "--ramp-s",
        type=float,
        nargs="+",
        default=[0.0, 1.0],
        help="fake: spread the connects over this long; several values run each",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hogs", type=int, default=0,
                        help="real: CPU-bound processes running beside it (an overloaded machine)")
    parser.add_argument("--max-tokens", type=int, default=16, help="real: tokens per stream")
    parser.add_argument("--ctx-size", type=int, default=4096, help="real: llama-server --ctx-size")
    parser.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        help="real: one more llama-server argument ([llama] extra_args), e.g. --llama-arg=-np",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=600.0,
        help="a stream still open after this long counts as an error",
    )
    args = parser.parse_args()
    if args.streams is None:
        args.streams = 64 if args.real else 1000
    print(
        f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
        f"python {sys.version.split()[0]}, descriptor limit {raise_nofile()}"
    )
    with tempfile.TemporaryDirectory(prefix="meshd-load-") as d:
        errors = real_mode(args, Path(d)) if args.real else fake_mode(args, Path(d))
    print(f"\nerrors in all: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
