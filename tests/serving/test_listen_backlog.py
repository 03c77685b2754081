"""A burst of connects must not wait for the kernel's SYN retry.

Twisted listens with a backlog of 50 unless told otherwise: the 51st
connection of a burst that arrives before the reactor's next accept is
dropped by the kernel and retried by the client a second later (found by
``bench/load.py``: p99 time to first chunk 1.3 s for 200 streams opened at
once, with the kernel counting a listen overflow for each).  Every TCP door
(API, console, static API) listens through :func:`meshd.config.tcp_endpoint`.
"""

from __future__ import annotations

import select
import socket
import time

from twisted.internet import endpoints, protocol, reactor

from meshd import config as configmod

BURST = 300


def test_a_burst_of_connects_is_queued_by_the_listen_backlog_not_dropped():
    # listen, but let the reactor accept nothing: only the kernel's queue holds the burst
    ports = []
    endpoints.serverFromString(reactor, configmod.tcp_endpoint("127.0.0.1:0")).listen(
        protocol.Factory.forProtocol(protocol.Protocol)
    ).addCallback(ports.append)
    assert ports, "the endpoint did not listen at once"
    port = ports[0]
    address = ("127.0.0.1", port.getHost().port)
    socks = []
    try:
        for _ in range(BURST):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(address)
            socks.append(s)
        pending = set(socks)
        # loopback handshakes complete at once while the queue has room; with a
        # full queue and nobody accepting, they never do: the bound is generous
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.05)
            for s in writable:
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                pending.discard(s)
        assert not pending, (
            f"{len(pending)} of {BURST} connects not accepted by the kernel "
            "(the listen backlog is too short)"
        )
    finally:
        for s in socks:
            s.close()
        port.stopListening()


def test_the_endpoint_asks_for_a_long_backlog():
    assert configmod.tcp_endpoint("127.0.0.1:80").endswith(f":backlog={configmod.LISTEN_BACKLOG}")
    assert configmod.LISTEN_BACKLOG >= 1024
