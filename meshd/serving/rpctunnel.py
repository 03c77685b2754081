"""RPC tunnels: a split host's llama-server reaches its workers' rpc-servers over mTLS.

llama.cpp's RPC protocol has no authentication and an rpc-server serves
whoever connects, so every rpc-server listens on its own node's 127.0.0.1
only.  The host's llama-server is pointed (``--rpc``) at *entry ports*: one
127.0.0.1 listener per remote worker, opened by the host.  Each connection to
an entry port is carried, raw bytes full duplex, through a peer connection with
purpose ``"rpc"`` (the same TLS 1.3 + HELLO authentication as every other mesh
connection, ``meshd.serving.tunnel``'s TUNNEL header exchange) to the worker,
whose end connects to its rpc-server and splices the two.

- **Who may connect.**  The worker opens a tunnel only for the host its
  group elected, for the model it lends its rpc-server to (``refusal``).  The
  host's entry port accepts only connections made by its own llama-server for
  that model: the connecting socket is looked up in ``/proc/net/tcp`` and its
  inode among the llama-server process's descriptors (``owned_by``), so no
  other local process borrows the worker's memory through the host.
- **Backpressure.**  Both ends splice with producers registered both ways, as
  Twisted's ``portforward`` does: a full TLS send buffer pauses the read of the
  local socket, a full local socket pauses the read of the TLS connection.
- **Latency.**  RPC is several round trips per token: ``TCP_NODELAY`` on every
  socket, and no buffering beyond the bytes that arrive before the other side
  is connected.
- **Endings.**  Either side closing closes the other: a worker that vanishes
  closes the llama-server's RPC socket (llama.cpp then aborts, and the host's
  supervision and re-planning take over, ``meshd.daemon.split``).

The worker connects to its rpc-server on the first byte, not when the tunnel
opens: a tunnel opened and closed at once is the host's readiness probe
(``probe``), and costs the rpc-server nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from meshd import sendnow
from meshd.serving.tunnel import TunnelEndpoint, TunnelHost, TunnelMesh

log = logging.getLogger("meshd.serving.rpctunnel")

PURPOSE = "rpc"
LOOPBACK = "127.0.0.1"
# bytes a side may hold while the other is still connecting (llama.cpp's hello is 1 byte
# plus a header; a bigger backlog means the other side is not reading: the reader is paused)
MAX_EARLY_BYTES = 1 << 20


class _Side(protocol.Protocol):
    """One end of a splice: what it receives goes to ``other``'s transport."""

    # a TCP transport or a tunnel's (meshd.serving.tunnel.TunnelTransport): both produce
    transport: Any

    def __init__(self, name: str):
        self.name = name
        self.other: _Side | None = None
        self.early: list[bytes] = []  # received before the other end was there
        self.early_bytes = 0
        self.closed = False
        self.on_lost: Callable[[Failure], Any] | None = None

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        sendnow.no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
            return
        self.early.append(data)
        self.early_bytes += len(data)
        if self.early_bytes > MAX_EARLY_BYTES:
            self.transport.pauseProducing()  # the other end is not there yet: stop reading

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self.closed = True
        other, self.other = self.other, None
        if other is not None and not other.closed and other.transport is not None:
            # this side's transport, now dead, is the other's producer: left registered, a
            # paused one makes the other's flush resume it instead of closing, for ever
            other.transport.unregisterProducer()
            other.transport.loseConnection()
        if self.on_lost is not None:
            self.on_lost(reason)


def splice(a: _Side, b: _Side) -> None:
    """Join two connected sides: bytes both ways, each one's writes pausing the other's reads."""
    a.other, b.other = b, a
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)
    for side, other in ((a, b), (b, a)):
        early, side.early, side.early_bytes = side.early, [], 0
        if early:
            other.transport.writeSequence(early)
        side.transport.resumeProducing()
    if a.closed or b.closed:  # one end went away while the other was being connected
        for side in (a, b):
            if not side.closed:
                side.transport.loseConnection()


class _Factory(protocol.Factory):
    def __init__(self, side: _Side):
        self.side = side

    def buildProtocol(self, addr: Any) -> _Side:  # noqa: N802 - Twisted's name
        return self.side


# -- the worker's side ----------------------------------------------------------------------

class RpcTunnelHost(TunnelHost):
    """Accepts ``"rpc"`` tunnels on a worker; each is spliced to this node's rpc-server.

    ``refusal(model, who)`` is the worker's rule (``meshd.daemon.split``): only the
    elected host, only while the rpc-server is ready.  ``rpc_port()`` is the
    rpc-server's port now.
    """

    purpose = PURPOSE

    def __init__(self, reactor: Any, *, refusal: Callable[[str, str], str],
                 rpc_port: Callable[[], int | None]):
        super().__init__()
        self.reactor = reactor
        self._refusal = refusal
        self.rpc_port = rpc_port
        self.spliced: set[_WorkerEnd] = set()  # tunnels carrying rpc-server traffic now

    def refusal(self, model: str, who: str) -> str:
        return self._refusal(model, who)

    def channel(self, addr: Any) -> _WorkerEnd | None:
        return _WorkerEnd(self)

    def take_rpc_server(self, end: _WorkerEnd) -> None:
        """``end`` connects to the rpc-server: any older connection goes.  rpc-server serves
        one client at a time, so an older one still open (a llama-server that died with its
        socket half open) would keep the new llama-server waiting forever; the host's
        llama-server is the one client, and its newest connection is the live one."""
        for old in list(self.spliced):
            if old is not end:
                log.info("rpc tunnel: a newer connection from the host replaces an older one")
                old.transport.abortConnection()
        self.spliced.add(end)


class _WorkerEnd(_Side):
    """The tunnel's end on the worker: connects to the rpc-server on its first byte."""

    def __init__(self, host: RpcTunnelHost):
        super().__init__("tunnel")
        self.host = host
        self.local: _Side | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.local is None:
            self._connect()
        super().dataReceived(data)

    def _connect(self) -> None:
        port = self.host.rpc_port()
        local = self.local = _Side("rpc-server")
        if port is None:
            log.warning("rpc tunnel: no rpc-server runs here now; closing the tunnel")
            self.transport.loseConnection()
            return
        self.host.take_rpc_server(self)
        self.transport.pauseProducing()
        ep = TCP4ClientEndpoint(self.host.reactor, LOOPBACK, port, timeout=10)
        d = ep.connect(_Factory(local))

        def connected(_: Any) -> None:
            if self.closed:
                local.transport.loseConnection()
                return
            splice(self, local)

        def failed(f: Failure) -> None:
            log.warning("rpc tunnel: cannot reach the rpc-server on port %s: %s", port,
                        f.getErrorMessage())
            if not self.closed:
                self.transport.loseConnection()

        d.addCallbacks(connected, failed)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self.host.spliced.discard(self)
        super().connectionLost(reason)


# -- the host's side --------------------------------------------------------------------------

def owned_by(pid: int, local_port: int, peer_port: int, *, proc: str = "/proc") -> bool:
    """Whether process ``pid`` holds the client socket of a loopback TCP connection
    (127.0.0.1:``peer_port`` -> 127.0.0.1:``local_port``, seen from the listener)."""
    want_local = f"0100007F:{peer_port:04X}"
    want_remote = f"0100007F:{local_port:04X}"
    inode = None
    try:
        with open(os.path.join(proc, "net", "tcp"), encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                    inode = fields[9]
                    break
    except OSError:
        return False
    if inode is None or inode == "0":
        return False
    target = f"socket:[{inode}]"
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == target:
                return True
        except OSError:
            continue
    return False


class TunnelState:
    """What ``meshctl status`` says of one entry port."""

    LISTENING, OPEN, CLOSED = "listening", "open", "closed"


class EntryPort(protocol.Factory):
    """A 127.0.0.1 port on the host whose connections are tunnels to one worker's rpc-server.

    ``allowed_pid()`` is the pid of the llama-server that may connect (None: none
    may); ``_owned_by`` is the /proc check, replaceable in tests.
    """

    def __init__(self, mesh: TunnelMesh, worker: str, model: str, *,
                 allowed_pid: Callable[[], int | None],
                 on_broken: Callable[[str], Any] | None = None,
                 _owned_by: Callable[[int, int, int], bool] = owned_by):
        self.mesh = mesh
        self.worker = worker
        self.model = model
        self.allowed_pid = allowed_pid
        # called with why, when the worker's end of an admitted connection went away first
        # (its rpc-server died, or the worker): the llama-server using it cannot go on
        self.on_broken = on_broken
        self._owned_by = _owned_by
        self.port: int | None = None
        self.listener: Any = None
        self.connections: set[_EntryEnd] = set()
        self.refused = 0
        self.closed = False

    @property
    def state(self) -> str:
        if self.closed:
            return TunnelState.CLOSED
        return TunnelState.OPEN if self.connections else TunnelState.LISTENING

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.worker, "state": self.state, "local_port": self.port,
                "connections": len(self.connections)}

    def listen(self, reactor: Any) -> int:
        self.listener = reactor.listenTCP(0, self, interface=LOOPBACK)
        self.port = self.listener.getHost().port
        return self.port

    def buildProtocol(self, addr: Any) -> _EntryEnd:  # noqa: N802 - Twisted's name
        return _EntryEnd(self)

    def admits(self, transport: Any) -> bool:
        pid = self.allowed_pid()
        if pid is None:
            return False
        return self._owned_by(pid, transport.getHost().port, transport.getPeer().port)

    def close(self) -> defer.Deferred[None]:
        """Stop listening and cut every connection (the llama-server using them is gone)."""
        self.closed = True
        for end in list(self.connections):
            end.transport.abortConnection()
        listener, self.listener = self.listener, None
        if listener is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listener.stopListening)


class _EntryEnd(_Side):
    """A connection to an entry port: checked, then carried through a tunnel to the worker."""

    def __init__(self, entry: EntryPort):
        super().__init__("llama-server")
        self.entry = entry

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        super().connectionMade()
        entry = self.entry
        if entry.closed or not entry.admits(self.transport):
            entry.refused += 1
            log.warning("rpc entry for worker %s: refused a connection from %s: not this "
                        "node's llama-server for %s", entry.worker, self.transport.getPeer(),
                        entry.model)
            self.transport.abortConnection()
            return
        entry.connections.add(self)
        self.transport.pauseProducing()
        remote = _Side("tunnel")
        d = TunnelEndpoint(entry.mesh, entry.worker, entry.model, PURPOSE).connect(
            _Factory(remote))

        def opened(_: Any) -> None:
            if self.closed:
                remote.transport.loseConnection()
                return
            remote.on_lost = lambda _: self._worker_gone("the worker closed its RPC tunnel")
            splice(self, remote)

        def failed(f: Failure) -> None:
            log.warning("rpc tunnel to worker %s for %s failed: %s", entry.worker, entry.model,
                        f.getErrorMessage())
            if not self.closed:
                self._worker_gone(f"the RPC tunnel to the worker failed: {f.getErrorMessage()}")
                self.transport.abortConnection()

        d.addCallbacks(opened, failed)

    def _worker_gone(self, why: str) -> None:
        # llama-server closing first is its own business (it ended, or was stopped)
        entry = self.entry
        if not self.closed and not entry.closed and entry.on_broken is not None:
            entry.on_broken(f"{why} (worker {entry.worker})")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self.entry.connections.discard(self)
        super().connectionLost(reason)


class _Probe(protocol.Protocol):
    transport: Any

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.loseConnection()


class _ProbeFactory(protocol.Factory):
    def buildProtocol(self, addr: Any) -> _Probe:  # noqa: N802 - Twisted's name
        return _Probe()


def probe(mesh: TunnelMesh, worker: str, model: str) -> defer.Deferred[Any]:
    """Open a tunnel to ``worker`` for ``model`` and close it: fires once the worker said
    yes (its rpc-server is ready and this node is its host); fails with its reason."""
    return TunnelEndpoint(mesh, worker, model, PURPOSE).connect(_ProbeFactory())
