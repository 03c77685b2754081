#!/usr/bin/env python3
"""Soak: mixed traffic through one real meshd for a long time, with periodic faults.

One ``meshd`` serves a model whose llama-server is the fast fake backend
(``tests/harness/fakebackend.py``; ``--real``: the real llama-server with
Gemma).  ``--clients`` workers send requests back to back for ``--duration-s``
(default 30 minutes), each picking at random: a stream (1 to 2,000 chunks), a
plain answer, a client that stops reading in the middle of a long stream for
longer than ``[api] client_stall_timeout_s`` (meshd must cut it and the
backend's stream with it), or a client that disconnects after the first event.

Every ``--fault-every-s`` the backend meshd supervises gets, in turn: SIGSTOP
for longer than the liveness checks allow (meshd must find it hung and restart
it), kill -9 (the supervisor restarts it), and a short SIGSTOP/SIGCONT it
survives.  Only meshd's own child is signalled, found by its parent PID.

meshd's RSS and open descriptors are sampled every ``--sample-s``; growth is
reported twice: between the first and last minute of traffic (medians of the
samples), and between quiet moments before and after (no request in flight,
idle pooled connections expired), where the figure must stay under 10 %.
Every request's outcome is counted: answered, a clean error (an
OpenAI-shaped error answer, or an SSE ``error`` event in a stream), or
unclean (a connection cut without either, or no answer within
``--request-timeout-s``): those are printed with the time since the last fault.

    python bench/soak.py                          # 30 minutes, fake backend
    python bench/soak.py --duration-s 600 --fault-every-s 30
    python bench/soak.py --real --clients 8 --duration-s 600

Only 127.0.0.1 is dialled; every process is started here or by the meshd
started here and ended by its PID; every loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import find_llama_bin_dir, find_model  # noqa: E402
from tests.harness.daemon import Meshd, children_of, fake_llama_bin_dir, pid_alive  # noqa: E402
from tests.harness.loadgen import Client, chat_request, raise_nofile, sample  # noqa: E402

STALL_TIMEOUT_S = 5.0  # [api] client_stall_timeout_s for the run: the stalls outlast it


def backend_pid(node: Meshd) -> int | None:
    """The model's llama-server (or fake): meshd's live child (the pdeathsig wrapper
    execs it, so the child's PID is the backend's)."""
    kids = [pid for pid, _ in children_of(node.pid) if pid_alive(pid)]
    return kids[0] if kids else None


def signal_child(node: Meshd, pid: int, sig: int) -> bool:
    """Signal ``pid`` only while it is still meshd's child (a PID is never reused
    behind our back)."""
    if pid in (p for p, _ in children_of(node.pid)) and pid_alive(pid):
        os.kill(pid, sig)
        return True
    return False


class Soak:
    def __init__(self, args, node: Meshd, model: str):
        self.args = args
        self.node = node
        self.model = model
        self.end = 0.0
        self.outcomes: Counter[str] = Counter()
        self.unclean: list[str] = []
        self.last_fault = ("none", 0.0)
        self.faults: Counter[str] = Counter()
        self.in_flight = 0
        self.samples: list[tuple[float, int, int, int]] = []  # (t, rss_kb, fds, in flight)
        self.rng = random.Random(args.seed)

    # -- traffic -------------------------------------------------------------------

    def pick(self) -> tuple[str, Client]:
        r, real = self.rng.random(), self.args.real
        sizes = (1, 8, 32) if real else (1, 10, 50, 200, 2000)
        extra = ', "temperature": 0.5, "ignore_eos": true' if real else ""
        if r < 0.5:
            n = self.rng.choice(sizes)
            return "stream", Client(
                chat_request(self.model, stream=True, max_tokens=n, extra=extra)
            )
        if r < 0.75:
            n = self.rng.choice(sizes)
            return "plain", Client(
                chat_request(self.model, stream=False, max_tokens=n, extra=extra)
            )
        if r < 0.85:
            n = 256 if real else 20000  # long enough to fill the socket buffers
            return "stall", Client(
                chat_request(self.model, stream=True, max_tokens=n, extra=extra),
                behaviour="stall",
                stall_s=STALL_TIMEOUT_S + 3,
            )
        return "drop", Client(
            chat_request(self.model, stream=True, max_tokens=50, extra=extra), behaviour="drop"
        )

    async def one(self, kind: str, c: Client) -> None:
        loop = asyncio.get_running_loop()
        c.finished = loop.create_future()
        c.t0 = time.perf_counter()
        self.in_flight += 1
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: c, "127.0.0.1", self.node.api_port), 30
            )
            await asyncio.wait_for(asyncio.shield(c.finished), self.args.request_timeout_s)
        except (TimeoutError, OSError) as e:
            c.error = c.error or f"{type(e).__name__}: {e}"
            if c._transport is not None:
                c._transport.abort()
        finally:
            self.in_flight -= 1
        outcome = self.judge(kind, c)
        self.outcomes[f"{kind} {outcome}"] += 1
        if outcome != "ok":
            # a client that got an error waits a little, as a real one would: a
            # backend being restarted does not turn the run into an error loop
            await asyncio.sleep(0.5)

    def judge(self, kind: str, c: Client) -> str:
        said_error = b'"error"' in c.body or b'"error"' in c.last
        if kind in ("stall", "drop"):
            # misbehaving on purpose: only a connection that never got an answer counts
            if c.status == 200 or (c.status and b'"error"' in c.body):
                return "ok"
        elif not c.errored() and not said_error:
            return "ok"
        if c.status and c.status != 200 and b'"error"' in c.body:
            return "clean error"
        if c.status == 200 and said_error and c.complete:
            return "clean error"  # an SSE error event, then the stream's end
        fault, at = self.last_fault
        self.unclean.append(
            f"{kind}: status {c.status}, events {c.events}, complete "
            f"{c.complete}, error {c.error!r}, {time.monotonic() - at:.1f} s "
            f"after {fault}; body tail {c.last[-160:]!r}"
        )
        return "UNCLEAN"

    async def worker(self) -> None:
        while time.monotonic() < self.end:
            kind, c = self.pick()
            await self.one(kind, c)

    # -- faults and samples ----------------------------------------------------------

    async def faults_loop(self) -> None:
        cycle = ("stop-long", "kill", "stop-short")
        i = 0
        while time.monotonic() + self.args.fault_every_s < self.end:
            await asyncio.sleep(self.args.fault_every_s)
            pid = backend_pid(self.node)
            if pid is None:
                continue  # being restarted: the next round
            fault = cycle[i % len(cycle)]
            i += 1
            self.last_fault = (fault, time.monotonic())
            self.faults[fault] += 1
            if fault == "kill":
                signal_child(self.node, pid, signal.SIGKILL)
            else:
                signal_child(self.node, pid, signal.SIGSTOP)
                await asyncio.sleep(self.args.stop_long_s if fault == "stop-long" else 1.0)
                signal_child(self.node, pid, signal.SIGCONT)  # if not restarted meanwhile

    async def sampler(self, t0: float) -> None:
        while time.monotonic() < self.end:
            s = sample(self.node.pid)
            self.samples.append((time.monotonic() - t0, s.rss_kb, s.fds, self.in_flight))
            await asyncio.sleep(self.args.sample_s)

    async def run(self) -> None:
        t0 = time.monotonic()
        self.end = t0 + self.args.duration_s
        await asyncio.gather(
            self.sampler(t0), self.faults_loop(), *(self.worker() for _ in range(self.args.clients))
        )


def quiet_sample(node: Meshd, timeout_s: float = 30.0):
    """A sample once the node is idle: idle pooled connections expire within seconds, so
    wait (bounded) for the descriptor count to stop falling."""
    from meshd.serving.proxy import IDLE_TIMEOUT_S

    time.sleep(IDLE_TIMEOUT_S + 1)
    deadline = time.monotonic() + timeout_s
    last = sample(node.pid)
    while time.monotonic() < deadline:
        time.sleep(2)
        now = sample(node.pid)
        if now.fds >= last.fds:
            return now
        last = now
    return last


def warm_up(node: Meshd, model: str, real: bool) -> None:
    req = chat_request(model, stream=True, max_tokens=4)

    async def go() -> None:
        clients = [Client(req) for _ in range(8)]
        from tests.harness.loadgen import run_clients

        await run_clients(node.api_port, clients, timeout_s=120)

    for _ in range(3 if real else 10):
        asyncio.run(go())


def growth(a: float, b: float) -> str:
    return f"{(b - a) / a:+.1%}" if a else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--clients", type=int, default=32, help="concurrent workers")
    parser.add_argument("--fault-every-s", type=float, default=60.0)
    parser.add_argument(
        "--stop-long-s",
        type=float,
        default=12.0,
        help="the long SIGSTOP: longer than live_interval_s x live_misses",
    )
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--request-timeout-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--real", action="store_true", help="the real llama-server and Gemma")
    args = parser.parse_args()
    print(
        f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
        f"descriptor limit {raise_nofile()}; duration {args.duration_s:g} s, "
        f"{args.clients} clients, a fault every {args.fault_every_s:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="meshd-soak-") as d:
        base = Path(d)
        if args.real:
            bin_dir, gguf = find_llama_bin_dir(), find_model()
            if not bin_dir or not gguf:
                raise SystemExit(
                    "no llama.cpp build or model: set MESHD_LLAMA_BIN_DIR and MESHD_TEST_MODEL"
                )
            model_name, model = "gemma", base / "gemma.gguf"
            os.symlink(gguf, model)
        else:
            from tests.harness.localhub import gguf_bytes

            model_name, model = "fake", base / "fake.gguf"
            model.write_bytes(gguf_bytes(name="fake"))
            bin_dir = fake_llama_bin_dir(base, "--chunk-delay-ms", "2", "--first-delay-ms", "0")
        node = Meshd(
            base / "node",
            {
                "llama": {
                    "bin_dir": bin_dir,
                    "ctx_size": 4096,
                    "restart_min_s": 1.0,
                    "restart_max_s": 4.0,
                    "live_interval_s": 1.0,
                    "live_misses": 3,
                    "health_timeout_s": 1.0,
                },
                "api": {"client_stall_timeout_s": STALL_TIMEOUT_S},
                "log": {"level": "info"},
                "policy": {"plugins_dir": ""},
            },
        )
        node.start("--model", str(model))
        try:
            node.wait_model_warm(model_name, timeout=300)
            warm_up(node, model_name, args.real)
            before = quiet_sample(node)
            soak = Soak(args, node, model_name)
            t0 = time.monotonic()
            asyncio.run(soak.run())
            wall = time.monotonic() - t0
            if node.proc.poll() is not None:
                print(f"meshd EXITED ({node.proc.returncode})")
                return 1
            node.wait_model_warm(model_name, timeout=120)  # restarted after the last fault
            after = quiet_sample(node)
            print_report(soak, before, after, wall)
            restarts = node.log().count("restarting")
            print(f"  meshd log lines with 'restarting': {restarts}")
            return (
                1
                if soak.unclean
                or (after.rss_kb - before.rss_kb) / before.rss_kb > 0.10
                or after.fds > before.fds * 1.10 + 2
                else 0
            )
        finally:
            node.stop()


def print_report(soak: Soak, before, after, wall: float) -> None:
    total = sum(soak.outcomes.values())
    print(
        f"\nran {wall:.0f} s: {total} requests ({total / wall:.1f}/s); faults "
        + ", ".join(f"{k} x{v}" for k, v in sorted(soak.faults.items()))
    )
    for key, n in sorted(soak.outcomes.items()):
        print(f"  {key:24s} {n}")
    print(f"  unclean outcomes: {len(soak.unclean)}")
    for line in soak.unclean[:10]:
        print(f"    {line}")
    s = soak.samples
    minute = max(1, int(60 / soak.args.sample_s))
    first, last = s[:minute], s[-minute:]
    rss0, rss1 = (statistics.median(x[1] for x in w) for w in (first, last))
    fd0, fd1 = (statistics.median(x[2] for x in w) for w in (first, last))
    print(
        f"  during traffic (median of the first vs the last minute's samples, every "
        f"{soak.args.sample_s:g} s, {len(s)} samples): RSS {rss0 / 1024:.1f} -> "
        f"{rss1 / 1024:.1f} MiB ({growth(rss0, rss1)}), max {max(x[1] for x in s) / 1024:.1f}; "
        f"descriptors {fd0:g} -> {fd1:g} ({growth(fd0, fd1)}), max {max(x[2] for x in s)}"
    )
    print(
        f"  quiet, before vs after: RSS {before.rss_kb / 1024:.1f} -> {after.rss_kb / 1024:.1f} "
        f"MiB ({growth(before.rss_kb, after.rss_kb)}); descriptors {before.fds} -> {after.fds} "
        f"({growth(before.fds, after.fds)}); meshd CPU {after.cpu_s - before.cpu_s:.0f} s"
    )
    step = max(1, len(s) // 12)
    print(
        "  samples (s, RSS MiB, descriptors, requests in flight): "
        + "; ".join(f"{t:.0f} {r / 1024:.1f} {f} {n}" for t, r, f, n in s[::step])
    )


if __name__ == "__main__":
    raise SystemExit(main())
