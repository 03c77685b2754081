"""One peer connection: TLS 1.3 with certificates both ways, then HELLO, then frames.

The connection is an explicit state machine (``PeerState``; the allowed moves
are in ``_MOVES``, on one screen)::

    HANDSHAKING --TLS done--> HELLO --peer's HELLO verified--> OPEN (client)
                                    \\--client's HELLO verified--> CONFIRM --READY--> OPEN (server)
    any state --close / connection lost--> CLOSED

Authentication, all of it before a single gossip frame is accepted:

1. TLS 1.3, both sides present their self-signed certificate.  TLS itself
   accepts any certificate; the checks that matter come next, in the app.
2. The client sends HELLO (versions, mesh id, its node id, incarnation,
   purpose, which key it proves: the mesh secret or an invite token's key,
   and the proof).  The server checks: protocol versions overlap; the mesh id
   is its own; the certificate's key hashes to the claimed node id and names it
   in subjectAltName (service-identity); the proof is right.  Then it answers
   with its own HELLO and proof; the client checks the same, plus the node id
   or key hash it expected (pinned from a token, or the known peer it dialled),
   and sends READY.  The server opens only on READY, so neither side ever
   counts a peer as up that the other side refused.
3. The proof is ``HMAC-SHA256(key, "meshd-proof-v1" | side | mesh id | node id
   | EKM)`` where EKM is 32 bytes of TLS exported keying material (RFC 8446
   section 7.5) for this very session: a proof cannot be replayed on another
   connection or relayed through a man in the middle (whose two sessions have
   different EKMs), and the side label stops reflection.

A failure closes the connection with a CLOSE frame carrying the reason (so the
other operator reads why) and a ``wire.CloseCode`` (so the other program acts on
it without reading words), and one log line; never a traceback.  The listening
side tells a peer that proved no key only "authentication failed" (see
:class:`AuthRefused`); the detail stays in its own log.

This module knows nothing of gossip: after OPEN it hands frames to its
``delegate`` (``meshd.mesh.gossip``); PING/PONG and the heartbeat it handles itself.
The same class authenticates any later kind of connection (``purpose``, e.g.
a tunnel), and ``take_over()`` hands the raw byte stream to someone else.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from meshd import sendnow
from meshd.config import is_loopback, parse_address
from meshd.mesh import wire
from meshd.mesh.identity import Identity, check_peer_certificate
from meshd.mesh.membership import Heartbeat
from meshd.mesh.penalties import Penalties
from meshd.mesh.wire import CloseCode, FrameType
from meshd.nodename import label
from meshd.states import PEER_MOVES, PeerState

log = logging.getLogger("meshd.mesh.peer")

EKM_LABEL = b"EXPORTER-meshd-auth-v1"
PROOF_LABEL = b"meshd-proof-v1"
PING2 = struct.Struct(">II")  # seq, the sender's last measured RTT in microseconds


class AuthRefused(Exception):
    """A peer failed authentication; ``str()`` is the reason for the log and CLOSE,
    ``code`` the CLOSE frame's code.

    The listening side tells a peer that has not proven a key only
    :data:`UNPROVEN_REFUSAL` (its detail would tell a stranger the mesh id, or
    which token ids exist and in what state).  ``proof_key``: the key whose proof
    earns the peer this refusal's own reason and code all the same (a token's, so
    its holder learns it expired and stops trying); ``proven`` is set once it did.
    """

    def __init__(self, reason: str, code: CloseCode = CloseCode.AUTH_FAILED, *,
                 proof_key: bytes | None = None):
        super().__init__(reason)
        self.code = code
        self.proof_key = proof_key
        self.proven = False


# what the listening side sends a peer that proved no key, whatever the refusal
UNPROVEN_REFUSAL = ("authentication failed", CloseCode.AUTH_FAILED)
# refusals about the HELLO itself, not this node or its mesh: told to anyone
TOLD_UNPROVEN = frozenset({CloseCode.BAD_HELLO, CloseCode.VERSION_MISMATCH})
# the RTT is the lowest of the last few samples (the handshake's, then each PONG's): the
# path's distance, which [models] max_rtt_ms gates a split on.  A slow answer while the
# reactor relays a split's weights, or a busy CPU, is no distance; a path that really got
# slower shows once the window holds only its samples (RTT_WINDOW heartbeats)
RTT_WINDOW = 5


class PeerClosed(Exception):
    """A connection closed before it was open; ``reason`` says why.

    ``codes``: the CLOSE codes behind it (one per connection tried; none when a
    connection ended without a CLOSE, e.g. refused or timed out), so a caller
    decides what to do next by code, never by the reason's words."""

    def __init__(self, reason: str, codes: Iterable[CloseCode] = ()):
        super().__init__(reason)
        self.reason = reason
        self.codes = frozenset(codes)


# -- TLS ------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class TLSOptions:
    """TLS 1.3 only, this node's certificate on both sides, any peer certificate accepted
    at the TLS layer (the peer's identity is checked after the handshake, against the
    id it claims and the pin we hold)."""

    def __init__(self, identity: Identity):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(identity.cert)
        ctx.use_privatekey(identity.key)
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: True)
        ctx.set_options(SSL.OP_NO_TICKET)  # no session resumption: every session proves anew
        self._ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_accept_state()
        return conn


# -- credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A peer's HELLO, validated for shape (not yet for truth)."""

    proto: int
    min_proto: int
    mesh_id: str
    node_id: str
    incarnation: int
    purpose: str
    auth: str  # "mesh" or "token"
    token_id: str | None
    proof: bytes
    extra: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Hello:
        def get(key: str, kind: type) -> Any:
            value = body.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise AuthRefused(f"HELLO field {key!r} missing or not a {kind.__name__}",
                                  CloseCode.BAD_HELLO)
            return value

        try:
            proof = bytes.fromhex(get("proof", str))
        except ValueError:
            raise AuthRefused("HELLO proof is not hex", CloseCode.BAD_HELLO) from None
        auth = get("auth", str)
        if auth not in ("mesh", "token"):
            raise AuthRefused(f"HELLO auth {auth!r} is not 'mesh' or 'token'", CloseCode.BAD_HELLO)
        token_id = body.get("token_id") if auth == "token" else None
        if auth == "token" and not isinstance(token_id, str):
            raise AuthRefused("HELLO with token auth names no token_id", CloseCode.BAD_HELLO)
        return cls(
            proto=get("proto", int),
            min_proto=get("min_proto", int),
            mesh_id=get("mesh_id", str),
            node_id=get("node_id", str),
            incarnation=get("incarnation", int),
            purpose=get("purpose", str),
            auth=auth,
            token_id=token_id,
            proof=proof,
            extra={k: v for k, v in body.items() if k not in _HELLO_KEYS},
        )


_HELLO_KEYS = {"proto", "min_proto", "mesh_id", "node_id", "incarnation", "purpose", "auth",
               "token_id", "proof"}


@dataclass(frozen=True)
class ClientAuth:
    """What the dialling side proves and expects."""

    mesh_id: str
    key: bytes  # the mesh secret, or the token's join key
    token_id: str | None = None  # set: prove the token key (joining)
    expect_node_id: str | None = None  # the known peer we dialled
    pin: bytes | None = None  # SHA-256 of the issuer's SPKI, from the token


class ServerGate(Protocol):
    """The listening side's policy: which key a HELLO must prove, and what follows."""

    def mesh_id(self) -> str | None: ...

    def key_for(self, hello: Hello) -> bytes:
        """The key this HELLO must prove; AuthRefused(reason) when none will do, with
        the ``proof_key`` that earns the peer that reason if there is one."""

    def authenticated(self, hello: Hello) -> None:
        """The proof was right (e.g. mark a one-use token used)."""


def proof(key: bytes, side: bytes, mesh_id: str, node_id: str, ekm: bytes) -> bytes:
    msg = b"|".join([PROOF_LABEL, side, mesh_id.encode(), node_id.encode(), ekm])
    return hmac.new(key, msg, hashlib.sha256).digest()


def _proves(key: bytes, side: bytes, hello: Hello, ekm: bytes) -> bool:
    """Whether ``hello``'s proof is the one ``key`` makes on this session."""
    return hmac.compare_digest(proof(key, side, hello.mesh_id, hello.node_id, ekm), hello.proof)


def versions_overlap(hello: Hello) -> int:
    """The protocol version both sides speak; AuthRefused when there is none."""
    agreed = min(hello.proto, wire.PROTOCOL_VERSION)
    if agreed < max(hello.min_proto, wire.MIN_PROTOCOL_VERSION):
        raise AuthRefused(
            f"no common protocol version (peer speaks {hello.min_proto}..{hello.proto}, "
            f"we speak {wire.MIN_PROTOCOL_VERSION}..{wire.PROTOCOL_VERSION})",
            CloseCode.VERSION_MISMATCH,
        )
    return agreed


# -- the connection -------------------------------------------------------------------


# PeerState and its moves live with every other state in meshd.states
_MOVES = PEER_MOVES
_T = TypeVar("_T")


class PeerTransport(Protocol):
    """What a connection uses of its transport: in the daemon, the TLSMemoryBIOProtocol
    that wraps it.  Twisted declares ``Protocol.transport`` as a bare ``ITransport``,
    which has neither ``getHandle`` (ISystemHandle: the OpenSSL connection) nor
    ``abortConnection`` (ITCPTransport), though the TLS wrapper has both."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...  # noqa: N802 - Twisted's name

    def abortConnection(self) -> None: ...  # noqa: N802 - Twisted's name

    def getPeer(self) -> IAddress: ...  # noqa: N802 - Twisted's name

    def getHandle(self) -> SSL.Connection: ...  # noqa: N802 - Twisted's name


class PeerDelegate(Protocol):
    """Who receives an authenticated connection's life (``meshd.mesh.gossip``)."""

    def peer_open(self, peer: PeerProtocol) -> None: ...

    def peer_frame(self, peer: PeerProtocol, frame: wire.Frame) -> None: ...

    def peer_closed(self, peer: PeerProtocol, reason: str) -> None: ...


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    handshake_timeout_s: float = 5.0  # TCP connected to HELLO verified
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES


@implementer(IHandshakeListener)
class PeerProtocol(protocol.Protocol):
    """One connection; wrapped in TLS by TLSMemoryBIOFactory (``self.transport`` is TLS)."""

    def __init__(
        self,
        *,
        identity: Identity,
        incarnation: Callable[[], int],
        delegate: PeerDelegate,
        clock: IReactorTime,
        timing: Timing,
        client: ClientAuth | None = None,
        gate: ServerGate | None = None,
        purpose: str = "control",
        meter: Callable[[str, int, int], None] | None = None,
    ):
        assert (client is None) != (gate is None), "a connection is either a client or a server"
        self.identity = identity
        self._incarnation = incarnation
        self.delegate = delegate
        self.clock = clock
        self.timing = timing
        self.client = client
        self.gate = gate
        self.purpose = purpose
        self.state = PeerState.HANDSHAKING
        self.hello: Hello | None = None  # the peer's, once verified
        # the peer proved a key of this mesh (even if refused afterwards): not a stranger,
        # whatever becomes of the connection (meshd.mesh.penalties counts the others)
        self.proven = False
        self.peer_cert: x509.Certificate | None = None
        self.close_reason: str | None = None
        self.close_code: CloseCode | None = None  # None: it ended without a CLOSE either way
        # the other end ended it (its CLOSE, or a clean close of the connection), not this one
        self.ended_by_peer = False
        self.rtt_ms: float | None = None
        # the peer's [node] name once it announced (set by the gossip, cleaned): for log lines
        self.peer_name = ""
        self._hello_sent: float | None = None  # the handshake's round trip: the first RTT
        self._rtt_samples: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)
        self._open_waiters: list[defer.Deferred[PeerProtocol]] = []
        self._peer_addr = "?"
        self.closed: defer.Deferred[str] = defer.Deferred()
        self.bytes_in = 0
        self.bytes_out = 0
        # meter(purpose, bytes in, bytes out) as they pass (the daemon's metrics)
        self._meter = meter
        self._decoder = wire.Decoder(timing.max_frame_bytes)
        self._timer: IDelayedCall | None = None
        self._heartbeat: Heartbeat | None = None
        self._ping_seq = 0
        self._ping_sent: dict[int, float] = {}
        self._probes: dict[int, defer.Deferred[float | None]] = {}
        self._raw: Callable[[bytes], None] | None = None
        self._pinging = False
        self.session_id = b""

    # -- what others read ------------------------------------------------------

    @property
    def is_client(self) -> bool:
        return self.client is not None

    @property
    def node_id(self) -> str | None:
        return self.hello.node_id if self.hello else None

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    @property
    def who(self) -> str:
        """For log lines: the node (name and id) when known, and the address."""
        if not self.node_id:
            return self._peer_addr
        return f"node {label(self.peer_name, self.node_id)} at {self._peer_addr}"

    def when_opened(self) -> defer.Deferred[PeerProtocol]:
        """Fires with this connection once OPEN; fails with PeerClosed(reason) if it never is."""
        d: defer.Deferred[PeerProtocol] = defer.Deferred()
        if self.state is PeerState.OPEN:
            d.callback(self)
        elif self.state is PeerState.CLOSED:
            d.errback(PeerClosed(self.close_reason or "closed", self._close_codes()))
        else:
            self._open_waiters.append(d)
        return d

    def __repr__(self) -> str:
        who = self.node_id or "unauthenticated"
        return f"<Peer {who} {self.peer_address} {self.state.value}>"

    # -- state ------------------------------------------------------------------

    def _move(self, new: PeerState) -> None:
        if new not in _MOVES[self.state]:
            raise AssertionError(f"peer connection cannot go from {self.state} to {new}")
        self.state = new

    # -- Twisted's side ---------------------------------------------------------------

    @property
    def _link(self) -> PeerTransport | None:
        return cast("PeerTransport | None", self.transport)  # see PeerTransport

    def connectionMade(self) -> None:  # noqa: N802
        link = self._link
        try:
            addr = link.getPeer() if link is not None else None
        except NotImplementedError:
            addr = None
        if isinstance(addr, (IPv4Address, IPv6Address)):
            self._peer_addr = f"{addr.host}:{addr.port}"
        self._timer = self.clock.callLater(self.timing.handshake_timeout_s, self._handshake_timeout)

    def handshakeCompleted(self) -> None:  # noqa: N802
        if self.state is not PeerState.HANDSHAKING:
            return
        self._move(PeerState.HELLO)
        self.peer_cert = self._tls().get_peer_certificate(as_cryptography=True)
        self.session_id = self._ekm()[:8]  # the same on both ends: a shared tie-breaker
        if self.client is not None:
            self._send_hello(self.client.mesh_id, self.client.key, b"client",
                             auth="token" if self.client.token_id else "mesh",
                             token_id=self.client.token_id)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.bytes_in += len(data)
        if self._meter is not None:
            self._meter(self.purpose, len(data), 0)
        if self._raw is not None:
            self._raw(data)
            return
        try:
            for frame in self._decoder.feed(data):
                if self.state is PeerState.CLOSED:
                    return
                self._frame(frame)
                if self._raw is not None:  # taken over mid-buffer
                    rest = self._decoder.take_buffer()
                    if rest:
                        self._raw(rest)
                    return
        except wire.FrameError as e:
            self.close(f"bad frame: {e}", code=CloseCode.PROTOCOL_ERROR, notify=False, abort=True)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        if self.close_reason is None:
            if self.state is PeerState.HANDSHAKING:
                self.close_reason = f"TLS handshake failed: {_failure_text(reason)}"
                log.info("peer connection with %s: %s", self.who, self.close_reason)
            else:
                self.close_reason = "connection closed by the peer"
                self.ended_by_peer = True
        was_open = self.state is PeerState.OPEN
        if self.state is not PeerState.CLOSED:
            self._move(PeerState.CLOSED)
        self._stop_timers()
        for probe in list(self._probes.values()):
            probe.callback(None)
        self._probes.clear()
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.errback(Failure(PeerClosed(self.close_reason, self._close_codes())))
        if was_open:
            self.delegate.peer_closed(self, self.close_reason)
        self.closed.callback(self.close_reason)

    # -- frames ------------------------------------------------------------------------

    def _frame(self, frame: wire.Frame) -> None:
        if self._heartbeat is not None:
            self._heartbeat.traffic_seen()
        if frame.type == FrameType.CLOSE:
            close = wire.decode_close(frame.payload)
            if self.state is not PeerState.OPEN:
                log.warning("%s refused the connection: %s", self.who, close.reason)
            self.ended_by_peer = True
            self._close(f"peer closed: {close.reason}", code=close.code, notify=False,
                        abort=False, logged=True)
            return
        if self.state is PeerState.HELLO:
            if frame.type != FrameType.HELLO:
                self.close(f"expected HELLO, got frame type {frame.type}",
                           code=CloseCode.PROTOCOL_ERROR, abort=True)
                return
            try:
                self._hello(Hello.parse(frame.json()))
            except AuthRefused as e:
                told = None
                if self.gate is not None and not e.proven and e.code not in TOLD_UNPROVEN:
                    told = UNPROVEN_REFUSAL  # the detail goes to this node's log only
                self.close(f"refused: {e}", code=e.code, told=told)
            except wire.FrameError as e:
                self.close(f"refused: {e}", code=CloseCode.BAD_HELLO)
            return
        if self.state is PeerState.CONFIRM:
            if frame.type != FrameType.READY:
                self.close(f"expected READY, got frame type {frame.type}",
                           code=CloseCode.PROTOCOL_ERROR, abort=True)
                return
            self._open()
            return
        if self.state is not PeerState.OPEN:
            self.close(f"frame type {frame.type} before the TLS handshake finished",
                       code=CloseCode.PROTOCOL_ERROR, abort=True)
            return
        if frame.type == FrameType.PING:
            self._got_ping(frame.payload)
        elif frame.type == FrameType.PONG:
            self._got_pong(frame.payload)
        elif frame.type == FrameType.HELLO:
            self.close("second HELLO on an open connection", code=CloseCode.PROTOCOL_ERROR,
                       abort=True)
        else:
            self.delegate.peer_frame(self, frame)

    def _hello(self, hello: Hello) -> None:
        versions_overlap(hello)
        if hello.node_id == self.identity.node_id:
            raise AuthRefused("connected to itself")
        try:
            check_peer_certificate(
                self.peer_cert,
                hello.node_id,
                pin_spki_sha256=self.client.pin if self.client else None,
            )
        except ValueError as e:
            raise AuthRefused(str(e)) from None
        ekm = self._ekm()
        if self.client is not None:
            if self.client.expect_node_id and hello.node_id != self.client.expect_node_id:
                raise AuthRefused(
                    f"dialled node {self.client.expect_node_id} but {hello.node_id} answered"
                )
            if hello.mesh_id != self.client.mesh_id:
                raise AuthRefused(f"peer is in mesh {hello.mesh_id}, not {self.client.mesh_id}",
                                  CloseCode.WRONG_MESH)
            key = self.client.key
            side = b"server"
        else:
            assert self.gate is not None
            ours = self.gate.mesh_id()
            if ours is None:
                raise AuthRefused("this node has not joined a mesh yet", CloseCode.WRONG_MESH)
            if hello.mesh_id != ours:
                raise AuthRefused(f"peer is in mesh {hello.mesh_id}, not {ours}",
                                  CloseCode.WRONG_MESH)
            side = b"client"
            try:
                key = self.gate.key_for(hello)
            except AuthRefused as e:
                e.proven = e.proof_key is not None and _proves(e.proof_key, side, hello, ekm)
                self.proven = e.proven
                raise
        if not _proves(key, side, hello, ekm):
            what = "invite token key" if hello.auth == "token" or (
                self.client and self.client.token_id) else "mesh secret"
            raise AuthRefused(f"wrong proof of the {what} (a different secret?)")
        self.hello = hello
        self.proven = True
        if self.gate is not None:
            try:
                self.gate.authenticated(hello)
            except AuthRefused as e:
                e.proven = True  # after the proof: the peer may read why
                raise
            self.purpose = hello.purpose
            self._send_hello(hello.mesh_id, key, b"server", auth=hello.auth,
                             token_id=hello.token_id)
            self._move(PeerState.CONFIRM)
        else:
            self.send(FrameType.READY)
            self._open()

    def _send_hello(self, mesh_id: str, key: bytes, side: bytes, *, auth: str,
                    token_id: str | None) -> None:
        body: dict[str, Any] = {
            "proto": wire.PROTOCOL_VERSION,
            "min_proto": wire.MIN_PROTOCOL_VERSION,
            "mesh_id": mesh_id,
            "node_id": self.identity.node_id,
            "incarnation": self._incarnation(),
            "purpose": self.purpose,
            "auth": auth,
            "proof": proof(key, side, mesh_id, self.identity.node_id, self._ekm()).hex(),
        }
        if token_id:
            body["token_id"] = token_id
        self.send_json(FrameType.HELLO, body)
        self._hello_sent = self.clock.seconds()

    def _tls(self) -> SSL.Connection:
        link = self._link
        if link is None:
            raise AssertionError("no transport: the TLS handshake cannot have happened")
        return link.getHandle()

    def _ekm(self) -> bytes:
        return self._tls().export_keying_material(EKM_LABEL, 32, None)

    def _open(self) -> None:
        if self._hello_sent is not None:
            # HELLO -> HELLO (dialler) or HELLO -> READY (acceptor): the peer is announced
            # with an RTT, so the split planner never takes a far peer for a near one
            self._rtt_sample(self.clock.seconds() - self._hello_sent)
        self._move(PeerState.OPEN)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._open_waiters = self._open_waiters, []
        for d in waiters:
            d.callback(self)
        self.delegate.peer_open(self)

    # -- heartbeat -----------------------------------------------------------------------

    def start_heartbeat(self, *, active: bool) -> None:
        """Watch this connection: ``active`` pings every heartbeat_s; both sides time out."""
        self._pinging = active
        self._heartbeat = Heartbeat(
            self.clock,
            self.timing.heartbeat_s,
            self.timing.heartbeat_timeout_s,
            on_timeout=self._heartbeat_timeout,
            send_ping=self._send_ping if active else None,
        )
        self._heartbeat.start()

    def _send_ping(self) -> int:
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        self._ping_sent[self._ping_seq] = self.clock.seconds()
        if len(self._ping_sent) > 16:  # unanswered pings: keep the newest few
            for seq in sorted(self._ping_sent)[:-16]:
                del self._ping_sent[seq]
        rtt_us = int((self.rtt_ms or 0) * 1000) & 0xFFFFFFFF
        self.send(FrameType.PING, PING2.pack(self._ping_seq, rtt_us))
        return self._ping_seq

    def _got_ping(self, payload: bytes) -> None:
        try:
            seq = wire.decode_ping(payload)
        except wire.FrameError as e:
            self.close(f"bad PING: {e}", code=CloseCode.PROTOCOL_ERROR, abort=True)
            return
        if not self._pinging and len(payload) >= PING2.size:
            rtt_us = PING2.unpack_from(payload)[1]
            if rtt_us:
                self.rtt_ms = rtt_us / 1000.0  # the pinging side measured it for both
        self.send(FrameType.PONG, wire.PING_BODY.pack(seq))

    def _got_pong(self, payload: bytes) -> None:
        try:
            seq = wire.decode_ping(payload)
        except wire.FrameError as e:
            self.close(f"bad PONG: {e}", code=CloseCode.PROTOCOL_ERROR, abort=True)
            return
        sent = self._ping_sent.pop(seq, None)
        if sent is not None:
            rtt = self.clock.seconds() - sent
            self._rtt_sample(rtt)
            probe = self._probes.pop(seq, None)
            if probe is not None:
                probe.callback(rtt)

    def _rtt_sample(self, seconds: float) -> None:
        self._rtt_samples.append(seconds * 1000.0)
        self.rtt_ms = round(min(self._rtt_samples), 3)

    def probe(self, timeout_s: float) -> defer.Deferred[float | None]:
        """Ping now; fires with the RTT in seconds, or None if no PONG within ``timeout_s``."""
        d: defer.Deferred[float | None] = defer.Deferred()
        if self.state is not PeerState.OPEN:
            d.callback(None)
            return d
        seq = self._send_ping()
        self._probes[seq] = d
        call = self.clock.callLater(timeout_s, self._probe_timeout, seq)

        def stop_timer(result: _T) -> _T:
            if call.active():
                call.cancel()
            return result

        d.addBoth(stop_timer)
        return d

    def _probe_timeout(self, seq: int) -> None:
        d = self._probes.pop(seq, None)
        if d is not None:
            d.callback(None)

    def silent_s(self) -> float | None:
        """Seconds since the peer's last frame; None before the heartbeat started."""
        beat = self._heartbeat
        return None if beat is None else self.clock.seconds() - beat.last_seen

    def _heartbeat_timeout(self, silent_s: float) -> None:
        self.close(f"no heartbeat for {silent_s:.1f} s", code=CloseCode.TIMEOUT, notify=False,
                   abort=True)

    def _handshake_timeout(self) -> None:
        self._timer = None
        what = "TLS handshake" if self.state is PeerState.HANDSHAKING else "HELLO"
        self.close(f"{what} not done within {self.timing.handshake_timeout_s:g} s",
                   code=CloseCode.TIMEOUT, abort=True)

    # -- sending and closing -----------------------------------------------------------------

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        link = self._link
        if self.state is PeerState.CLOSED or link is None:
            return
        data = wire.encode(frame_type, payload, max_frame_bytes=self.timing.max_frame_bytes)
        self.bytes_out += len(data)
        if self._meter is not None:
            self._meter(self.purpose, 0, len(data))
        link.write(data)

    def send_json(self, frame_type: int, body: dict[str, Any]) -> None:
        self.send(frame_type, wire.dump_json(body))

    def close(self, reason: str, *, code: CloseCode = CloseCode.OTHER, notify: bool = True,
              abort: bool = False, told: tuple[str, CloseCode] | None = None) -> None:
        """Close with ``reason`` (logged once; sent to the peer in a CLOSE frame with
        ``code`` if ``notify``, or ``told``'s reason and code instead when given).

        ``abort`` drops the TCP connection at once (a dead or hostile peer would
        never acknowledge a graceful TLS close).
        """
        self._close(reason, code=code, notify=notify, abort=abort, logged=False, told=told)

    def _close(self, reason: str, *, code: CloseCode, notify: bool, abort: bool,
               logged: bool, told: tuple[str, CloseCode] | None = None) -> None:
        """``close``; ``logged``: the peer's CLOSE, already logged when it came."""
        if self.close_reason is not None or self.state is PeerState.CLOSED:
            return
        self.close_reason = reason
        self.close_code = code
        if self.state is not PeerState.OPEN and not logged:
            log.warning("peer connection with %s closed before it opened: %s", self.who, reason)
        elif code is CloseCode.PROTOCOL_ERROR and not logged:
            # an authenticated peer sent what it should not: its operator needs to know
            log.warning("closing the connection with %s: %s", self.who, reason)
        self._stop_timers()
        if notify and self.state in (PeerState.HELLO, PeerState.CONFIRM, PeerState.OPEN):
            try:
                self.send_json(FrameType.CLOSE, wire.encode_close_body(*(told or (reason, code))))
            except wire.FrameError:
                pass
        link = self._link
        if link is None:
            return
        if abort:
            link.abortConnection()
        else:
            link.loseConnection()

    def _close_codes(self) -> frozenset[CloseCode]:
        return frozenset() if self.close_code is None else frozenset({self.close_code})

    def take_over(self, receiver: Callable[[bytes], None]) -> None:
        """From now on every byte goes to ``receiver`` (a tunnel); frames and heartbeat stop."""
        self._stop_timers()
        self._raw = receiver

    def _stop_timers(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._heartbeat is not None:
            self._heartbeat.stop()


def _failure_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error):
        return str(value.args[0] if value.args else value)[:300]
    return reason.getErrorMessage()[:300]


# -- factories and endpoints -------------------------------------------------------------


class PeerFactory(protocol.Factory):
    """Builds PeerProtocols (wrap in ``TLSMemoryBIOFactory``, see ``server_factory``)."""

    def __init__(self, build: Callable[[], PeerProtocol]):
        self._build = build

    def buildProtocol(self, addr: Any) -> PeerProtocol:  # noqa: N802
        p = self._build()
        p.factory = self
        return p


def server_factory(tls: TLSOptions, build: Callable[[], PeerProtocol],
                   clock: IReactorTime | None = None, *,
                   penalties: Penalties | None = None) -> IProtocolFactory:
    """The mesh port's factory; with ``penalties``, a source that keeps failing to
    authenticate is refused before TLS (meshd.mesh.penalties)."""
    factory = sendnow.TLSFactory(tls, False, PeerFactory(build), clock)
    if penalties is None or not penalties.enabled:
        return factory
    return _PenaltyFactory(factory, penalties)


@implementer(IProtocolFactory)
class _PenaltyFactory:
    """Wraps the mesh port's factory: refuses a penalised source at accept, and reports
    each connection that closes unproven.

    Twisted's port closes an accepted socket at once when ``buildProtocol``
    returns None, before any byte is read: the refusal costs an accept and a close.
    """

    def __init__(self, wrapped: sendnow.TLSFactory, penalties: Penalties):
        self.wrapped = wrapped
        self.penalties = penalties

    def doStart(self) -> None:  # noqa: N802 - Twisted's name
        self.wrapped.doStart()

    def doStop(self) -> None:  # noqa: N802 - Twisted's name
        self.wrapped.doStop()

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "meshd-mesh-port"

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # noqa: N802 - Twisted's name
        host = getattr(addr, "host", None)
        if not isinstance(host, str):
            return self.wrapped.buildProtocol(addr)
        if self.penalties.refuses(host):
            return None
        built = self.wrapped.buildProtocol(addr)
        if built is None:
            return None
        peer = cast(PeerProtocol, _unwrap(built))

        def closed(reason: str) -> str:
            if not peer.proven:
                self.penalties.failed(host, reason)
            return reason

        peer.closed.addCallback(closed)
        return built


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """``endpoints.wrapClientTLS``, with meshd's TLS factory (records sent at once)."""

    def __init__(self, tls: TLSOptions, endpoint: IStreamClientEndpoint):
        self._tls = tls
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        d = self._endpoint.connect(sendnow.TLSFactory(self._tls, True, factory))
        return d.addCallback(_unwrap)


def _unwrap(tls_protocol: IProtocol) -> IProtocol:
    return cast(IProtocol, cast(Any, tls_protocol).wrappedProtocol)


def connect(
    reactor: Any,
    address: tuple[str, int],
    tls: TLSOptions,
    build: Callable[[], PeerProtocol],
    *,
    timeout_s: float,
) -> defer.Deferred[PeerProtocol]:
    """Dial ``address``; fires with the OPEN connection, or fails with PeerClosed(reason)."""
    host, port = address
    endpoint = _TLSClientEndpoint(
        tls, endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout_s)
    )
    def connected(p: IProtocol) -> defer.Deferred[PeerProtocol]:
        if not isinstance(p, PeerProtocol):  # the endpoint hands back what PeerFactory built
            raise TypeError(f"connected a {type(p).__name__}, not a PeerProtocol")
        return p.when_opened()

    def failed(f: Failure) -> Failure:
        if f.check(PeerClosed):
            return f
        return Failure(PeerClosed(_connect_error(f)))

    return endpoint.connect(PeerFactory(build)).addCallback(connected).addErrback(failed)


def _connect_error(f: Failure) -> str:
    from twisted.internet import error

    if f.check(error.ConnectionRefusedError):
        return "connection refused"
    if f.check(error.TimeoutError, defer.TimeoutError):
        return "timed out"
    if f.check(error.DNSLookupError):
        return "name not found"
    if f.check(error.NoRouteError):
        return "no route to host"
    return f.getErrorMessage().splitlines()[0][:200] if f.getErrorMessage() else str(f.type)


def dial_order(addrs: tuple[str, ...] | list[str]) -> list[str]:
    """A peer's addresses to try: its loopback ones only when it has no other
    (another host's loopback address is our own host)."""
    def loop(a: str) -> bool:
        try:
            return is_loopback(parse_address(a)[0])
        except ValueError:
            return False

    others = [a for a in addrs if not loop(a)]
    return others or list(addrs)


def dial_any(reactor: Any, addrs: list[str], tls: TLSOptions,
             build: Callable[[], PeerProtocol], timeout_s: float) -> defer.Deferred[PeerProtocol]:
    """Try each address in turn; fails with PeerClosed naming every address and why."""
    result: defer.Deferred[PeerProtocol] = defer.Deferred()
    tried: list[str] = []
    codes: set[CloseCode] = set()

    def attempt(i: int) -> None:
        if i >= len(addrs):
            result.errback(PeerClosed("tried " + "; ".join(tried) if tried else "no address",
                                      codes))
            return
        try:
            host, port = parse_address(addrs[i])
        except ValueError as e:
            tried.append(f"{addrs[i]} ({e})")
            attempt(i + 1)
            return

        def failed(f: Failure) -> None:
            if isinstance(f.value, PeerClosed):
                reason = f.value.reason
                codes.update(f.value.codes)
            else:
                reason = f.getErrorMessage()
            tried.append(f"{addrs[i]} ({reason})")
            attempt(i + 1)

        connect(reactor, (host, port), tls, build, timeout_s=timeout_s).addCallbacks(
            result.callback, failed)

    attempt(0)
    return result
