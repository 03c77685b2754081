"""Mesh failure-detection and idle-traffic figures, with real processes on loopback.

    python3 bench/mesh_detect.py            # all figures, default [mesh] timing
    python3 bench/mesh_detect.py --quick    # shorter idle windows

Figures (printed as a table, and as JSON with --json):

- kill -9: time until every other node of N=5 has removed the victim (FIN from
  the kernel: the connection drops at once);
- SIGSTOP: time until every other node has removed a frozen node (no FIN: only
  the heartbeat finds it; defaults heartbeat_s=2, heartbeat_timeout_s=6);
- clean leave (SIGTERM): time until all of N=5 have removed the leaver;
- idle control-plane bytes per node per minute, N=5 and N=20: TCP payload
  (TLS records) from ``ss -tin`` over a window, and an IP-level estimate
  adding 52 bytes of IPv4+TCP(timestamps) header per segment.

Not measured here: the 10-minute run with 1 % loss and 100 ms delay.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.meshnodes import Cluster, full_mesh, wait_for  # noqa: E402

DEFAULTS = dict(heartbeat_s=2.0, heartbeat_timeout_s=6.0, rejoin_s=60.0, verify_timeout_s=2.0)


def start_mesh(base: Path, n: int, star: bool = True) -> tuple[Cluster, list]:
    cluster = Cluster(base, **DEFAULTS)
    nodes = cluster.start_chain(n, token_from=(lambda ns: ns[0]) if star else None, timeout_s=30)
    wait_for(lambda: full_mesh(nodes), 30 + n, "full mesh")
    return cluster, nodes


def removal_times(victim, others, action, timeout_s: float) -> list[float]:
    """Seconds from ``action()`` until each of ``others`` no longer lists the victim."""
    vid = victim.node_id
    seen: dict[str, float] = {}
    t0 = time.monotonic()
    action()
    deadline = t0 + timeout_s
    while len(seen) < len(others) and time.monotonic() < deadline:
        for o in others:
            if o.name not in seen and vid not in o.peer_ids():
                seen[o.name] = time.monotonic() - t0
        time.sleep(0.005)
    if len(seen) < len(others):
        raise TimeoutError(f"not every node removed {victim.name} within {timeout_s} s")
    return sorted(seen.values())


def tcp_totals(ports: set[int]) -> tuple[int, int]:
    """(payload bytes sent, segments sent) over established TCP sockets on ``ports``."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    total_bytes = total_segs = 0
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)", line)
        if not m or int(m.group(2)) not in ports and int(m.group(4)) not in ports:
            continue
        info = lines[i + 1] if i + 1 < len(lines) else ""
        b = re.search(r"bytes_sent:(\d+)", info)
        s = re.search(r"segs_out:(\d+)", info)
        total_bytes += int(b.group(1)) if b else 0
        total_segs += int(s.group(1)) if s else 0
    return total_bytes, total_segs


def idle_bytes(base: Path, n: int, window_s: float) -> dict:
    cluster, nodes = start_mesh(base, n)
    try:
        ports = {int(nd.status()["advertise"][0].rsplit(":", 1)[1]) for nd in nodes}
        time.sleep(3)  # let joins settle
        b0, s0 = tcp_totals(ports)
        time.sleep(window_s)
        b1, s1 = tcp_totals(ports)
        per_node_min = (b1 - b0) / n * 60 / window_s
        ip_per_node_min = ((b1 - b0) + 52 * (s1 - s0)) / n * 60 / window_s
        return {
            "n": n,
            "window_s": window_s,
            "tls_bytes_per_node_per_min": round(per_node_min),
            "ip_bytes_per_node_per_min_est": round(ip_per_node_min),
            "tls_bytes_per_s_per_peer": round(per_node_min / 60 / (n - 1), 1),
            "ip_bytes_per_s_per_peer_est": round(ip_per_node_min / 60 / (n - 1), 1),
        }
    finally:
        cluster.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    window = 20.0 if args.quick else 60.0
    results: dict = {"settings": DEFAULTS}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        base = Path(tmp)

        cluster, nodes = start_mesh(base / "kill", 5)
        try:
            t = removal_times(nodes[-1], nodes[:-1], lambda: nodes[-1].signal(signal.SIGKILL), 20)
            results["kill9_s"] = {"first": t[0], "all": t[-1]}
        finally:
            cluster.stop_all()

        cluster, nodes = start_mesh(base / "stop", 5)
        try:
            victim = nodes[-1]
            t = removal_times(victim, nodes[:-1], lambda: victim.signal(signal.SIGSTOP), 30)
            results["sigstop_s"] = {"first": t[0], "all": t[-1]}
            victim.signal(signal.SIGCONT)
        finally:
            cluster.stop_all()

        cluster, nodes = start_mesh(base / "leave", 5)
        try:
            t = removal_times(nodes[2], nodes[:2] + nodes[3:],
                              lambda: nodes[2].signal(signal.SIGTERM), 10)
            results["leave_s"] = {"first": t[0], "all": t[-1],
                                  "median": statistics.median(t)}
        finally:
            cluster.stop_all()

        results["idle"] = [idle_bytes(base / "idle5", 5, window),
                           idle_bytes(base / "idle20", 20, window)]

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"settings: heartbeat_s={DEFAULTS['heartbeat_s']} "
          f"heartbeat_timeout_s={DEFAULTS['heartbeat_timeout_s']} (defaults), loopback")
    for key, label in (("kill9_s", "kill -9, N=5"), ("sigstop_s", "SIGSTOP, N=5"),
                       ("leave_s", "clean leave (SIGTERM), N=5")):
        r = results[key]
        print(f"{label:32s} first node {r['first']:.3f} s, every node {r['all']:.3f} s")
    for r in results["idle"]:
        print(f"idle N={r['n']:<3d} per node per minute: {r['tls_bytes_per_node_per_min']} B TLS "
              f"(~{r['ip_bytes_per_node_per_min_est']} B with IP/TCP headers); per peer "
              f"{r['tls_bytes_per_s_per_peer']} B/s TLS (~{r['ip_bytes_per_s_per_peer_est']} B/s IP)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
