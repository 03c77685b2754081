"""Several real mesh processes on loopback, each with its own state dir and port.

Short heartbeats (0.5 s interval, 1.5 s timeout) keep the tests quick; every
process is stopped by PID at the end.  Durations are printed (run with -s), and
bounded generously: these are behaviours, the figures live in bench/.
"""

import base64
import hashlib
import json
import signal
import time

import pytest

from meshd import tokens
from tests.meshnodes import Cluster, full_mesh, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def _retoken(text: str, **changes) -> str:
    """A token with fields changed and a valid checksum (a forged, not a damaged, token)."""
    t = tokens.decode(text)
    fields = {**t.__dict__, **changes}
    return tokens.encode(tokens.Token(**fields))


def test_mesh_forms_from_tokens_and_a_chain_converges(cluster):
    nodes = cluster.start_chain(4)  # n1 joins n0, n2 joins n1, n3 joins n2
    wait_for(lambda: full_mesh(nodes), 10, "every node lists every other")
    mesh_ids = {n.status()["mesh_id"] for n in nodes}
    assert len(mesh_ids) == 1
    for n in nodes:
        assert all(p["state"] == "alive" for p in n.status()["peers"])


def test_kill_9_is_noticed_by_every_other_node(cluster):
    nodes = cluster.start_chain(4)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    victim, others = nodes[-1], nodes[:-1]
    vid = victim.node_id
    t0 = time.monotonic()
    victim.signal(signal.SIGKILL)
    wait_for(lambda: all(vid not in n.peer_ids() for n in others), 10, "all remove the victim")
    took = time.monotonic() - t0
    print(f"kill -9 on loopback: every other node removed it within {took:.3f} s")
    assert took < 2.0
    assert full_mesh(others)


def test_sigterm_leave_removes_the_node_at_once(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    leaver, others = nodes[0], nodes[1:]
    lid = leaver.node_id
    t0 = time.monotonic()
    leaver.signal(signal.SIGTERM)
    wait_for(lambda: all(lid not in n.peer_ids() for n in others), 5, "all remove the leaver")
    took = time.monotonic() - t0
    print(f"SIGTERM leave: removed everywhere within {took:.3f} s")
    assert took < cluster.timing["heartbeat_s"]
    assert leaver.proc.wait(5) == 0
    assert all(f"peer {lid} left the mesh" in n.log_text() for n in others)


def test_leave_command_removes_the_node_at_once(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    leaver, others = nodes[1], [nodes[0], nodes[2]]
    lid = leaver.node_id
    t0 = time.monotonic()
    assert leaver.command({"cmd": "leave"}) == {"ok": {"leaving": True}}
    wait_for(lambda: all(lid not in n.peer_ids() for n in others), 5, "all remove the leaver")
    assert time.monotonic() - t0 < cluster.timing["heartbeat_s"]
    assert all(f"peer {lid} left the mesh" in n.log_text() for n in others)


def test_wrong_secret_is_refused_and_the_mesh_is_unchanged(cluster):
    nodes = cluster.start_chain(2)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    intruder = cluster.add("intruder")
    state = intruder.dir / "state"
    state.mkdir(mode=0o700)
    mesh_id = nodes[0].status()["mesh_id"]
    (state / "mesh.json").write_text(json.dumps({"mesh_id": mesh_id, "secret": "00" * 32}))
    (state / "peers.json").write_text(json.dumps({"bootstrap": [], "known": [
        {"node_id": nodes[0].node_id, "addrs": nodes[0].status()["advertise"]}]}))
    intruder.start()
    wait_for(lambda: "wrong proof of the mesh secret" in nodes[0].log_text(), 10, "refusal logged")
    assert intruder.peer_ids() == set()
    assert full_mesh(nodes) and len(nodes[0].peer_ids()) == 1


def test_damaged_token_is_refused_before_connecting(cluster):
    (n0,) = cluster.start_chain(1)
    text = n0.token()
    joiner = cluster.add("joiner")
    joiner.start(join=[text[:-5]])
    wait_for(lambda: "cannot use a token" in joiner.log_text(), 10, "refusal logged")
    assert "checksum" in joiner.log_text() or "cut short" in joiner.log_text()
    assert n0.peer_ids() == set()


def test_forged_token_key_is_refused_by_the_issuer(cluster):
    (n0,) = cluster.start_chain(1)
    forged = _retoken(n0.token(), key=b"f" * 32)
    joiner = cluster.add("joiner")
    joiner.start(join=[forged])
    wait_for(lambda: "wrong proof of the invite token key" in n0.log_text(), 10, "refusal")
    wait_for(lambda: "cannot join" in joiner.log_text(), 10, "joiner says why")
    assert n0.peer_ids() == set() and (joiner.status() or {}).get("mesh_id") is None


def test_different_certificate_than_the_token_pins_is_refused(cluster):
    (n0,) = cluster.start_chain(1)
    forged = _retoken(n0.token(), pin=hashlib.sha256(b"another key").digest())
    joiner = cluster.add("joiner")
    joiner.start(join=[forged])
    wait_for(lambda: "not the one the token pins" in joiner.log_text(), 10, "pin refusal")
    assert n0.peer_ids() == set() and (joiner.status() or {}).get("mesh_id") is None


def test_revoked_token_is_refused_with_that_reason(cluster):
    (n0,) = cluster.start_chain(1)
    answer = n0.command({"cmd": "token"})["ok"]
    assert n0.command({"cmd": "revoke", "id": answer["id"]})["ok"]["revoked"]
    joiner = cluster.add("joiner")
    joiner.start(join=[answer["token"]])
    wait_for(lambda: "was revoked" in joiner.log_text(), 10, "joiner told the token was revoked")
    assert n0.peer_ids() == set()


def test_one_use_token_cannot_be_used_twice(cluster):
    (n0,) = cluster.start_chain(1)
    text = n0.token(once=True)
    first, second = cluster.add("first"), cluster.add("second")
    first.start(join=[text])
    wait_for(lambda: (first.status() or {}).get("mesh_id"), 10, "first joined")
    second.start(join=[text])
    wait_for(lambda: "has been used" in second.log_text(), 10, "second told the token was used")
    assert n0.peer_ids() == {first.node_id}


def test_unreachable_token_addresses_are_each_named(cluster):
    (n0,) = cluster.start_chain(1)
    text = _retoken(n0.token(), addrs=("127.0.0.1:9", "127.0.0.2:9"))
    joiner = cluster.add("joiner")
    joiner.start(join=[text])
    wait_for(lambda: "cannot join" in joiner.log_text(), 10, "joiner gives up")
    line = next(ln for ln in joiner.log_text().splitlines() if "cannot join" in ln)
    assert "127.0.0.1:9 (connection refused)" in line and "127.0.0.2:9" in line


def test_restarted_node_rejoins_with_the_same_id_within_2_s(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    node = nodes[2]
    nid = node.node_id
    node.signal(signal.SIGKILL)
    node.proc.wait(5)
    wait_for(lambda: all(nid not in n.peer_ids() for n in nodes[:2]), 10, "removed")
    t0 = time.monotonic()
    node.start()  # the same state dir, no token
    wait_for(lambda: full_mesh(nodes), 10, "back everywhere")
    took = time.monotonic() - t0
    print(f"restart: rejoined everywhere {took:.3f} s after starting")
    assert node.node_id == nid and took < 2.0
    for n in nodes:
        assert {p["state"] for p in n.status()["peers"]} == {"alive"}


def test_node_wrongly_declared_dead_comes_back_everywhere(cluster):
    nodes = cluster.start_chain(3)
    wait_for(lambda: full_mesh(nodes), 10, "full mesh")
    node = nodes[1]
    nid = node.node_id
    node.signal(signal.SIGSTOP)  # silent, not dead: its sockets stay open
    try:
        wait_for(lambda: all(nid not in n.peer_ids() for n in (nodes[0], nodes[2])), 10,
                 "declared dead")
    finally:
        node.signal(signal.SIGCONT)
    wait_for(lambda: full_mesh(nodes), 15, "it comes back everywhere")
    for n in nodes:
        assert {p["state"] for p in n.status()["peers"]} == {"alive"}


def test_token_carries_the_advertised_addresses(cluster):
    (n0,) = cluster.start_chain(1)
    t = tokens.decode(n0.token())
    assert list(t.addrs) == n0.status()["advertise"] and t.issuer == n0.node_id
    assert base64.b64encode(t.pin)  # a 32-byte pin
