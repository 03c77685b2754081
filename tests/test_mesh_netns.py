"""Silent failures in network namespaces: a link that goes away with no FIN or RST.

Three namespaces joined pairwise by veth links (A-B, A-X, B-X).  Taking the
A-X link down cuts only that pair, silently: A and X must each find the other
dead by heartbeat (within heartbeat + timeout), while B -- which still reaches
both -- must keep both, whatever A and X report.  Needs root; namespaces and
links are created here and removed at the end.
"""

import os
import subprocess
import time
import uuid

import pytest

from tests.meshnodes import Cluster, full_mesh, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HEARTBEAT_S, TIMEOUT_S = 0.5, 1.5


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _can_netns() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"mt{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
        ip("netns", "del", name)
        return True
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


@pytest.fixture
def triangle():
    """{name: namespace} for a, b, x, and the A-X link's name in A."""
    if not _can_netns():
        pytest.skip("needs root and ip netns")
    tag = uuid.uuid4().hex[:5]
    ns = {n: f"mesh{tag}{n}" for n in "abx"}
    links = [("a", "b", 3), ("a", "x", 1), ("b", "x", 2)]
    try:
        for name in ns.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        for left, right, subnet in links:
            lname, rname = f"v{tag}{left}{right}", f"v{tag}{right}{left}"
            ip("link", "add", lname, "netns", ns[left], "type", "veth", "peer", "name", rname,
               "netns", ns[right])
            for side, dev, host in ((left, lname, 1), (right, rname, 2)):
                ip("-n", ns[side], "addr", "add", f"10.77.{subnet}.{host}/24", "dev", dev)
                ip("-n", ns[side], "link", "set", dev, "up")
        print("namespaces:", ", ".join(ns.values()))
        yield ns, f"v{tag}ax"
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_silent_link_cut_is_detected_and_a_third_node_keeps_both(tmp_path, triangle):
    ns, ax_link = triangle
    cluster = Cluster(tmp_path, heartbeat_s=HEARTBEAT_S, heartbeat_timeout_s=TIMEOUT_S,
                      verify_timeout_s=0.5, rejoin_s=30)
    try:
        a = cluster.add("a", listen="0.0.0.0:7842", netns=ns["a"])
        b = cluster.add("b", listen="0.0.0.0:7842", netns=ns["b"])
        x = cluster.add("x", listen="0.0.0.0:7842", netns=ns["x"])
        a.start()
        wait_for(lambda: a.status(), 10, "a up")
        b.start(join=[a.token()])
        wait_for(lambda: (b.status() or {}).get("mesh_id"), 10, "b joined")
        x.start(join=[a.token()])
        nodes = [a, b, x]
        wait_for(lambda: full_mesh(nodes), 15, "full mesh over the triangle")
        aid, bid, xid = a.node_id, b.node_id, x.node_id

        t0 = time.monotonic()
        ip("-n", ns["a"], "link", "set", ax_link, "down")  # silent: no FIN, no RST
        wait_for(lambda: xid not in a.peer_ids() and aid not in x.peer_ids(), 10,
                 "a and x find each other dead")
        took = time.monotonic() - t0
        print(f"silent cut detected by both ends in {took:.2f} s "
              f"(heartbeat {HEARTBEAT_S} s + timeout {TIMEOUT_S} s)")
        assert took < HEARTBEAT_S + TIMEOUT_S + 1.0

        wait_for(lambda: "answers us" in b.log_text(), 5, "b verified a report and kept the node")
        time.sleep(2 * (HEARTBEAT_S + TIMEOUT_S))  # let any wrong removal happen
        assert b.peer_ids() == {aid, xid}
        assert f"peer {xid} down" not in b.log_text() and f"peer {aid} down" not in b.log_text()
        assert a.peer_ids() == {bid} and x.peer_ids() == {bid}
    finally:
        cluster.stop_all()
