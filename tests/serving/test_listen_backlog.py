"""Every TCP door listens with a deep accept queue.

Found by ``tests/test_every_door.py``: with Twisted's default listen backlog (50),
a burst of connections (the suite's 1,000 keep-alive clients, opened one after
another) fills the kernel's accept queue while the reactor is busy, the kernel
drops the next SYN, and that client -- any client, a well-behaved one too -- waits
for the SYN's retransmission: a second, then three.  The client API, the console
(both through ``meshd.config.tcp_endpoint``), the mesh port and the control socket
listen with
``meshd.config.LISTEN_BACKLOG``, 4096 (the kernel caps it at ``net.core.somaxconn``).
Also found by ``bench/load.py``: 200 streams opened at once had a p99 time to first
chunk of 1.3 s, the kernel counting a listen overflow for each retried SYN.
"""

from __future__ import annotations

import select
import socket
import time

from twisted.internet import endpoints, protocol, reactor
from twisted.internet.testing import MemoryReactor, MemoryReactorClock

from meshd import config as configmod
from meshd.config import Config, MeshConfig


def test_the_api_and_console_endpoints_listen_with_a_deep_backlog():
    for address in ("127.0.0.1:9337", "[::1]:3131"):
        ep = endpoints.serverFromString(MemoryReactor(), configmod.tcp_endpoint(address))
        assert ep._backlog >= 511, address


def test_the_mesh_port_listens_with_a_deep_backlog(tmp_path):
    from meshd import statedir
    from meshd.mesh import identity
    from meshd.mesh.gossip import MeshService

    reactor = MemoryReactorClock()
    state = statedir.StateDir(tmp_path / "state")
    cfg = Config(mesh=MeshConfig(listen="127.0.0.1:0"))
    mesh = MeshService(cfg, state, identity.load_or_create(state), reactor=reactor, local_info=dict)
    mesh._listen()
    (port, _factory, backlog, _interface) = reactor.tcpServers[0]
    assert backlog >= 511


def test_the_control_socket_listens_with_a_deep_backlog(tmp_path):
    """A UNIX socket does not retry: with the backlog full, ``connect`` fails at once
    (EAGAIN), so meshctl failed with "Resource temporarily unavailable" while 200
    connections were being opened (the every-door suite's idle flood)."""
    from meshd.daemon.control import listen_control

    reactor = MemoryReactorClock()
    listen_control(str(tmp_path / "control.sock"), None, reactor=reactor)
    (_path, _factory, backlog, _mode, _want_pid) = reactor.unixServers[0]
    assert backlog >= 511


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
