"""Mesh failure-detection, leave, idle-traffic and lossy-network figures, with real
``meshd`` daemons (no model to serve) at the default ``[mesh]`` timing.

    python3 bench/mesh_detect.py                      # everything (lossy: 10 minutes, root)
    python3 bench/mesh_detect.py --quick              # shorter idle windows, 2-minute lossy run
    python3 bench/mesh_detect.py --only lossy --minutes 10
    python3 bench/mesh_detect.py --only kill,stop,leave,idle --json

Figures (a table, or JSON with --json):

- kill: ``kill -9`` one of N=5 on loopback: time until the first and until every
  other node has removed it (the kernel closes its sockets: a FIN arrives);
- stop: ``SIGSTOP`` one of N=5 (silent: only the heartbeat finds it;
  heartbeat_s=2, heartbeat_timeout_s=6);
- leave: SIGTERM one of N=5: time until all four others have removed it;
- idle: control-plane bytes per node per minute in an idle mesh of N=5 and N=20:
  TCP payload (TLS records) from ``ss -tin`` over a window, plus an estimate with
  52 bytes of IPv4+TCP header per segment; and the daemons' memory;
- lossy (root, ``ip netns``, ``iptables``): N=5 nodes, each in its own namespace,
  all peer traffic through ``bench/delay_relay.py`` (``--delay-ms`` each way,
  default 100) and ``iptables -m statistic --mode random --probability LOSS -j DROP``
  on every node's link (default 1 %); counts false deaths (a live peer removed,
  anywhere) over ``--minutes``.

Nodes are state read through each daemon's control socket (``meshctl status --json``'s
answer); every process started here is stopped by its PID, and every namespace removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.meshnodes import (  # noqa: E402
    Cluster,
    Namespaces,
    can_netns,
    full_mesh,
    have_iptables,
    in_netns,
    ip,
    wait_for,
)

DEFAULTS = dict(heartbeat_s=2.0, heartbeat_timeout_s=6.0, rejoin_s=60.0, verify_timeout_s=2.0,
                connect_timeout_s=5.0)


def start_mesh(base: Path, n: int) -> tuple[Cluster, list]:
    """N nodes, each joining with a token from the first (a star: quick to form)."""
    cluster = Cluster(base, **DEFAULTS)
    try:
        nodes = cluster.start_chain(n, token_from=lambda ns: ns[0], timeout_s=60)
        wait_for(lambda: full_mesh(nodes), 30 + 2 * n, "full mesh", interval_s=0.2)
    except BaseException:
        cluster.stop_all(log_lines=0)
        raise
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
        time.sleep(0.01)
    if len(seen) < len(others):
        raise TimeoutError(f"not every node removed {victim.name} within {timeout_s} s")
    return sorted(seen.values())


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else 0.0


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


def detection(base: Path, parts: set[str]) -> dict:
    out = {}
    if "kill" in parts:
        cluster, nodes = start_mesh(base / "kill", 5)
        try:
            t = removal_times(nodes[-1], nodes[:-1], nodes[-1].kill, 20)
            out["kill9_s"] = {"first": t[0], "all": t[-1], "each": t}
        finally:
            cluster.stop_all(log_lines=0)
    if "stop" in parts:
        cluster, nodes = start_mesh(base / "stop", 5)
        try:
            victim = nodes[-1]
            t = removal_times(victim, nodes[:-1], lambda: victim.signal(signal.SIGSTOP), 30)
            out["sigstop_s"] = {"first": t[0], "all": t[-1], "each": t}
            victim.signal(signal.SIGCONT)
        finally:
            cluster.stop_all(log_lines=0)
    if "leave" in parts:
        cluster, nodes = start_mesh(base / "leave", 5)
        try:
            t = removal_times(nodes[2], nodes[:2] + nodes[3:],
                              lambda: nodes[2].signal(signal.SIGTERM), 10)
            out["leave_s"] = {"first": t[0], "all": t[-1], "median": statistics.median(t),
                              "each": t}
        finally:
            cluster.stop_all(log_lines=0)
    return out


def idle_bytes(base: Path, n: int, window_s: float) -> dict:
    cluster, nodes = start_mesh(base, n)
    try:
        ports = {int(nd.listen.rsplit(":", 1)[1]) for nd in nodes}
        time.sleep(3)  # let joins settle
        b0, s0 = tcp_totals(ports)
        time.sleep(window_s)
        b1, s1 = tcp_totals(ports)
        assert full_mesh(nodes), "the mesh changed during the idle window"
        rss = [rss_mb(nd.pid) for nd in nodes]
        per_node_min = (b1 - b0) / n * 60 / window_s
        ip_per_node_min = ((b1 - b0) + 52 * (s1 - s0)) / n * 60 / window_s
        return {
            "n": n,
            "window_s": window_s,
            "tls_bytes_per_node_per_min": round(per_node_min),
            "ip_bytes_per_node_per_min_est": round(ip_per_node_min),
            "tls_bytes_per_s_per_peer": round(per_node_min / 60 / (n - 1), 1),
            "ip_bytes_per_s_per_peer_est": round(ip_per_node_min / 60 / (n - 1), 1),
            "rss_mb_per_node": round(statistics.mean(rss), 1),
            "rss_mb_total": round(sum(rss)),
        }
    finally:
        cluster.stop_all(log_lines=0)


# -- the lossy run ---------------------------------------------------------------------------------


def lossy(base: Path, n: int, minutes: float, delay_ms: float, loss: float) -> dict:
    """N nodes in namespaces around a hub namespace that runs one delaying relay per
    node; random loss on every node's link.  Returns the false-death counts."""
    why = can_netns() or (None if have_iptables() else "needs iptables")
    if why:
        return {"skipped": why}
    lab = Namespaces()
    relay = None
    cluster = Cluster(base, **DEFAULTS)
    try:
        hub = lab.add("hub")
        routes, spaces = [], []
        for i in range(1, n + 1):
            ns = lab.add(f"n{i}")
            _, dev = lab.link(hub, f"10.78.{i}.1/24", ns, f"10.78.{i}.2/24")
            ip("-n", ns, "route", "add", "default", "via", f"10.78.{i}.1")
            in_netns(ns, "iptables", "-A", "INPUT", "-i", dev)  # counts every packet
            in_netns(ns, "iptables", "-A", "INPUT", "-i", dev, "-m", "statistic", "--mode",
                     "random", "--probability", str(loss), "-j", "DROP")
            routes.append(f"10.78.{i}.1:7842=10.78.{i}.2:7842")
            spaces.append(ns)
        relay = subprocess.Popen(
            ["ip", "netns", "exec", hub, sys.executable, str(ROOT / "bench/delay_relay.py"),
             "--delay-ms", str(delay_ms), *routes], stdout=subprocess.PIPE, text=True)
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError("the relay did not start")
        print(f"relay pid {relay.pid} in {hub}: {delay_ms:g} ms each way; loss {loss:.1%} "
              f"on every node's link", file=sys.stderr)
        nodes = []
        for i, ns in enumerate(spaces, 1):
            node = cluster.add(f"n{i}", listen="0.0.0.0:7842", netns=ns,
                               advertise=[f"10.78.{i}.1:7842"])  # the relay's address
            node.start(join=[nodes[0].token()] if nodes else [])
            wait_for(lambda node=node: node.mesh_id(), 60, f"{node.name} joined", nodes=[node],
                     interval_s=0.1)
            nodes.append(node)
        wait_for(lambda: full_mesh(nodes), 60, "full mesh through the relay", nodes=nodes,
                 interval_s=0.2)
        marks = [len(nd.log_text()) for nd in nodes]
        ids = {nd.node_id for nd in nodes}
        print(f"full mesh of {n}; running {minutes:g} min", file=sys.stderr)
        t0 = time.monotonic()
        polls = short_views = 0
        rtts: list[float] = []
        while time.monotonic() - t0 < minutes * 60:
            time.sleep(2.0)
            for nd in nodes:
                st = nd.status_now()
                polls += 1
                if st is None:
                    raise RuntimeError(f"{nd.name} stopped answering:\n{nd.log_text()[-2000:]}")
                if {p["node_id"] for p in st["peers"]} != ids - {nd.node_id}:
                    short_views += 1
                rtts += [p["rtt_ms"] for p in st["peers"] if p.get("rtt_ms") is not None]
        logs = [nd.log_text()[m:] for nd, m in zip(nodes, marks, strict=True)]
        seen = dropped = 0
        for ns in spaces:
            counts = input_counters(ns)
            seen, dropped = seen + counts[0], dropped + counts[1]
        count = lambda pat: sum(len(re.findall(pat, text)) for text in logs)  # noqa: E731
        return {
            "n": n, "minutes": minutes, "delay_ms_each_way": delay_ms, "loss": loss,
            "false_deaths": count(r"INFO meshd\.mesh: peer \S+ down:"),
            "false_leaves": count(r"peer \S+ left the mesh"),
            "suspicions_refuted_by_verifier": count(r"was reported dead but answers us"),
            "packets_in": seen, "packets_dropped": dropped,
            "status_polls": polls, "polls_missing_a_peer": short_views,
            "rtt_ms_median": round(statistics.median(rtts), 1) if rtts else None,
            "rtt_ms_max": round(max(rtts), 1) if rtts else None,
        }
    finally:
        cluster.stop_all(log_lines=0)
        if relay is not None:
            relay.terminate()
            relay.wait(10)
        lab.close()


def input_counters(ns: str) -> tuple[int, int]:
    """(packets counted, packets dropped) by the INPUT rules set up in ``ns``."""
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-L", "INPUT", "-v", "-x", "-n"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    seen = sum(int(r[0]) for r in rows if r[2] != "DROP")
    dropped = sum(int(r[0]) for r in rows if r[2] == "DROP")
    return seen, dropped


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="20 s idle windows and a 2-minute lossy run")
    parser.add_argument("--only", default="kill,stop,leave,idle,lossy",
                        help="comma-separated parts: kill,stop,leave,idle,lossy")
    parser.add_argument("--minutes", type=float, help="length of the lossy run (default 10)")
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    window = 20.0 if args.quick else 60.0
    minutes = args.minutes if args.minutes is not None else (2.0 if args.quick else 10.0)
    results: dict = {"settings": DEFAULTS}
    # what the helpers print (daemons started, ...) goes to stderr; the figures to stdout
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp, \
            contextlib.redirect_stdout(sys.stderr):
        base = Path(tmp)
        if parts & {"kill", "stop", "leave"}:
            results.update(detection(base / "detect", parts))
        if "idle" in parts:
            results["idle"] = [idle_bytes(base / "idle5", 5, window),
                               idle_bytes(base / "idle20", 20, window)]
        if "lossy" in parts:
            results["lossy"] = lossy(base / "lossy", 5, minutes, args.delay_ms, args.loss)

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"settings: heartbeat_s={DEFAULTS['heartbeat_s']} "
          f"heartbeat_timeout_s={DEFAULTS['heartbeat_timeout_s']} "
          f"verify_timeout_s={DEFAULTS['verify_timeout_s']} (the defaults); real meshd daemons")
    goals = {"kill9_s": (1.0, 2.0), "sigstop_s": (10.0, 12.0), "leave_s": (0.5, 0.5)}
    for key, label in (("kill9_s", "kill -9, N=5, loopback"), ("sigstop_s", "SIGSTOP, N=5, loopback"),
                       ("leave_s", "clean leave (SIGTERM), N=5")):
        if key in results:
            r, (first, every) = results[key], goals[key]
            print(f"{label:30s} first node {r['first']:.3f} s (goal {first:g} s: "
                  f"{first / r['first']:.1f}x margin), every node {r['all']:.3f} s "
                  f"(goal {every:g} s: {every / r['all']:.1f}x margin)")
    if "idle" in results:
        for r in results["idle"]:
            print(f"idle N={r['n']:<3d} per node per minute: {r['tls_bytes_per_node_per_min']} B TLS "
                  f"(~{r['ip_bytes_per_node_per_min_est']} B with IP/TCP headers); per peer "
                  f"{r['tls_bytes_per_s_per_peer']} B/s TLS (~{r['ip_bytes_per_s_per_peer_est']} B/s "
                  f"IP, goal < 200); RSS {r['rss_mb_per_node']} MB per daemon, {r['rss_mb_total']} MB "
                  f"in all")
        small, big = results["idle"]
        ratio = big["ip_bytes_per_node_per_min_est"] / max(1, small["ip_bytes_per_node_per_min_est"])
        linear = (big["n"] - 1) / (small["n"] - 1)
        print(f"idle per node, N={big['n']} / N={small['n']}: {ratio:.2f}x "
              f"(linear in peers would be {linear:.2f}x)")
    if "lossy" in results:
        r = results["lossy"]
        if "skipped" in r:
            print(f"lossy run: skipped ({r['skipped']})")
        else:
            print(f"lossy run, N={r['n']}, {r['minutes']:g} min, {r['loss']:.0%} loss, "
                  f"+{r['delay_ms_each_way']:g} ms each way: {r['false_deaths']} false deaths "
                  f"(goal 0), {r['false_leaves']} false leaves, "
                  f"{r['suspicions_refuted_by_verifier']} reports refuted by a verifier, "
                  f"{r['polls_missing_a_peer']}/{r['status_polls']} status polls missing a peer; "
                  f"{r['packets_dropped']}/{r['packets_in']} packets dropped; "
                  f"RTT median {r['rtt_ms_median']} ms, max {r['rtt_ms_max']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
