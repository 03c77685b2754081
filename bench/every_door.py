#!/usr/bin/env python3
"""A well-behaved client's latency while every door is attacked, against its quiet latency.

Issue 12's bound: "a well-behaved client's request answered within 2x its quiet
latency during the attacks".  ``tests/test_every_door.py`` (CI) asserts that the
well-behaved client is answered, correctly, within a generous deadline during
each attack; a latency ratio is no CI assertion on a shared 2-core machine, so it
is measured here, with the same daemon, attacks and client
(``tests/harness/doors.py``).

One daemon (A: API, console, control socket, mesh port; the fast fake backend)
and its peer B are started.  The well-behaved client asks the three HTTP doors in
turn (a chat completion on the API, ``/api/status`` on the console, ``/status`` on
the control socket), one request at a time.  For each attack: ``--quiet`` requests
with no attack (the quiet latency, just before: the shared machine's load
drifts), then the same client for ``--seconds`` while the attack runs from forked
child processes (so that the attackers do not share the client's interpreter
lock).  Printed per attack and door: the
median and p95 latency and their ratio to the quiet ones; and RSS and descriptors.

    python3 bench/every_door.py                 # about 1-2 minutes
    python3 bench/every_door.py --quiet 600 --rounds 3

The attacks (each a loop bounded in count and time, from several threads so that
they overlap the client's requests): random bytes, malformed and nested bodies,
declared-huge bodies, header floods, slowloris heads, 1,000 idle keep-alives,
idle connections on every port, clients that never read, random bytes and
foreign-certificate HELLOs on the mesh port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import find_model  # noqa: E402
from tests.harness import doors as d  # noqa: E402


def quiet(doors: d.Doors, n: int) -> list[d.Served]:
    asks = [("api", doors.ask_api), ("console", doors.ask_console), ("control", doors.ask_control)]
    return [d.timed(*asks[i % 3]) for i in range(n)]


def stats(served: list[d.Served], door: str) -> tuple[float, float, int]:
    lat = sorted(s.latency_s for s in served if s.door == door and s.ok)
    if not lat:
        return float("nan"), float("nan"), 0
    p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
    return statistics.median(lat), p95, len(lat)


# -- attacks: each runs until ``stop`` is set or its own bound ------------------------------


FLOOD_RATE = 0.0  # attacks per second per flood worker; 0: as fast as it can (--flood-rate)


def loop(stop: Any, seconds: float, fn: Callable[[], None], count: int = 10_000) -> None:
    end = time.monotonic() + seconds
    for _ in range(count):
        if stop.is_set() or time.monotonic() > end:
            return
        start = time.monotonic()
        with contextlib.suppress(OSError):
            fn()
        if FLOOD_RATE > 0:
            stop.wait(max(0.0, 1 / FLOOD_RATE - (time.monotonic() - start)))


def http_junk(doors: d.Doors, door: str) -> Callable[[], None]:
    path, headers = doors.post_target(door)
    payloads = [
        d.random_junk(1500),
        d.head("POST", path, headers, b"[" * 50_000),
        d.head("POST", path, headers, b"{nope"),
        d.head("POST", path, {**headers, "Content-Length": str(1 << 30)}),
        d.head("GET", "/health", [("Host", "x"), *((f"X-{i}", "v") for i in range(1000))]),
        d.head("GET", "/v1/models?" + "q" * 100_000, {"Host": "x"}),
    ]
    state = {"i": 0}

    def one() -> None:
        state["i"] += 1
        d.exchange(
            doors.address(door), payloads[state["i"] % len(payloads)], deadline_s=3, half_close=True
        )

    return one


def slowloris(doors: d.Doors, stop: threading.Event, seconds: float) -> None:
    socks = []
    try:
        for door in ("api", "console", "control"):
            for _ in range(30):
                s = d.connect(doors.address(door))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                s.setblocking(False)
                socks.append(s)
        end = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < end:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"a")
            stop.wait(0.5)
    finally:
        for s in socks:
            s.close()


def keep_alives(doors: d.Doors, stop: threading.Event, seconds: float) -> None:
    socks = []
    try:
        for _ in range(1000):
            if stop.is_set():
                break
            s = d.connect(doors.api, timeout_s=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
        stop.wait(seconds)
    finally:
        for s in socks:
            s.close()


def idle_everywhere(doors: d.Doors, stop: threading.Event, seconds: float) -> None:
    socks = []
    try:
        for address in (doors.api, doors.console, doors.control, ("127.0.0.1", doors.mesh_port)):
            socks += [d.connect(address) for _ in range(200)]
        stop.wait(seconds)
    finally:
        for s in socks:
            s.close()


def never_reading(doors: d.Doors, stop: threading.Event, seconds: float) -> None:
    path, headers = doors.post_target("api")
    body = json.dumps(
        {
            "model": d.MODEL,
            "stream": True,
            "max_tokens": 50_000,
            "messages": [{"role": "user", "content": "go"}],
        }
    ).encode()
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        socks = []
        for _ in range(10):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(doors.api)
            s.sendall(d.head("POST", path, {**headers, "Connection": "keep-alive"}, body))
            socks.append(s)
        stop.wait(d.STALL_TIMEOUT_S + 1)
        for s in socks:
            s.close()


def mesh_strangers(doors: d.Doors) -> Callable[[], None]:
    mesh_id = doors.mesh_id

    def one() -> None:
        d.exchange(
            ("127.0.0.1", doors.mesh_port), d.random_junk(500), deadline_s=3, half_close=True
        )
        stranger = d.Stranger(doors.mesh_port, d.foreign_tls_context())
        try:
            if stranger.handshake():
                stranger.send(d.hello(stranger, mesh_id=mesh_id, key=os.urandom(32)))
                stranger.frames_until_closed(3)
        finally:
            stranger.close()

    return one


def run_attack(
    doors: d.Doors, name: str, workers: list[Callable[[Any], None]], seconds: float, quiet_n: int
) -> dict:
    """The quiet latency just before (the machine's load drifts), then the attack from
    child processes (forked: the attackers must not share this process's GIL with the
    well-behaved client, or the client's own latency would be measured)."""
    before = quiet(doors, quiet_n)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    procs = [ctx.Process(target=w, args=(stop,), daemon=True) for w in workers]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let the attack build up
    client = d.WellBehaved(doors, pause_s=0.0).start()
    peak = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, d.fd_count(doors.a.pid))
        time.sleep(0.1)
    served = client.stop()
    stop.set()
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return {
        "name": name,
        "quiet": before,
        "served": served,
        "fds_peak": peak,
        "rss": d.rss_bytes(doors.a.pid),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quiet", type=int, default=150, help="quiet requests just before each attack"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="client time per attack")
    parser.add_argument(
        "--flood-workers",
        type=int,
        default=1,
        help="attacker processes per door for the floods (each as fast as it can)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=0.0,
        help="attacks per second per flood worker (0: as fast as it can)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the attack list this often")
    parser.add_argument(
        "--no-penalties", action="store_true",
        help="node A with [mesh] penalty_failures = 0: every stranger on the mesh port gets "
             "its TLS handshake, however many failed before it (the figures before penalties)",
    )
    args = parser.parse_args()
    global FLOOD_RATE
    FLOOD_RATE = args.flood_rate
    gguf = find_model()
    if gguf is None:
        print("no model file (MESHD_TEST_MODEL): the daemon serves its name", file=sys.stderr)
        return 2
    d.raise_fd_limit(4096)
    base = Path(tempfile.mkdtemp(prefix="every-door-"))
    doors = d.Doors(base, gguf, penalties=not args.no_penalties)
    doors.start()
    try:
        s = args.seconds
        attacks = [
            (
                "random, malformed, huge, nested, floods x 3 doors",
                [
                    lambda st, door=door: loop(st, s + 1, http_junk(doors, door))
                    for door in ("api", "console", "control")
                    for _ in range(args.flood_workers)
                ],
            ),
            ("slowloris, 90 connections", [lambda st: slowloris(doors, st, s + 1)]),
            ("1,000 idle keep-alives", [lambda st: keep_alives(doors, st, s + 1)]),
            ("200 idle connections on every port", [lambda st: idle_everywhere(doors, st, s + 1)]),
            ("10 clients that never read, renewed", [lambda st: never_reading(doors, st, s + 1)]),
            (
                "mesh: random bytes, foreign HELLOs",
                [
                    lambda st: loop(st, s + 1, mesh_strangers(doors))
                    for _ in range(args.flood_workers)
                ],
            ),
        ]
        results = []
        for _ in range(args.rounds):
            for name, workers in attacks:
                results.append(run_attack(doors, name, workers, s, args.quiet))
        print(f"baseline: RSS {doors.baseline.rss / 2**20:.1f} MiB, {doors.baseline.fds} fds")
        print(
            f"{'attack':40} {'door':8} {'quiet ms':>8} {'n':>5} {'median ms':>9} {'ratio':>6} "
            f"{'p95 ms':>7} {'ratio':>6} {'failed':>6} {'fds peak':>8} {'RSS MiB':>7}"
        )
        worst = 0.0
        for r in results:
            failed = sum(1 for x in r["served"] if not x.ok)
            for door in ("api", "console", "control"):
                m, p, n = stats(r["served"], door)
                qm, qp, _ = stats(r["quiet"], door)
                worst = max(worst, m / qm)
                print(
                    f"{r['name'][:40]:40} {door:8} {qm * 1000:8.2f} {n:5d} {m * 1000:9.2f} "
                    f"{m / qm:6.2f} {p * 1000:7.2f} {p / qp:6.2f} {failed:6d} "
                    f"{r['fds_peak']:8d} {r['rss'] / 2**20:7.1f}"
                )
        print(
            f"worst median ratio: {worst:.2f} (bound: 2.0); RSS growth "
            f"{(d.rss_bytes(doors.a.pid) - doors.baseline.rss) / 2**20:.1f} MiB, fds now "
            f"{d.fd_count(doors.a.pid)} (baseline {doors.baseline.fds}); load average "
            f"{os.getloadavg()[0]:.1f}"
        )
    finally:
        doors.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
