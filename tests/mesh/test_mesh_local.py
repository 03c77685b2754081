"""Several real ``meshd`` daemons on loopback, each with its own state dir, ports and
control socket, and no model to serve.

Short heartbeats (0.5 s interval, 1.5 s timeout) keep the tests quick; every
process is stopped by PID at the end.  Durations are printed (run with -s) and
bounded generously: these are behaviours, the figures live in
``bench/mesh_detect.py``.
"""

import hashlib
import json
import signal
import time

import pytest

from meshd.mesh import tokens
from tests.harness.meshnodes import Cluster, full_mesh, wait_for

pytestmark = pytest.mark.timeout(120)

# the leave tests use the default heartbeat, so a removal well under one heartbeat
# cannot have come from the heartbeat
SLOW_HEARTBEAT = dict(heartbeat_s=2.0, heartbeat_timeout_s=6.0)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


@pytest.fixture
def slow_cluster(tmp_path):
    c = Cluster(tmp_path, **SLOW_HEARTBEAT)
    yield c
    c.stop_all()


def _retoken(text: str, **changes) -> str:
    """A token with fields changed and a valid checksum (a forged, not a damaged, token)."""
    t = tokens.decode(text)
    fields = {**t.__dict__, **changes}
    return tokens.encode(tokens.Token(**fields))


def _alive_everywhere(nodes) -> None:
    for n in nodes:
        assert {p["state"] for p in n.status_now()["peers"]} == {"alive"}, n.name


def test_mesh_forms_from_tokens_and_a_chain_converges(cluster):
    nodes = cluster.start_chain(3)  # n1 joins n0 with n0's token, n2 joins n1 with n1's
    late = cluster.add("late").start()  # founds a mesh of its own, then joins at run time
    wait_for(lambda: late.mesh_id(), 30, "late up", nodes=[late])
    token = nodes[-1].ctl("token").stdout.splitlines()[-1]  # meshctl token: last line
    late.ctl("join", token)  # the real meshctl join, at run time
    nodes.append(late)
    wait_for(lambda: full_mesh(nodes), 15, "every node lists every other", nodes=nodes)
    for n in nodes:  # the real meshctl, as an operator would ask
        st = n.status()
        assert st["mesh_id"] == nodes[0].mesh_id()
        others = {o.node_id for o in nodes} - {n.node_id}
        assert {p["node_id"] for p in st["peers"]} == others
        assert all(p["state"] == "alive" and p["role"] == "idle" for p in st["peers"])
        assert all(p["vram_bytes"] == 8 * 2**30 for p in st["peers"])  # [node] vram_gb = 8


def test_kill_9_is_noticed_by_every_other_node(cluster):
    nodes = cluster.start_chain(4)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    victim, others = nodes[-1], nodes[:-1]
    vid = victim.node_id
    t0 = time.monotonic()
    victim.kill()
    wait_for(lambda: all(vid not in n.peer_ids() for n in others), 10, "all remove the victim")
    took = time.monotonic() - t0
    print(f"kill -9 on loopback: every other node removed it within {took:.3f} s")
    assert took < 2.0  # the kernel closes its sockets: no heartbeat needed
    assert full_mesh(others)


def test_sigterm_leave_removes_the_node_at_once(slow_cluster):
    nodes = slow_cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    leaver, others = nodes[0], nodes[1:]
    lid = leaver.node_id
    t0 = time.monotonic()
    leaver.signal(signal.SIGTERM)
    wait_for(lambda: all(lid not in n.peer_ids() for n in others), 5, "all remove the leaver")
    took = time.monotonic() - t0
    print(f"SIGTERM leave: removed everywhere within {took:.3f} s (heartbeat 2 s)")
    assert took < 1.0
    assert leaver.wait_exit(10) == 0
    assert all(f"peer {leaver.name} ({lid}) left the mesh" in n.log_text() for n in others)


def test_meshctl_leave_removes_the_node_at_once(slow_cluster):
    nodes = slow_cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    leaver, others = nodes[1], [nodes[0], nodes[2]]
    lid = leaver.node_id
    t0 = time.monotonic()
    leaver.ctl("leave")  # the real meshctl: its own start-up is inside the bound
    wait_for(lambda: all(lid not in n.peer_ids() for n in others), 5, "all remove the leaver")
    took = time.monotonic() - t0
    print(f"meshctl leave: removed everywhere within {took:.3f} s of running meshctl")
    assert took < 1.0
    assert leaver.wait_exit(10) == 0
    assert all(f"peer {leaver.name} ({lid}) left the mesh" in n.log_text() for n in others)


# -- refused joins: each leaves the mesh as it was ------------------------------------------


def test_wrong_secret_is_refused_and_the_mesh_is_unchanged(cluster):
    nodes = cluster.start_chain(2)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    intruder = cluster.add("intruder")
    state = intruder.dir / "state"
    state.mkdir(mode=0o700)
    mesh_id = nodes[0].mesh_id()
    (state / "mesh.json").write_text(json.dumps({"mesh_id": mesh_id, "secret": "00" * 32}))
    (state / "peers.json").write_text(json.dumps({"bootstrap": [], "known": [
        {"node_id": nodes[0].node_id, "addrs": [nodes[0].listen]}]}))
    intruder.start()
    wait_for(lambda: "wrong proof of the mesh secret" in nodes[0].log_text(), 15,
             "refusal logged", nodes=[intruder])
    assert intruder.peer_ids() == set()
    assert full_mesh(nodes) and len(nodes[0].peer_ids()) == 1


def test_damaged_token_is_refused_before_connecting(cluster):
    from meshd.cli.meshd import EXIT_BAD_TOKEN

    (n0,) = cluster.start_chain(1)
    text = n0.token()
    joiner = cluster.add("joiner").start(join=[text[:-5]])
    assert joiner.wait_exit(15) == EXIT_BAD_TOKEN  # refused at start, never a mesh of its own
    assert "checksum" in joiner.log_text() or "cut short" in joiner.log_text()
    assert "created a new mesh" not in joiner.log_text()
    assert n0.peer_ids() == set()


def test_forged_token_key_is_refused_by_the_issuer(cluster):
    (n0,) = cluster.start_chain(1)
    forged = _retoken(n0.token(), key=b"f" * 32)
    joiner = cluster.add("joiner").start(join=[forged])
    wait_for(lambda: "wrong proof of the invite token key" in n0.log_text(), 15, "refusal",
             nodes=[joiner])
    wait_for(lambda: "cannot join" in joiner.log_text(), 10, "joiner says why")
    assert n0.peer_ids() == set() and joiner.mesh_id() is None


def test_different_certificate_than_the_token_pins_is_refused(cluster):
    (n0,) = cluster.start_chain(1)
    forged = _retoken(n0.token(), pin=hashlib.sha256(b"another key").digest())
    joiner = cluster.add("joiner").start(join=[forged])
    wait_for(lambda: "not the one the token pins" in joiner.log_text(), 15, "pin refusal",
             nodes=[joiner])
    assert n0.peer_ids() == set() and joiner.mesh_id() is None


def test_revoked_token_is_refused_with_that_reason(cluster):
    (n0,) = cluster.start_chain(1)
    out = n0.ctl("token").stdout.splitlines()
    token_id, text = out[0].split()[2], out[-1]
    n0.ctl("token", "--revoke", token_id)
    joiner = cluster.add("joiner").start(join=[text])
    wait_for(lambda: "was revoked" in joiner.log_text(), 15, "joiner told the token was revoked",
             nodes=[joiner])
    assert n0.peer_ids() == set()
    # it founded no mesh: it waits, and its status says why
    status = joiner.ctl("status").stdout
    mesh_line = next(line for line in status.splitlines() if line.startswith("mesh"))
    assert "waiting" in mesh_line and "revoked" in mesh_line, status


def test_one_use_token_cannot_be_used_twice(cluster):
    (n0,) = cluster.start_chain(1)
    text = n0.ctl("token", "--once").stdout.splitlines()[-1]
    first = cluster.add("first").start(join=[text])
    wait_for(lambda: first.mesh_id(), 15, "first joined", nodes=[first])
    second = cluster.add("second").start(join=[text])
    wait_for(lambda: "has been used" in second.log_text(), 15, "second told the token was used",
             nodes=[second])
    assert n0.peer_ids() == {first.node_id}


def test_unreachable_token_addresses_are_each_named(cluster):
    (n0,) = cluster.start_chain(1)
    text = _retoken(n0.token(), addrs=("127.0.0.1:9", "127.0.0.2:9"))
    joiner = cluster.add("joiner").start(join=[text])
    wait_for(lambda: "cannot join" in joiner.log_text(), 15, "joiner gives up", nodes=[joiner])
    line = next(ln for ln in joiner.log_text().splitlines() if "cannot join" in ln)
    assert "127.0.0.1:9 (connection refused)" in line and "127.0.0.2:9" in line


def test_token_carries_the_advertised_addresses(cluster):
    (n0,) = cluster.start_chain(1)
    t = tokens.decode(n0.token())
    assert list(t.addrs) == [n0.listen] and t.issuer == n0.node_id
    assert len(t.pin) == 32


# -- restarts and refutation ------------------------------------------------------------------


def test_restarted_node_rejoins_with_the_same_id_within_2_s(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    node = nodes[2]
    nid = node.node_id
    node.kill()
    wait_for(lambda: all(nid not in n.peer_ids() for n in nodes[:2]), 10, "removed")
    node.start()  # the same state dir, no token
    wait_for(lambda: full_mesh(nodes), 10, "back everywhere", nodes=nodes)
    took = time.monotonic() - node.started_at
    st = node.status_now()
    print(f"restart: rejoined everywhere {st['uptime_s']:.3f} s after the daemon started "
          f"({took:.3f} s after the process was spawned, Python start-up included)")
    assert st["node_id"] == nid
    assert st["uptime_s"] < 2.0  # read after the fact: an upper bound
    _alive_everywhere(nodes)


def test_node_wrongly_declared_dead_comes_back_everywhere(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 15, "full mesh", nodes=nodes)
    node = nodes[1]
    nid = node.node_id
    node.signal(signal.SIGSTOP)  # silent, not dead: its sockets stay open
    try:
        wait_for(lambda: all(nid not in n.peer_ids() for n in (nodes[0], nodes[2])), 10,
                 "declared dead")
    finally:
        node.signal(signal.SIGCONT)
    wait_for(lambda: full_mesh(nodes), 15, "it comes back everywhere", nodes=nodes)
    _alive_everywhere(nodes)
