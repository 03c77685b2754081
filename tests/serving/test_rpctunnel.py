"""RPC tunnels (``meshd.serving.rpctunnel``) with in-memory transports: the splice's
backpressure, early bytes and endings; the worker's end (rpc-server reached on the first
byte, refusals, the newest connection taking the rpc-server over); the host's entry port
(only its llama-server's connections are carried); the readiness probe; ``owned_by``
against a fake ``/proc``.

The peer connections are ``FakePeer``s (``tests.serving.test_tunnel``); the rpc-server
connection is made through a ``MemoryReactorClock`` and completed by hand.  The one socket
in this file is the check that ``owned_by`` reads the real ``/proc`` as it should.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import abstract, main
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from meshd.serving import rpctunnel
from meshd.serving.rpctunnel import (
    MAX_EARLY_BYTES,
    EntryPort,
    RpcTunnelHost,
    TunnelState,
    _Side,
    owned_by,
    probe,
    splice,
)
from meshd.serving.tunnel import TunnelRefused, TunnelTransport
from tests.serving.test_tunnel import FakeMesh, FakePeer, frames, pump, tunnel_frame

LOST = Failure(ConnectionLost("gone"))
DONE = Failure(ConnectionDone())


def connected_side(name: str, transport: Any = None) -> _Side:
    side = _Side(name)
    side.makeConnection(transport if transport is not None else StringTransport())
    return side


def spliced() -> tuple[_Side, _Side]:
    a, b = connected_side("a"), connected_side("b")
    splice(a, b)
    return a, b


class SlowSocket(abstract.FileDescriptor):
    """A TCP-like transport with Twisted's own write buffer and producer handling
    (``FileDescriptor``), whose far end accepts ``room`` bytes: what a real socket does
    when the process behind it reads slowly."""

    bufferSize = 16

    def __init__(self, reactor: Any):
        super().__init__(reactor)
        self.connected = 1
        self.room = 0
        self.sent = b""

    def writeSomeData(self, data: Any) -> int:  # noqa: N802 - Twisted's name
        n = min(len(data), self.room)
        self.room -= n
        self.sent += bytes(data[:n])
        return n

    def getHost(self) -> IPv4Address:  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 1)

    def getPeer(self) -> IPv4Address:  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 2)


# -- splice ----------------------------------------------------------------------------------


def test_splice_carries_bytes_both_ways_in_order():
    a, b = spliced()
    a.dataReceived(b"one ")
    b.dataReceived(b"reply ")
    a.dataReceived(b"two")
    assert b.transport.value() == b"one two"
    assert a.transport.value() == b"reply "


def test_each_side_is_the_producer_of_the_other_so_a_full_side_pauses_the_others_read():
    a, b = spliced()
    assert a.transport.producer is b.transport and a.transport.streaming is True
    assert b.transport.producer is a.transport and b.transport.streaming is True
    a.transport.producer.pauseProducing()  # a's transport is full: stop reading b
    assert b.transport.producerState == "paused" and a.transport.producerState == "producing"
    a.transport.producer.resumeProducing()
    assert b.transport.producerState == "producing"
    b.transport.producer.pauseProducing()
    assert a.transport.producerState == "paused" and b.transport.producerState == "producing"


def test_a_slow_socket_pauses_the_tunnels_read_until_it_drained():
    reactor = MemoryReactorClock()
    sock = SlowSocket(reactor)
    tunnel, rpc = connected_side("tunnel"), connected_side("rpc-server", sock)
    splice(tunnel, rpc)
    tunnel.dataReceived(b"x" * 100)  # more than the socket's buffer holds
    assert tunnel.transport.producerState == "paused"
    sock.room = 1000
    assert sock.doWrite() is None
    assert sock.sent == b"x" * 100
    assert tunnel.transport.producerState == "producing"


def test_bytes_that_arrive_before_the_other_side_is_there_are_delivered_in_order():
    a, b = connected_side("a"), connected_side("b")
    a.dataReceived(b"hello ")
    a.dataReceived(b"rpc")
    b.dataReceived(b"early reply")
    assert a.transport.value() == b"" and b.transport.value() == b""
    splice(a, b)
    assert b.transport.value() == b"hello rpc"
    assert a.transport.value() == b"early reply"
    assert a.early == [] and a.early_bytes == 0
    a.dataReceived(b" more")
    assert b.transport.value() == b"hello rpc more"


def test_a_reader_past_max_early_bytes_is_paused_until_spliced():
    a, b = connected_side("a"), connected_side("b")
    a.dataReceived(b"x" * MAX_EARLY_BYTES)
    assert a.transport.producerState == "producing"  # up to the limit is fine
    a.dataReceived(b"y")
    assert a.transport.producerState == "paused"
    splice(a, b)
    assert a.transport.producerState == "producing"
    assert len(b.transport.value()) == MAX_EARLY_BYTES + 1


@pytest.mark.parametrize("which", ["a", "b"])
def test_either_side_losing_its_connection_closes_the_other(which):
    a, b = spliced()
    lost, other = (a, b) if which == "a" else (b, a)
    reasons: list[Failure] = []
    lost.on_lost = reasons.append
    lost.connectionLost(LOST)
    assert other.transport.disconnecting
    assert reasons == [LOST]
    other.connectionLost(DONE)  # the close that follows closes nothing more
    assert not lost.transport.disconnecting


def test_a_side_gone_while_the_other_was_connecting_still_delivers_its_bytes_then_closes():
    a, b = connected_side("a"), connected_side("b")
    a.dataReceived(b"last words")
    a.connectionLost(DONE)
    splice(a, b)
    assert b.transport.value() == b"last words"
    assert b.transport.disconnecting


def test_a_backpressured_socket_still_closes_once_flushed_after_the_tunnel_went_away():
    reactor = MemoryReactorClock()
    sock = SlowSocket(reactor)
    tunnel, rpc = connected_side("tunnel"), connected_side("rpc-server", sock)
    splice(tunnel, rpc)
    tunnel.dataReceived(b"x" * 100)  # the rpc-server reads slowly: the tunnel is paused
    tunnel.connectionLost(LOST)  # the host went away
    assert sock.disconnecting
    sock.room = 1000
    # flushed: the reactor is told to close it (CONNECTION_DONE), not left half open
    assert sock.doWrite() is main.CONNECTION_DONE


# -- the worker's end -------------------------------------------------------------------------


class Worker:
    """An ``RpcTunnelHost`` over a memory reactor, its refusal and rpc-server port set by the test."""

    def __init__(self, refusal: str = "", port: int | None = 7001):
        self.reactor = MemoryReactorClock()
        self.refusal_reason = refusal
        self.port = port
        self.asked: list[tuple[str, str]] = []
        self.host = RpcTunnelHost(self.reactor, refusal=self.refusal, rpc_port=lambda: self.port)

    def refusal(self, model: str, who: str) -> str:
        self.asked.append((model, who))
        return self.refusal_reason

    def tunnel(self, who: str = "node-h", model: str = "m") -> FakePeer:
        peer: Any = FakePeer(who)
        self.host.handle(peer)
        peer.feed(tunnel_frame({"model": model}))
        return peer

    def rpc_server_accepts(self, index: int = -1) -> tuple[Any, StringTransport]:
        """Complete the connection to the rpc-server: its protocol and transport."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        proto: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", self.port or 0))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def answer(peer: FakePeer) -> dict[str, Any]:
    (frame,) = frames(peer.sent())
    return frame.json()


def test_worker_opens_the_tunnel_and_reaches_its_rpc_server_only_on_the_first_byte():
    w = Worker()
    peer = w.tunnel("node-h", "m")
    assert w.asked == [("m", "node-h")]
    assert answer(peer) == {"ok": True}
    assert w.reactor.tcpClients == []
    peer.feed(b"\x00hello")
    ((host, port, _, _, _),) = w.reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 7001)
    assert peer.transport.producerState == "paused"  # nothing more read until connected
    peer.feed(b" more")  # already in flight before the pause took hold
    rpc, rpc_t = w.rpc_server_accepts()
    assert rpc_t.value() == b"\x00hello more"
    assert peer.transport.producerState == "producing"
    rpc.dataReceived(b"answer")
    assert peer.sent() == b"answer"
    assert len(w.host.spliced) == 1


def test_a_probe_tunnel_opened_and_closed_costs_the_rpc_server_nothing():
    w = Worker()
    peer = w.tunnel()
    assert answer(peer) == {"ok": True}
    peer.lost()
    assert w.reactor.tcpClients == [] and w.host.spliced == set() and w.host.tunnels == set()
    assert w.host.opened == 1


def test_worker_refuses_with_its_reason_and_carries_nothing():
    w = Worker(refusal="this node's rpc-server is lent to host node-x, not node-h")
    peer = w.tunnel("node-h")
    assert answer(peer) == {"error": "this node's rpc-server is lent to host node-x, not node-h"}
    assert peer.transport.disconnecting
    assert w.host.opened == 0 and w.host.tunnels == set()


def test_a_refusal_repeated_for_every_probe_is_a_warning_once(caplog):
    # a host probes its worker every few seconds while they disagree: one warning, until
    # the reason changes
    w = Worker(refusal="this node's rpc-server is starting")
    with caplog.at_level(logging.DEBUG, logger="meshd.serving.tunnel"):
        for _ in range(3):
            w.tunnel("node-probing")
        w.refusal_reason = "this node is no split worker now"
        w.tunnel("node-probing")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "refused a tunnel from node node-probing for m: this node's rpc-server is starting",
        "refused a tunnel from node node-probing for m: this node is no split worker now"]
    assert sum("refused a tunnel" in r.getMessage() for r in caplog.records) == 4


def test_no_rpc_server_running_closes_the_tunnel_on_its_first_byte():
    w = Worker(port=None)
    peer = w.tunnel()
    peer.sent()
    peer.feed(b"\x00")
    assert peer.transport.disconnecting
    assert w.reactor.tcpClients == [] and w.host.spliced == set()


def test_an_unreachable_rpc_server_closes_the_tunnel():
    w = Worker()
    peer = w.tunnel()
    peer.feed(b"\x00")
    _, _, factory, _, _ = w.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert peer.transport.disconnecting


def test_a_newer_connection_from_the_host_aborts_the_older_one():
    w = Worker()
    old = w.tunnel()
    old.feed(b"\x00")
    w.rpc_server_accepts(0)
    new = w.tunnel()
    assert not old.transport.disconnected
    new.feed(b"\x00")
    assert old.transport.disconnected  # aborted, not waiting for a flush
    assert not new.transport.disconnecting
    old.lost("aborted", by_peer=False)
    (live,) = w.host.spliced
    assert live.transport._peer is new


def test_the_tunnel_closing_closes_the_rpc_server_connection_and_back():
    w = Worker()
    peer = w.tunnel()
    peer.feed(b"\x00")
    _, rpc_t = w.rpc_server_accepts()
    peer.lost()
    assert rpc_t.disconnecting and w.host.spliced == set()

    peer2 = w.tunnel()
    peer2.feed(b"\x00")
    rpc2, _ = w.rpc_server_accepts()
    rpc2.connectionLost(DONE)  # rpc-server went away
    assert peer2.transport.disconnecting


def test_a_tunnel_gone_before_the_rpc_server_answered_closes_the_late_connection():
    w = Worker()
    peer = w.tunnel()
    peer.feed(b"\x00")
    peer.lost()
    _, rpc_t = w.rpc_server_accepts()
    assert rpc_t.disconnecting


# -- the host's entry port ------------------------------------------------------------------


HOST_ADDR = IPv4Address("TCP", "127.0.0.1", 5000)
LLAMA_ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Owner:
    """The /proc check, recorded: which (pid, local port, peer port) were asked."""

    def __init__(self, owns: bool):
        self.owns = owns
        self.asked: list[tuple[int, int, int]] = []

    def __call__(self, pid: int, local_port: int, peer_port: int) -> bool:
        self.asked.append((pid, local_port, peer_port))
        return self.owns


def entry_port(*, owns: bool = True, pid: int | None = 4242,
               broken: list[str] | None = None) -> tuple[EntryPort, FakeMesh, Owner]:
    mesh: Any = FakeMesh()
    owner = Owner(owns)
    entry = EntryPort(mesh, "node-w", "m", allowed_pid=lambda: pid, _owned_by=owner,
                      on_broken=broken.append if broken is not None else None)
    return entry, mesh, owner


def llama_connects(entry: EntryPort) -> tuple[Any, StringTransport]:
    end = entry.buildProtocol(LLAMA_ADDR)
    transport = StringTransport(hostAddress=HOST_ADDR, peerAddress=LLAMA_ADDR)
    end.makeConnection(transport)
    return end, transport


def test_the_entry_port_listens_on_loopback_only():
    entry, _, _ = entry_port()
    reactor = MemoryReactorClock()
    entry.listen(reactor)
    ((_, factory, _, interface),) = reactor.tcpServers
    assert factory is entry and interface == "127.0.0.1"


def test_a_connection_not_made_by_its_llama_server_is_closed_without_a_tunnel():
    entry, mesh, owner = entry_port(owns=False)
    _, t = llama_connects(entry)
    assert owner.asked == [(4242, 5000, 40000)]  # the llama-server pid, listener, client port
    assert t.disconnected  # aborted
    assert mesh.dials == [] and entry.refused == 1
    assert entry.connections == set() and entry.state == TunnelState.LISTENING


def test_while_no_llama_server_runs_every_connection_is_refused_unasked():
    entry, mesh, owner = entry_port(pid=None)
    _, t = llama_connects(entry)
    assert owner.asked == [] and t.disconnected and mesh.dials == [] and entry.refused == 1


def test_its_llama_servers_connection_is_carried_through_an_rpc_tunnel_to_the_worker():
    entry, mesh, _ = entry_port()
    end, t = llama_connects(entry)
    ((node_id, purpose, dial),) = mesh.dials
    assert (node_id, purpose) == ("node-w", "rpc")
    assert t.producerState == "paused"  # llama-server waits until the worker said yes
    assert entry.state == TunnelState.OPEN
    end.dataReceived(b"\x00hello")  # llama.cpp's hello, read before the pause
    peer = FakePeer("node-w")
    dial.callback(peer)
    (header,) = frames(peer.sent())
    assert header.json() == {"model": "m"}
    peer.feed(tunnel_frame({"ok": True}))
    assert peer.sent() == b"\x00hello"
    assert t.producerState == "producing"
    assert isinstance(end.other.transport, TunnelTransport)
    peer.feed(b"reply")
    assert t.value() == b"reply"
    # backpressure both ways: each is the other's producer
    assert t.producer is end.other.transport and peer.transport.producer is t
    assert entry.to_dict() == {"node_id": "node-w", "state": "open", "local_port": None,
                               "connections": 1}
    peer.lost()
    assert t.disconnecting


def test_a_worker_that_refuses_the_tunnel_gets_llama_servers_connection_aborted():
    entry, mesh, _ = entry_port()
    _, t = llama_connects(entry)
    peer = FakePeer("node-w")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"error": "this node is no split worker now"}))
    assert t.disconnected


def test_llama_server_gone_before_the_tunnel_opened_closes_the_tunnel():
    entry, mesh, _ = entry_port()
    end, _ = llama_connects(entry)
    end.connectionLost(DONE)
    assert entry.connections == set()
    peer = FakePeer("node-w")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"ok": True}))
    assert peer.transport.disconnecting


def test_closing_the_entry_port_aborts_its_connections_and_refuses_new_ones():
    entry, mesh, owner = entry_port()
    _, t = llama_connects(entry)
    entry.close()
    assert t.disconnected and entry.state == TunnelState.CLOSED
    _, t2 = llama_connects(entry)
    assert t2.disconnected and len(mesh.dials) == 1 and entry.refused == 1


def test_llama_servers_bytes_reach_the_rpc_server_and_back_through_both_ends():
    entry, mesh, _ = entry_port()
    worker = Worker()
    end, llama_t = llama_connects(entry)
    end.dataReceived(b"\x00hello")
    host_peer, worker_peer = FakePeer("node-w"), FakePeer("node-h")
    worker.host.handle(worker_peer)
    mesh.dials[0][2].callback(host_peer)
    pump(host_peer, worker_peer)
    assert worker.asked == [("m", "node-h")]
    rpc, rpc_t = worker.rpc_server_accepts()
    assert rpc_t.value() == b"\x00hello"
    rpc.dataReceived(b"\x01reply")
    pump(host_peer, worker_peer)
    assert llama_t.value() == b"\x01reply"


def open_entry_tunnel(broken: list[str]) -> tuple[EntryPort, Any, StringTransport, FakePeer]:
    """An entry port whose llama-server connection is spliced to an open tunnel."""
    entry, mesh, _ = entry_port(broken=broken)
    end, t = llama_connects(entry)
    peer = FakePeer("node-w")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"ok": True}))
    peer.sent()
    return entry, end, t, peer


def test_the_worker_closing_its_tunnel_first_reports_the_split_broken():
    broken: list[str] = []
    _, _, t, peer = open_entry_tunnel(broken)
    peer.lost()
    assert t.disconnecting
    assert broken == ["the worker closed its RPC tunnel (worker node-w)"]


def test_llama_server_closing_first_breaks_nothing():
    broken: list[str] = []
    _, end, _, peer = open_entry_tunnel(broken)
    end.connectionLost(DONE)
    assert peer.transport.disconnecting
    peer.lost()
    assert broken == []


def test_a_closed_entry_port_reports_nothing_when_its_tunnels_end():
    broken: list[str] = []
    entry, _, _, peer = open_entry_tunnel(broken)
    entry.close()
    peer.lost()
    assert broken == []


def test_a_tunnel_the_worker_refused_reports_the_split_broken():
    broken: list[str] = []
    entry, mesh, _ = entry_port(broken=broken)
    llama_connects(entry)
    peer = FakePeer("node-w")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"error": "this node's rpc-server is restarting"}))
    (why,) = broken
    assert why.startswith("the RPC tunnel to the worker failed: ")
    assert "rpc-server is restarting" in why and why.endswith("(worker node-w)")


# -- the probe ---------------------------------------------------------------------------------


def test_probe_fires_once_the_worker_says_yes_and_closes_the_tunnel_at_once():
    mesh = FakeMesh()
    results: list[Any] = []
    probe(mesh, "node-w", "m").addBoth(results.append)
    ((node_id, purpose, dial),) = mesh.dials
    assert (node_id, purpose) == ("node-w", "rpc")
    peer = FakePeer("node-w")
    dial.callback(peer)
    assert frames(peer.sent())[0].json() == {"model": "m"}
    assert results == []
    peer.feed(tunnel_frame({"ok": True}))
    assert len(results) == 1 and not isinstance(results[0], Failure)
    assert peer.transport.disconnecting and peer.sent() == b""


def test_probe_fails_with_the_workers_reason():
    mesh = FakeMesh()
    results: list[Any] = []
    probe(mesh, "node-w", "m").addBoth(results.append)
    peer = FakePeer("node-w")
    mesh.dials[0][2].callback(peer)
    peer.feed(tunnel_frame({"error": "this node's rpc-server is starting"}))
    (failure,) = results
    assert failure.check(TunnelRefused)
    assert "this node's rpc-server is starting" in str(failure.value)


# -- owned_by against a fake /proc ------------------------------------------------------------


TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
              "   uid  timeout inode\n")


def tcp_row(sl: int, local: str, remote: str, inode: int | str) -> str:
    return (f"{sl:4d}: {local} {remote} 01 00000000:00000000 00:00000000 00000000  1000"
            f"        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")


def fake_proc(root: Path, rows: list[str], fds: dict[int, list[str]]) -> str:
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(TCP_HEADER + "".join(rows), encoding="ascii")
    for pid, targets in fds.items():
        fd_dir = root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for i, target in enumerate(targets):
            os.symlink(target, fd_dir / str(i))
    return str(root)


def loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def test_owned_by_finds_the_client_socket_among_the_processes_descriptors(tmp_path):
    proc = fake_proc(tmp_path, [
        tcp_row(0, loopback(5000), "00000000:0000", 100),  # the listener
        tcp_row(1, loopback(5000), loopback(40000), 201),  # accepted: meshd's end
        tcp_row(2, loopback(40000), loopback(5000), 202),  # the client: llama-server's
    ], {4242: ["/dev/null", "socket:[202]", "pipe:[9]"], 99: ["socket:[201]"]})
    assert owned_by(4242, 5000, 40000, proc=proc)
    assert not owned_by(99, 5000, 40000, proc=proc)  # holds the accepted end, not the client


@pytest.mark.parametrize("local_port, peer_port, encoded_local, encoded_peer", [
    (80, 40000, "0050", "9C40"),  # four hex digits, zero padded
    (0xABCD, 0x0A0B, "ABCD", "0A0B"),  # upper case, as the kernel writes it
])
def test_owned_by_matches_the_kernels_ipv4_hex_encoding(tmp_path, local_port, peer_port,
                                                         encoded_local, encoded_peer):
    proc = fake_proc(tmp_path, [
        tcp_row(0, f"0100007F:{encoded_peer}", f"0100007F:{encoded_local}", 300),
    ], {7: ["socket:[300]"]})
    assert owned_by(7, local_port, peer_port, proc=proc)
    assert not owned_by(7, local_port, peer_port + 1, proc=proc)
    assert not owned_by(7, local_port + 1, peer_port, proc=proc)


def test_owned_by_wants_a_loopback_connection(tmp_path):
    # the same ports from 10.0.0.1 (0100000A) are not llama-server's loopback connection
    proc = fake_proc(tmp_path, [tcp_row(0, "0100000A:9C40", "0100007F:1388", 400)],
                     {7: ["socket:[400]"]})
    assert not owned_by(7, 5000, 40000, proc=proc)


def test_owned_by_is_false_for_a_socket_without_an_inode(tmp_path):
    proc = fake_proc(tmp_path, [tcp_row(0, loopback(40000), loopback(5000), 0)],
                     {7: ["socket:[0]"]})
    assert not owned_by(7, 5000, 40000, proc=proc)


def test_owned_by_is_false_when_proc_cannot_be_read(tmp_path):
    assert not owned_by(7, 5000, 40000, proc=str(tmp_path / "nothing"))
    proc = fake_proc(tmp_path / "p", [tcp_row(0, loopback(40000), loopback(5000), 500)], {})
    assert not owned_by(7, 5000, 40000, proc=proc)  # no such process


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="no /proc/net/tcp here")
def test_owned_by_reads_the_real_proc_of_a_loopback_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                listen_port = listener.getsockname()[1]
                client_port = client.getsockname()[1]
                assert owned_by(os.getpid(), listen_port, client_port)
                assert not owned_by(os.getpid(), listen_port, client_port + 1)


def test_the_entry_ports_default_ownership_check_is_owned_by():
    entry = EntryPort(FakeMesh(), "node-w", "m", allowed_pid=lambda: None)
    assert entry._owned_by is rpctunnel.owned_by
