"""Per-source penalties on a real daemon's mesh port ([mesh] penalty_failures).

A stranger sends foreign-certificate HELLOs from 127.0.0.2 (any 127/8 address
reaches loopback, so the attacker has an address of its own): its first attempts
get the normal refusal, then its connections are closed before TLS; a stranger
from another address and the mesh's members are not affected.
"""

import os
import urllib.request

import pytest

from tests.harness import doors as d
from tests.harness.meshnodes import Cluster, full_mesh, wait_for

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"
FAILURES = 3


def _attempt(node, source: str) -> bool:
    """A foreign-certificate HELLO from ``source``: True when it got through TLS to the
    mesh's refusal, False when meshd closed the connection before TLS."""
    s = d.Stranger(node.mesh_port, d.foreign_tls_context(), source=source)
    try:
        if not s.handshake():
            return False
        s.send(d.hello(s, mesh_id="0123456789abcdef", key=os.urandom(32)))
        frames, closed = s.frames_until_closed(10)
        assert closed and d.close_code(frames) == "auth-failed", frames
        return True
    finally:
        s.close()


def _metric(node, name: str) -> float:
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {node.name}'s metrics")


def test_a_source_that_keeps_failing_is_refused_before_tls_and_nobody_else_is(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        n0 = cluster.add("n0", penalty_failures=FAILURES, penalty_s=300.0).start()
        wait_for(lambda: n0.mesh_id(), 30, "n0 up", nodes=[n0])
        n1 = cluster.add("n1").start(join=[n0.token()])
        wait_for(lambda: full_mesh([n0, n1]), 30, "n1 in n0's mesh", nodes=[n0, n1])

        for i in range(FAILURES):
            assert _attempt(n0, ATTACKER), f"attempt {i + 1} of {FAILURES} must reach the HELLO"
        # the last failure is counted when n0's side of the connection has closed: its
        # log line is the event to wait for, not a delay
        warning = f"refusing peer connections from {ATTACKER} before TLS"
        wait_for(lambda: warning in n0.log_text(), 10, "n0 penalised the attacker", nodes=[n0])
        for _ in range(3):
            assert not _attempt(n0, ATTACKER), "a source with no attempts left got to TLS"
        assert n0.log_text().count(warning) == 1, "one log line per time a source runs out"

        assert _attempt(n0, "127.0.0.1"), "another address is not penalised"
        n2 = cluster.add("n2").start(join=[n0.token()])
        wait_for(lambda: full_mesh([n0, n1, n2]), 30, "n2 joined", nodes=[n0, n1, n2])

        assert _metric(n0, "meshd_peer_refused_total") == 3
        assert _metric(n0, "meshd_peer_penalized_sources") >= 1
    finally:
        cluster.stop_all()
