"""Membership logic and heartbeat timing, with an injected clock and no sockets."""

import pytest
from twisted.internet.task import Clock

from meshd.mesh import membership as m


def view(node_id="b" * 26, inc=1, **kw):
    body = {"node_id": node_id, "incarnation": inc, "role": "host", "serving": ["m1"],
            "vram_bytes": 8_000_000_000, "addrs": ["10.0.0.2:7842"], "api": "10.0.0.2:9337"}
    body.update(kw)
    return m.view_from_announce(body)


@pytest.fixture
def table():
    t = m.Membership("a" * 26, Clock())
    t.events = []
    t.add_listener(t.events.append)
    return t


B = "b" * 26


# -- heartbeat ------------------------------------------------------------------------------


def make_heartbeat(active=True):
    clock = Clock()
    out = {"pings": 0, "timeouts": []}
    hb = m.Heartbeat(clock, 2.0, 6.0, on_timeout=out["timeouts"].append,
                     send_ping=(lambda: out.__setitem__("pings", out["pings"] + 1)) if active else None)
    hb.start()
    return clock, hb, out


def test_heartbeat_pings_every_interval():
    clock, hb, out = make_heartbeat()
    for _ in range(5):
        clock.advance(2.0)
        hb.traffic_seen()  # the PONGs
    assert out["pings"] == 5


def test_passive_heartbeat_never_pings():
    clock, hb, out = make_heartbeat(active=False)
    clock.pump([2.0] * 2)
    assert out["pings"] == 0


def test_heartbeat_times_out_after_timeout_of_silence():
    clock, hb, out = make_heartbeat()
    clock.advance(5.9)
    assert out["timeouts"] == []
    clock.advance(0.1)
    assert out["timeouts"] == [6.0]


def test_traffic_pushes_the_heartbeat_deadline_back():
    clock, hb, out = make_heartbeat()
    for _ in range(10):
        clock.advance(3.0)
        hb.traffic_seen()
    assert out["timeouts"] == []
    clock.advance(6.0)
    assert out["timeouts"] == [6.0]


def test_stopped_heartbeat_neither_pings_nor_times_out():
    clock, hb, out = make_heartbeat()
    hb.stop()
    clock.advance(100)
    assert out == {"pings": 0, "timeouts": []}


# -- membership ------------------------------------------------------------------------------


def test_first_announce_is_a_peer_up(table):
    table.announced(view())
    assert [type(e) for e in table.events] == [m.PeerUp]
    assert table.members[B].serving == ("m1",)


def test_peer_up_log_line_gives_vram_in_gib(table, caplog):
    caplog.set_level("INFO", logger="meshd.mesh.gossip")
    table.announced(view(vram_bytes=8 * 2**30))
    assert "8.0 GiB VRAM" in caplog.text


def test_changed_announce_is_a_peer_changed_with_the_old_view(table):
    table.announced(view())
    table.announced(view(serving=["m2"]))
    assert isinstance(table.events[-1], m.PeerChanged)
    assert table.events[-1].old.serving == ("m1",) and table.events[-1].node.serving == ("m2",)


def test_identical_announce_emits_nothing(table):
    table.announced(view())
    table.announced(view())
    assert len(table.events) == 1


def test_announce_from_an_older_incarnation_is_ignored(table):
    table.announced(view(inc=5))
    table.announced(view(inc=4, serving=["old"]))
    assert table.members[B].serving == ("m1",) and len(table.events) == 1


def test_lost_connection_removes_the_peer_and_asks_for_a_broadcast(table):
    table.announced(view())
    assert table.lost(B, "no heartbeat for 6.0 s") is True
    assert table.events[-1] == m.PeerDown(B, "no heartbeat for 6.0 s")
    assert B not in table.members and table.dead[B].incarnation == 1


def test_losing_a_non_member_is_a_no_op(table):
    assert table.lost(B, "x") is False
    assert table.events == []


def test_leave_removes_at_once_as_peer_left(table):
    table.announced(view())
    assert table.left(B, 1)
    assert table.events[-1] == m.PeerLeft(B)


def test_death_report_about_a_member_asks_to_verify_and_keeps_it_meanwhile(table):
    table.announced(view())
    assert table.reported(B, 1, "c" * 26, "connection lost") is m.Verdict.VERIFY
    assert table.members[B].state == "verifying"


def test_false_death_report_does_not_remove_a_live_peer(table):
    table.announced(view())
    table.reported(B, 1, "c" * 26, "connection lost")
    assert table.verified(B, True, "answered in 0.3 ms") is False
    assert table.members[B].state == "alive"
    assert [type(e) for e in table.events] == [m.PeerUp]


def test_confirmed_death_report_removes_the_peer(table):
    table.announced(view())
    table.reported(B, 1, "c" * 26, "connection lost")
    assert table.verified(B, False, "no answer within 2 s") is True
    assert table.events[-1] == m.PeerDown(B, "no answer within 2 s")


def test_report_about_an_older_incarnation_is_ignored(table):
    table.announced(view(inc=3))
    assert table.reported(B, 2, "c" * 26, "old news") is m.Verdict.IGNORE
    assert table.members[B].state == "alive"


def test_report_about_ourselves_asks_for_a_refutation(table):
    assert table.reported("a" * 26, 1, "c" * 26, "no heartbeat") is m.Verdict.REFUTE


def test_report_about_a_stranger_is_ignored(table):
    assert table.reported(B, 1, "c" * 26, "x") is m.Verdict.IGNORE


def test_stale_gossip_does_not_revive_a_dead_peer(table):
    table.announced(view(inc=2))
    table.lost(B, "connection lost")
    assert table.rumor(B, 2, ("10.0.0.2:7842",), "c" * 26) is False
    assert B not in table.members and B in table.dead


def test_gossip_with_a_higher_incarnation_makes_a_dead_peer_worth_dialling(table):
    table.announced(view(inc=2))
    table.lost(B, "connection lost")
    assert table.rumor(B, 3, ("10.0.0.2:7842",), "c" * 26) is True
    assert B not in table.members  # still only its own connection re-adds it


def test_dead_peer_comes_back_by_connecting_itself(table):
    table.announced(view(inc=2))
    table.lost(B, "connection lost")
    table.announced(view(inc=3))
    assert isinstance(table.events[-1], m.PeerUp) and B not in table.dead


def test_rumor_of_an_unknown_node_is_worth_dialling_once(table):
    assert table.rumor(B, 1, ("x:1",), "c" * 26) is True
    assert table.rumor(B, 1, ("x:1",), "c" * 26) is False


def test_rumor_about_a_member_or_ourselves_is_ignored(table):
    table.announced(view())
    assert table.rumor(B, 9, ("x:1",), "c" * 26) is False
    assert table.rumor("a" * 26, 9, ("x:1",), "c" * 26) is False


def test_a_failing_listener_does_not_stop_the_others(table):
    seen = []
    table.add_listener(lambda e: 1 / 0)
    table.add_listener(seen.append)
    table.announced(view())
    assert len(seen) == 1


def test_bad_announce_field_is_named():
    with pytest.raises(ValueError, match="vram_bytes"):
        m.view_from_announce({"node_id": B, "incarnation": 1, "vram_bytes": "lots"})
