"""The one retry policy (``meshd.backoff``) and the paths that wait by it: the mesh's
rejoin and the passive node's check-in retry (backend restarts: tests/backends)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from meshd.backoff import Backoff
from meshd.config import Config, MeshConfig
from meshd.mesh import identity as identitymod
from meshd.mesh.gossip import MeshService
from meshd.mesh.membership import MemberState, PeerDown, PeerLeft, PeerUp, PeerView
from meshd.statedir import StateDir


def test_delay_doubles_up_to_the_cap():
    b = Backoff(1.0, 60.0)
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_delay_starts_over_after_reset():
    b = Backoff(1.0, 60.0)
    b.next_delay(), b.next_delay()
    assert b.failures == 2
    b.reset()
    assert b.failures == 0 and b.next_delay() == 1.0


def test_a_first_delay_above_the_cap_is_the_cap():
    assert Backoff(5.0, 2.0).next_delay() == 2.0


def test_jitter_stays_within_its_fraction():
    assert Backoff(10.0, 10.0, jitter=0.1, random=lambda: 1.0).next_delay() == pytest.approx(11.0)
    assert Backoff(10.0, 10.0, jitter=0.1, random=lambda: 0.0).next_delay() == pytest.approx(9.0)


def test_the_delay_after_many_failures_stays_the_cap():
    assert Backoff(1.0, 60.0).delay(10_000) == 60.0


def test_reconnect_policy_is_1_s_doubling_to_the_cap_with_10_percent_jitter():
    b = Backoff.reconnect(60.0, random=lambda: 0.5)  # 0.5: no jitter this time
    assert [b.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 32, 60]
    assert b.jitter == 0.1
    assert Backoff.reconnect(0.5).initial_s == 0.5  # a rejoin_s under 1 s is the first delay too


def test_the_mesh_retries_its_known_nodes_by_the_policy(tmp_path):
    state = StateDir(tmp_path / "state")
    state.ensure()
    reactor = MemoryReactorClock()
    config = Config(mesh=MeshConfig(rejoin_s=8.0))
    mesh = MeshService(config, state, identitymod.load_or_create(state), reactor=reactor,
                       local_info=lambda: {})
    mesh._backoff = Backoff.reconnect(8.0, random=lambda: 0.5)  # no jitter: exact times
    mesh.running = True
    mesh.mesh = state.new_mesh()
    mesh._after_loss()  # no peer left
    waits = []
    for _ in range(5):  # each retry dials nobody and schedules the next one
        (call,) = reactor.getDelayedCalls()
        waits.append(call.getTime() - reactor.seconds())
        reactor.advance(waits[-1])
    assert waits == [1, 2, 4, 8, 8]


def _view(node_id: str, addr: str) -> PeerView:
    return PeerView(node_id=node_id, addrs=(addr,), role="idle", serving=(), vram_bytes=0,
                    available_models=(), requested_models=(), rtt_ms=None,
                    state=MemberState.ALIVE, incarnation=1, api="")


def test_a_node_with_peers_redials_the_peers_it_lost_so_a_partition_heals(tmp_path):
    """A partition {A, B} | {C, D}: A keeps B, and nobody on its side is connected to C
    or D, so no rumor brings them back.  Every rejoin_s A re-dials the peers it lost
    without a LEAVING (C), not those that left (D); one that is back is not dialled."""
    state = StateDir(tmp_path / "state")
    state.ensure()
    reactor = MemoryReactorClock()
    mesh = MeshService(Config(mesh=MeshConfig(rejoin_s=8.0)), state,
                       identitymod.load_or_create(state), reactor=reactor,
                       local_info=lambda: {})
    mesh.running = True
    mesh.mesh = state.new_mesh()
    dialled: list[tuple[str, tuple[str, ...]]] = []
    mesh._dial = lambda node_id, addrs, why: dialled.append((node_id, addrs))  # type: ignore
    b, c, d = "b" * 26, "c" * 26, "d" * 26
    for n in (b, c, d):
        mesh._membership_event(PeerUp(_view(n, f"10.0.0.{ord(n[0])}:7842")))
    mesh._membership_event(PeerDown(c, "no heartbeat for 6.0 s"))
    mesh._membership_event(PeerLeft(d))
    mesh.conns[b] = object()  # type: ignore[assignment]  # B is still connected
    mesh._tend_call = reactor.callLater(8.0, mesh._tend)
    reactor.advance(8.0)
    assert dialled == [(c, ("10.0.0.99:7842",))]
    mesh._membership_event(PeerUp(_view(c, "10.0.0.99:7842")))  # healed: C is back
    dialled.clear()
    reactor.advance(8.0)
    assert dialled == []
