"""Silent failures in network namespaces: a link that goes away with no FIN or RST.

Three real ``meshd`` daemons in three namespaces joined pairwise by veth links
(A-B, A-X, B-X).  The A-X path is cut silently, either by taking the link down
(``ip link set ... down``) or by ``iptables -j DROP`` inside X's namespace (every
packet to and from A's address on that link, so not even X's RST gets out).  A and
X must each find the other dead by heartbeat, within heartbeat + timeout, while B
-- which still reaches both -- keeps both, whatever A and X report.

Needs root (and ``iptables`` for the DROP cut); namespaces and links are created
here and always removed; traffic only flows inside them.
"""

import time

import pytest

from tests.harness.meshnodes import (
    Cluster,
    Namespaces,
    can_netns,
    full_mesh,
    have_iptables,
    in_netns,
    ip,
    wait_for,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HEARTBEAT_S, TIMEOUT_S = 0.5, 1.5
A_ON_AX = "10.77.1.1"  # A's address on the A-X link


@pytest.fixture
def triangle():
    """({a, b, x: namespace}, the A-X link's device in A)."""
    why = can_netns()
    if why:
        pytest.skip(why)
    lab = Namespaces()
    try:
        ns = {n: lab.add(n) for n in "abx"}
        lab.link(ns["a"], "10.77.3.1/24", ns["b"], "10.77.3.2/24")
        ax_dev, _ = lab.link(ns["a"], f"{A_ON_AX}/24", ns["x"], "10.77.1.2/24")
        lab.link(ns["b"], "10.77.2.1/24", ns["x"], "10.77.2.2/24")
        print("namespaces:", ", ".join(lab.names))
        yield ns, ax_dev
    finally:
        lab.close()


@pytest.fixture
def cluster(tmp_path, triangle):
    c = Cluster(tmp_path, heartbeat_s=HEARTBEAT_S, heartbeat_timeout_s=TIMEOUT_S,
                verify_timeout_s=0.5, rejoin_s=30)
    yield c
    c.stop_all()  # before the namespaces go (this fixture is torn down first)


def _cut_link_down(ns, ax_dev):
    ip("-n", ns["a"], "link", "set", ax_dev, "down")


def _cut_iptables_drop(ns, ax_dev):
    if not have_iptables():
        pytest.skip("needs iptables (Debian package iptables)")
    in_netns(ns["x"], "iptables", "-A", "INPUT", "-s", A_ON_AX, "-j", "DROP")
    in_netns(ns["x"], "iptables", "-A", "OUTPUT", "-d", A_ON_AX, "-j", "DROP")


@pytest.mark.parametrize("cut", [_cut_link_down, _cut_iptables_drop], ids=["link-down", "iptables-drop"])
def test_silent_cut_is_detected_and_a_third_node_keeps_both(cluster, triangle, cut):
    ns, ax_dev = triangle
    a = cluster.add("a", listen="0.0.0.0:7842", netns=ns["a"]).start()
    b = cluster.add("b", listen="0.0.0.0:7842", netns=ns["b"])
    x = cluster.add("x", listen="0.0.0.0:7842", netns=ns["x"])
    wait_for(lambda: a.mesh_id(), 30, "a up", nodes=[a])
    b.start(join=[a.token()])
    x.start(join=[a.token()])
    nodes = [a, b, x]
    wait_for(lambda: full_mesh(nodes), 20, "full mesh over the triangle", nodes=nodes)
    aid, bid, xid = a.node_id, b.node_id, x.node_id

    t0 = time.monotonic()
    cut(ns, ax_dev)  # silent: no FIN, no RST
    wait_for(lambda: xid not in a.peer_ids() and aid not in x.peer_ids(), 10,
             "a and x find each other dead", nodes=nodes)
    took = time.monotonic() - t0
    print(f"silent cut ({cut.__name__}) detected by both ends in {took:.2f} s "
          f"(heartbeat {HEARTBEAT_S} s + timeout {TIMEOUT_S} s)")
    assert took < HEARTBEAT_S + TIMEOUT_S + 1.0

    wait_for(lambda: "answers us" in b.log_text(), 5, "b verified a report and kept the node")
    time.sleep(2 * (HEARTBEAT_S + TIMEOUT_S))  # let any wrong removal happen
    assert b.peer_ids() == {aid, xid}
    assert f"({xid}) down" not in b.log_text() and f"({aid}) down" not in b.log_text()
    assert a.peer_ids() == {bid} and x.peer_ids() == {bid}
    for n in nodes:
        assert {p["state"] for p in n.status_now()["peers"]} == {"alive"}, n.name
