"""The systemd notify protocol: real datagrams to a NOTIFY_SOCKET, watchdog timing on a Clock."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.task import Clock

from meshd.daemon.sdnotify import Notifier, WatchdogService, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def received(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def pending(sock) -> int:
    """How many datagrams wait, without blocking."""
    count = 0
    sock.setblocking(False)
    try:
        while True:
            sock.recv(4096)
            count += 1
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return count


def test_ready_sends_ready_and_mainpid(notify_socket):
    path, sock = notify_socket
    assert Notifier(path).ready()
    fields = received(sock)
    assert "READY=1" in fields
    assert f"MAINPID={os.getpid()}" in fields


def test_status_sends_one_line_even_when_text_has_newlines(notify_socket):
    path, sock = notify_socket
    Notifier(path).status("host serving gemma\nloading")
    assert received(sock) == ["STATUS=host serving gemma loading"]


def test_watchdog_sends_watchdog_1(notify_socket):
    path, sock = notify_socket
    Notifier(path).watchdog()
    assert received(sock) == ["WATCHDOG=1"]


def test_stopping_sends_stopping_1_with_optional_status(notify_socket):
    path, sock = notify_socket
    Notifier(path).stopping("leaving the mesh")
    assert received(sock) == ["STOPPING=1", "STATUS=leaving the mesh"]


def test_reloading_sends_reloading_1_with_monotonic_usec(notify_socket):
    path, sock = notify_socket
    Notifier(path).reloading("reloading /etc/meshd.toml", monotonic_usec=123456789)
    assert received(sock) == ["RELOADING=1", "MONOTONIC_USEC=123456789",
                              "STATUS=reloading /etc/meshd.toml"]


def test_reloading_stamps_the_monotonic_clock_by_default(notify_socket):
    import time

    path, sock = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path).reloading()
    fields = received(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_ready_is_remembered_so_a_reload_may_say_it_again(notify_socket):
    path, _sock = notify_socket
    notifier = Notifier(path)
    assert not notifier.was_ready
    notifier.ready()
    assert notifier.was_ready


def test_notify_socket_taken_from_environment(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready()
    assert "READY=1" in received(sock)


def test_abstract_namespace_address_is_reached():
    name = f"meshd-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier("@" + name).ready()
        assert "READY=1" in received(sock)
    finally:
        sock.close()


def test_unset_notify_socket_makes_every_call_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready()
    assert not n.status("x")
    assert not n.watchdog()
    assert not n.stopping()


def test_vanished_notify_socket_does_not_raise(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.ready()
    assert not n.watchdog()
    # logged once, not once per ping
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


# -- watchdog ------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdog_interval_s("30000000", None, my_pid=10) == 15.0


def test_watchdog_interval_none_when_usec_unset_or_zero():
    assert watchdog_interval_s("", None, my_pid=10) is None
    assert watchdog_interval_s("0", None, my_pid=10) is None


def test_watchdog_interval_none_when_watchdog_pid_is_another_process():
    assert watchdog_interval_s("30000000", "11", my_pid=10) is None
    assert watchdog_interval_s("30000000", "10", my_pid=10) == 15.0


def test_watchdog_interval_none_for_garbage_usec():
    assert watchdog_interval_s("soon", None, my_pid=10) is None


def test_watchdog_service_pings_at_half_the_timeout(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    service = WatchdogService(Notifier(path), clock=clock, usec=10_000_000, pid=os.getpid())
    service.startService()
    assert pending(sock) == 1  # at once on start
    clock.advance(4.9)
    assert pending(sock) == 0
    clock.advance(0.1)
    assert pending(sock) == 1
    for _ in range(3):
        clock.advance(5)
    assert pending(sock) == 3
    service.stopService()


def test_watchdog_service_stops_pinging_when_stopped(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    service = WatchdogService(Notifier(path), clock=clock, usec=10_000_000, pid=os.getpid())
    service.startService()
    service.stopService()
    pending(sock)
    clock.advance(60)
    assert pending(sock) == 0
    assert not clock.getDelayedCalls()


def test_watchdog_service_idle_without_watchdog_usec(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    service = WatchdogService(Notifier(path), clock=clock, usec=0)
    service.startService()
    clock.advance(60)
    assert pending(sock) == 0
    assert not clock.getDelayedCalls()
    service.stopService()


def test_watchdog_service_reads_watchdog_usec_from_environment(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    clock = Clock()
    service = WatchdogService(Notifier(path), clock=clock)
    assert service.interval_s == 2.0
    service.stopService()
