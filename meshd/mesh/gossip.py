"""The mesh service: listens for peers, dials them, gossips, and keeps membership true.

Wiring only: ``meshd.mesh.peer`` authenticates connections and runs their
heartbeats, ``meshd.mesh.membership`` decides who is alive, ``meshd.mesh.invites``
issues tokens and gates who may connect, ``meshd.mesh.joining`` joins with a
token, ``meshd.mesh.addresses`` finds what to advertise; this module does the
I/O they ask for.

Gossip, in short (``docs/protocol.md`` has the frames):

- On every new control connection each side sends its ANNOUNCE (what it is)
  and a MEMBERS digest (id, incarnation and addresses of every node it is
  connected to).  A node that learns of one it is not connected to dials it:
  a chain A-B-C converges into a full mesh.
- A local change (``local_changed``) sends the new ANNOUNCE at once to every
  peer -- only when it actually changed.  A new member is passed on as a
  one-entry MEMBERS digest; nothing is sent periodically but the heartbeat.
- A lost connection or heartbeat removes the peer here and sends PEER_DOWN to
  every other peer; each verifies with a probe of its own before believing it.
  A node reported dead that still answers is told so and refutes with a higher
  incarnation.
- LEAVING removes the sender at once everywhere.
- The mesh's drop/serve decisions (``meshd.mesh.desired``) go to a peer in one
  DESIRED frame when its connection opens (even none: the joiner waits for it
  before serving a model of its own), and to every peer when they change
  (a decision made here, or one heard that won the merge: passed on to the other
  peers, so it floods and stops where nothing changes).  DROP is still sent for
  peers older than DESIRED, and heard from them as a decision.
- A node with no peer left retries its bootstrap and known nodes with back-off
  (1 s doubling up to ``[mesh] rejoin_s``); with peers, every ``rejoin_s`` it
  re-dials nodes others are connected to but it is not (a healed link), and the
  peers it lost without a LEAVING (a healed partition: nobody on this side is
  connected to the other side, so no rumor would bring them back).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.python.failure import Failure

from meshd.backoff import Backoff
from meshd.config import LISTEN_BACKLOG, Config, format_address, parse_address
from meshd.errors import Refused
from meshd.mesh import desired as desiredmod
from meshd.mesh import tokens as tokensmod
from meshd.mesh.addresses import advertise_addresses
from meshd.mesh.desired import Decision, DesiredState
from meshd.mesh.identity import Identity
from meshd.mesh.invites import Gate, Invites, welcome_body
from meshd.mesh.joining import Joiner, JoinFailed
from meshd.mesh.membership import (
    Event,
    Membership,
    PeerChanged,
    PeerDown,
    PeerLeft,
    PeerUp,
    PeerView,
    Verdict,
    view_from_announce,
)
from meshd.mesh.peer import (
    ClientAuth,
    PeerClosed,
    PeerProtocol,
    PeerState,
    Timing,
    TLSOptions,
    dial_any,
    dial_order,
    server_factory,
)
from meshd.mesh.penalties import Penalties
from meshd.mesh.wire import CloseCode, Frame, FrameError, FrameType
from meshd.metrics import DeathCause, NodeMetrics
from meshd.nodename import clean as clean_name
from meshd.nodename import label
from meshd.statedir import KnownNode, MeshState, StateDir

log = logging.getLogger("meshd.mesh.gossip")

LEAVE_BOUND_S = 1.0  # leave() fires after this long even if a peer does not take our LEAVING
# the CLOSE reason for the loser of a simultaneous dial pair (its code: CloseCode.DUPLICATE;
# the words are those older peers look for)
DUPLICATE_REASON = "duplicate connection (the other one is kept)"
RUMOR_ATTEMPTS = 5  # dial a node others report this many times before forgetting it
MAX_LOST = 64  # peers lost without a LEAVING that are re-dialled, most recent kept
DROPS_REMEMBERED = 1024  # DROP ids kept to forward each drop once


class MeshService(service.Service):
    name = "mesh"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(
        self,
        config: Config,
        state: StateDir,
        identity: Identity,
        *,
        reactor: Any,
        local_info: Callable[[], dict[str, Any]],
        desired: DesiredState | None = None,
        metrics: NodeMetrics | None = None,
    ):
        """``desired``: the node's drop/serve decisions, merged into in place as peers
        tell of theirs (the node keeps it across role changes and saves it)."""
        self.config = config
        self.metrics = metrics  # the daemon's (meshd.metrics): gossip bytes, deaths
        self.cfg = config.mesh
        self.state = state
        self.identity = identity
        self.reactor = reactor
        self.local_info = local_info
        self.node_id = identity.node_id
        state.check()  # a broken state file stops the start here, in one line naming it
        self.mesh: MeshState | None = state.load_mesh()
        self.incarnation = 0
        self.table = Membership(self.node_id, reactor)
        self.conns: dict[str, PeerProtocol] = {}
        self.invites = Invites(state, now=reactor.seconds)
        self.tls = TLSOptions(identity)
        self.penalties = Penalties(reactor, failures=self.cfg.penalty_failures,
                                   refill_s=self.cfg.penalty_s)
        self.timing = Timing(
            heartbeat_s=self.cfg.heartbeat_s,
            heartbeat_timeout_s=self.cfg.heartbeat_timeout_s,
            handshake_timeout_s=self.cfg.connect_timeout_s,
            max_frame_bytes=self.cfg.max_frame_bytes,
        )
        self.advertise: list[str] = []
        self.listening: tuple[str, int] | None = None
        self._port: IListeningPort | None = None
        self._seq = 0
        self._last_announce: dict[str, Any] | None = None
        self._dialing: set[str] = set()
        self._rumor_tries: dict[str, int] = {}
        self._addrs: dict[str, tuple[str, ...]] = {}  # each member's addresses
        self._lost_peers: dict[str, tuple[str, ...]] = {}  # peers down, not left: re-dialled
        self._lost_tries: dict[str, int] = {}
        self._backoff = Backoff.reconnect(self.cfg.rejoin_s)  # rejoin and [mesh] join retries
        self.joiner = Joiner(self, state, reactor, self._backoff)
        self._rejoin_call: IDelayedCall | None = None
        self._tend_call: IDelayedCall | None = None
        self._leaving: defer.Deferred[None] | None = None
        self._purposes: dict[str, Callable[[PeerProtocol], None]] = {}
        self._drop_listeners: list[Callable[[str, str], None]] = []
        self._drops_seen: dict[str, None] = {}  # DROP ids, oldest first (bounded)
        self.desired = desired if desired is not None else DesiredState()
        self._desired_listeners: list[Callable[[list[Decision], str], None]] = []
        self._desired_heard = False  # a peer's DESIRED frame came (learn_decisions)
        self._desired_waiters: list[defer.Deferred[bool]] = []
        self._token_purposes: set[str] = set()  # purposes an invite token may open (passive joins)
        self._local_listeners: list[Callable[[], None]] = []
        self.table.add_listener(self._membership_event)
        if metrics is not None:
            self.table.add_listener(metrics.membership_event)

    # -- the contract ---------------------------------------------------------------------

    @property
    def mesh_id(self) -> str | None:
        return self.mesh.mesh_id if self.mesh else None

    def join_status(self) -> dict[str, str] | None:
        """None in a mesh; else ``{"state": "joining"|"waiting", "reason"}`` -- why not
        (``meshd.mesh.joining.Joiner.status``), for ``meshctl status``."""
        return None if self.mesh is not None else self.joiner.status()

    def add_listener(self, cb: Callable[[Event], None]) -> None:
        """``cb(event)`` for every membership change (PeerUp/PeerChanged/PeerDown/PeerLeft)."""
        self.table.add_listener(cb)

    def peers(self) -> list[PeerView]:
        out = []
        for node_id, view in sorted(self.table.members.items()):
            conn = self.conns.get(node_id)
            out.append(view if conn is None else _with_rtt(view, conn.rtt_ms))
        return out

    def status_peers(self) -> list[dict[str, Any]]:
        """The ``peers`` list of ``meshctl status --json``."""
        return [
            {
                "name": v.name or None,  # None: a peer that sends no name (an older meshd)
                "node_id": v.node_id,
                "addr": v.addrs[0] if v.addrs else self._conn_addr(v.node_id),
                "role": v.role,
                "serving": v.serving[0] if v.serving else None,
                "vram_bytes": v.vram_bytes,
                "rtt_ms": v.rtt_ms,
                "state": v.state,
            }
            for v in self.peers()
        ]

    def local_changed(self) -> None:
        """This node's state changed: re-gossip at once, if the announce really changed."""
        self._announce_all()
        for cb in list(self._local_listeners):
            cb()

    def add_local_listener(self, cb: Callable[[], None]) -> None:
        """``cb()`` whenever ``local_changed`` is called (e.g. the passive routing table)."""
        self._local_listeners.append(cb)

    def make_token(self, ttl_s: float = 86400, once: bool = False) -> dict[str, Any]:
        return self.invites.issue(self.mesh, issuer=self.node_id, pin=self.identity.spki_sha256,
                                  addrs=self.advertise, ttl_s=ttl_s, once=once)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.invites.revoke(token_id)

    def join(self, token: str) -> defer.Deferred[dict[str, Any]]:
        """Join the mesh a token invites to (at run time); Refused says why not."""
        try:
            parsed = tokensmod.decode(token, now=self.reactor.seconds())
        except tokensmod.TokenError as e:
            return defer.fail(Refused(f"cannot use this token: {e}"))
        if self.mesh is not None and parsed.mesh_id != self.mesh.mesh_id and self.table.members:
            return defer.fail(Refused(
                f"this node is in mesh {self.mesh.mesh_id} with {len(self.table.members)} "
                f"peers; the token is for mesh {parsed.mesh_id}: leave first"))
        return self.joiner.join(parsed)

    def leave(self) -> defer.Deferred[None]:
        """Tell every peer we are leaving; fires once they have it, or after a short bound."""
        if self._leaving is not None:
            return self._leaving
        self._leaving = defer.Deferred()
        self._cancel_timers()
        conns = list(self.conns.values())
        log.info("leaving the mesh: telling %d peer(s)", len(conns))
        self.conns.clear()
        waits = []
        for conn in conns:
            conn.send_json(FrameType.LEAVING, {"incarnation": self.incarnation})
            waits.append(conn.closed)
            conn.close("left the mesh", code=CloseCode.LEAVING, notify=False)
        done = self._leaving
        if not waits:
            done.callback(None)
            return done
        bound = self.reactor.callLater(LEAVE_BOUND_S, _fire, done)

        def all_closed(_: object) -> None:
            if bound.active():
                bound.cancel()
            _fire(done)

        defer.DeferredList(waits, consumeErrors=True).addCallback(all_closed)
        return done

    def register_purpose(self, purpose: str, handler: Callable[[PeerProtocol], None], *,
                         token_join: bool = False) -> None:
        """Incoming authenticated connections with this ``purpose`` go to ``handler``
        (which calls ``peer.take_over(...)``): the seam for tunnels.

        ``token_join``: an invite token may open such a connection (a passive node
        joining: it gets the WELCOME with the mesh secret first, and never becomes
        a gossip member); other purposes need the mesh secret."""
        self._purposes[purpose] = handler
        if token_join:
            self._token_purposes.add(purpose)

    def connect_peer(self, node_id: str, purpose: str) -> defer.Deferred[PeerProtocol]:
        """An authenticated connection to member ``node_id`` for ``purpose`` (not control)."""
        view = self.table.members.get(node_id)
        if view is None or self.mesh is None:
            return defer.fail(Refused(f"node {node_id} is not a member"))
        auth = ClientAuth(self.mesh.mesh_id, self.mesh.secret, expect_node_id=node_id)
        return self.dial_addrs(list(view.addrs), auth, purpose=purpose)

    def drop_model(self, model: str) -> str:
        """Tell every node to stop serving ``model`` (a DROP, forwarded once by each)."""
        drop_id = os.urandom(8).hex()
        self._seen_drop(drop_id)
        log.info("dropping model %s mesh-wide: telling %d peer(s)", model, len(self.conns))
        body: dict[str, Any] = {"model": model, "id": drop_id, "origin": self.node_id}
        decision = self.desired.get(model)
        if decision is not None and decision.want is desiredmod.Want.DROPPED:
            body["version"] = decision.version  # older peers ignore it
        self._broadcast(FrameType.DROP, body)
        return drop_id

    def publish_desired(self, decisions: list[Decision]) -> None:
        """Tell every peer of decisions made here (already in ``self.desired``)."""
        if decisions:
            self._broadcast(FrameType.DESIRED, desiredmod.to_body(decisions))

    def learn_decisions(self, timeout_s: float) -> defer.Deferred[bool]:
        """Fires True once a peer's decisions (its DESIRED frame, sent on open) are merged;
        False after ``timeout_s``, or at once when this node has nobody to ask (a new mesh):
        a node that joins, or was away, learns of drops before it serves a model."""
        if self._desired_heard:
            return defer.succeed(True)
        boot, known = self.state.load_peers()
        if not (self.conns or self.cfg.join or boot or known):
            return defer.succeed(False)
        d: defer.Deferred[bool] = defer.Deferred()
        self._desired_waiters.append(d)

        def over() -> None:
            if d in self._desired_waiters:
                self._desired_waiters.remove(d)
                d.callback(False)

        call = self.reactor.callLater(timeout_s, over)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def add_desired_listener(self, cb: Callable[[list[Decision], str], None]) -> None:
        """``cb(decisions, via_node_id)`` when decisions heard from a peer won the merge
        (``self.desired`` holds them already): apply them, save them."""
        self._desired_listeners.append(cb)

    def add_drop_listener(self, cb: Callable[[str, str], None]) -> None:
        """``cb(model, origin_node_id)`` when another node drops a model mesh-wide."""
        self._drop_listeners.append(cb)

    def peer_unreachable(self, node_id: str, reason: str) -> None:
        """Another part (a tunnel) could not reach ``node_id``: check the control
        connection at once and remove the node if it does not answer either."""
        conn = self.conns.get(node_id)
        if conn is None:
            return
        d = conn.probe(self.cfg.verify_timeout_s)
        d.addCallback(lambda rtt: None if rtt is not None else conn.close(
            f"{reason}; no answer to a probe within {self.cfg.verify_timeout_s:g} s",
            code=CloseCode.TIMEOUT, notify=False, abort=True))

    # -- service ------------------------------------------------------------------------------

    @property
    def leaving(self) -> bool:
        """True once this node has begun to leave the mesh (no new peers from then on)."""
        return self._leaving is not None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.state.ensure()
        self.incarnation = self.state.next_incarnation()
        self._listen()
        tokens, unusable = [], []
        for i, text in enumerate(self.cfg.join):
            try:
                tokens.append(tokensmod.decode(text, now=self.reactor.seconds()))
            except tokensmod.TokenError as e:
                log.error("[mesh] join: cannot use token %d: %s", i + 1, e)
                unusable.append(f"token {i + 1}: {e}")
        if self.mesh is None and self.cfg.join:
            # asked to join: never a mesh of its own, whatever becomes of the tokens
            self.joiner.join_at_start(tokens, unusable)
        elif self.mesh is None:
            self.mesh = self.state.new_mesh()
            log.info("created a new mesh %s (this node %s is its first member)",
                     self.mesh.mesh_id, label(self.config.node.name, self.node_id))
        else:
            for t in tokens:
                if t.mesh_id != self.mesh.mesh_id:
                    log.warning("[mesh] join: ignoring a token for mesh %s: this node belongs to "
                                "mesh %s (remove %s to switch)", t.mesh_id, self.mesh.mesh_id,
                                self.state.path / "mesh.json")
                else:
                    self.joiner.add_bootstrap(t)
            self._rejoin(first=True)
        self._tend_call = self.reactor.callLater(self.cfg.rejoin_s, self._tend)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        d = self.leave()

        def stop_listening(_: None) -> defer.Deferred[None] | None:
            if self._port is not None:
                port, self._port = self._port, None
                return port.stopListening()
            return None

        d.addCallback(stop_listening)
        return d

    def _listen(self) -> None:
        host, port = parse_address(self.cfg.listen)
        factory = server_factory(self.tls, self._build_server, self.reactor,
                                 penalties=self.penalties)
        self._port = self.reactor.listenTCP(port, factory, backlog=LISTEN_BACKLOG, interface=host)
        bound = self._port.getHost()
        if isinstance(bound, (IPv4Address, IPv6Address)):
            port = bound.port  # the one the kernel chose for a :0 listen
        self.listening = (host, port)
        self.advertise = advertise_addresses(self.cfg.advertise, host, port)
        log.info("listening for peers on %s (advertised as %s)",
                 format_address(host, port), ", ".join(self.advertise) or "nothing")

    # -- building connections -------------------------------------------------------------------

    def _meter(self, purpose: str, bytes_in: int, bytes_out: int) -> None:
        if self.metrics is not None and purpose == "control":
            self.metrics.peer_bytes(bytes_in, bytes_out)

    def _build_server(self) -> PeerProtocol:
        return PeerProtocol(identity=self.identity, incarnation=lambda: self.incarnation,
                            delegate=self, clock=self.reactor, timing=self.timing,
                            gate=Gate(self, self.invites), meter=self._meter)

    def _build_client(self, auth: ClientAuth, purpose: str = "control") -> Callable[[], PeerProtocol]:
        return lambda: PeerProtocol(identity=self.identity, incarnation=lambda: self.incarnation,
                                    delegate=self, clock=self.reactor, timing=self.timing,
                                    client=auth, purpose=purpose, meter=self._meter)

    def dial_addrs(self, addrs: list[str], auth: ClientAuth, *,
                   purpose: str = "control") -> defer.Deferred[PeerProtocol]:
        """Try each address in turn; fails with JoinFailed listing every address and why."""
        d = dial_any(self.reactor, addrs, self.tls, self._build_client(auth, purpose),
                     self.cfg.connect_timeout_s)

        def failed(f: Failure) -> Failure:
            f.trap(PeerClosed)
            raise JoinFailed(f.value.reason, f.value.codes)

        return d.addErrback(failed)

    def _dial(self, node_id: str, addrs: tuple[str, ...], why: str) -> None:
        """Open a control connection to a known node, unless one exists or is being made."""
        if (node_id in self.conns or node_id in self._dialing or node_id == self.node_id
                or self.mesh is None or self._leaving is not None or not addrs):
            return
        self._dialing.add(node_id)
        auth = ClientAuth(self.mesh.mesh_id, self.mesh.secret, expect_node_id=node_id)
        d = self.dial_addrs(dial_order(addrs), auth)

        def done(result: PeerProtocol | Failure) -> None:
            self._dialing.discard(node_id)
            if isinstance(result, Failure):
                # a lost peer is re-dialled every rejoin_s: say so once, not every time
                say = log.info
                if node_id in self._lost_peers:
                    tries = self._lost_tries[node_id] = self._lost_tries.get(node_id, 0) + 1
                    say = log.debug if tries > 1 else log.info
                say("cannot reach node %s (%s): %s", self.table.label(node_id), why, result.value)
                if node_id in self.table.rumors:
                    tries = self._rumor_tries.get(node_id, 0) + 1
                    self._rumor_tries[node_id] = tries
                    if tries >= RUMOR_ATTEMPTS:
                        self.table.forget_rumor(node_id)
                        self._rumor_tries.pop(node_id, None)

        d.addBoth(done)

    def adopt_mesh(self, mesh: MeshState) -> None:
        """A token join was WELCOMEd: this node is in ``mesh`` from now on (saved)."""
        self.mesh = mesh
        self.state.save_mesh(mesh)

    # -- delegate: what connections tell us ------------------------------------------------------

    def peer_open(self, conn: PeerProtocol) -> None:
        if conn.purpose != "control":
            handler = self._purposes.get(conn.purpose)
            if handler is None or conn.is_client:
                if handler is None and not conn.is_client:
                    conn.close(f"this node does not serve connections for {conn.purpose!r}",
                               code=CloseCode.UNSUPPORTED_PURPOSE)
                return
            if conn.hello is not None and conn.hello.auth == "token":
                if conn.purpose not in self._token_purposes or self.mesh is None:
                    conn.close(f"an invite token cannot open a {conn.purpose!r} connection",
                               code=CloseCode.TOKEN_NOT_ALLOWED)
                    return
                conn.send_json(FrameType.WELCOME, welcome_body(self.mesh))
            handler(conn)
            return
        if self._leaving is not None:
            conn.close("this node is leaving the mesh", code=CloseCode.LEAVING)
            return
        node_id = conn.node_id
        assert node_id is not None and conn.hello is not None
        existing = self.conns.get(node_id)
        if existing is not None and existing is not conn:
            keep = _preferred(existing, conn, self.node_id)
            drop = conn if keep is existing else existing
            self.conns[node_id] = keep
            drop.close(DUPLICATE_REASON, code=CloseCode.DUPLICATE)
            if keep is existing:
                return
        self.conns[node_id] = conn
        conn.start_heartbeat(active=conn.is_client)
        self._backoff.reset()
        if self._rejoin_call is not None and self._rejoin_call.active():
            self._rejoin_call.cancel()
        if not conn.is_client and conn.hello.auth == "token" and self.mesh is not None:
            conn.send_json(FrameType.WELCOME, welcome_body(self.mesh))
        conn.send_json(FrameType.ANNOUNCE, self._announce_body(force=False))
        digest = self._digest(exclude=node_id)
        if digest:
            conn.send_json(FrameType.MEMBERS, {"members": digest})
        # a late joiner or a restarted node learns them here (none is news too)
        conn.send_json(FrameType.DESIRED, self.desired.to_body())

    def peer_frame(self, conn: PeerProtocol, frame: Frame) -> None:
        if self.conns.get(conn.node_id or "") is not conn:
            return  # a superseded or leaving connection's late frame
        try:
            if frame.type == FrameType.ANNOUNCE:
                self._on_announce(conn, frame.json())
            elif frame.type == FrameType.MEMBERS:
                self._on_members(conn, frame.json())
            elif frame.type == FrameType.PEER_DOWN:
                self._on_peer_down(conn, frame.json())
            elif frame.type == FrameType.LEAVING:
                self._on_leaving(conn, frame.json())
            elif frame.type == FrameType.DROP:
                self._on_drop(conn, frame.json())
            elif frame.type == FrameType.DESIRED:
                self._on_desired(conn, frame.json())
            elif frame.type == FrameType.WELCOME:
                self.joiner.welcomed(conn, frame.json())
            else:
                log.debug("ignoring frame type %d from %s (newer protocol?)", frame.type, conn.who)
        except (FrameError, ValueError, KeyError, TypeError) as e:
            conn.close(f"bad {_frame_name(frame.type)} frame: {e}", code=CloseCode.PROTOCOL_ERROR,
                       abort=True)

    def peer_closed(self, conn: PeerProtocol, reason: str) -> None:
        node_id = conn.node_id
        if node_id is None or self.conns.get(node_id) is not conn:
            return
        del self.conns[node_id]
        if conn.close_code is CloseCode.DUPLICATE:
            # the peer kept the other connection of a simultaneous dial pair, which
            # may not be open on this side yet: a loss only if it never arrives
            self.reactor.callLater(self.cfg.connect_timeout_s, self._lost_unless_back,
                                   node_id, reason)
            return
        if self.metrics is not None:
            timed_out = conn.close_code is CloseCode.TIMEOUT  # no frame for heartbeat_timeout_s
            self.metrics.connection_lost(node_id,
                                         DeathCause.HEARTBEAT if timed_out else DeathCause.CLOSED,
                                         conn.silent_s(), heartbeat=timed_out)
        self._lost(node_id, reason)

    def _lost_unless_back(self, node_id: str, reason: str) -> None:
        if node_id not in self.conns and self._leaving is None:
            if self.metrics is not None:
                self.metrics.connection_lost(node_id, DeathCause.CLOSED, None)
            self._lost(node_id, f"{reason}, and the other connection never opened")

    def _lost(self, node_id: str, reason: str) -> None:
        if self.table.lost(node_id, reason):
            incarnation = self.table.dead[node_id].incarnation
            self._broadcast(FrameType.PEER_DOWN, {"node_id": node_id, "incarnation": incarnation,
                                                  "reason": reason})
        self._after_loss()

    # -- frames -------------------------------------------------------------------------------------

    def _on_announce(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        view = view_from_announce(body)
        if view.node_id != conn.node_id:
            raise ValueError(f"announce for {view.node_id} on {conn.node_id}'s connection")
        old = self.table.members.get(view.node_id)
        conn.peer_name = view.name  # the connection's own log lines name it from now on
        self.table.announced(view)
        if old is None or view.incarnation > old.incarnation:
            self._broadcast(FrameType.MEMBERS, {"members": [_digest_entry(view)]},
                            exclude=view.node_id)

    def _on_members(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        members = body.get("members")
        if not isinstance(members, list):
            raise ValueError("members is not a list")
        for entry in members:
            node_id, inc, addrs = entry["node_id"], int(entry["incarnation"]), entry["addrs"]
            if not isinstance(node_id, str) or not isinstance(addrs, list):
                raise ValueError("bad member entry")
            addrs = tuple(str(a) for a in addrs)
            name = clean_name(entry.get("name"))
            if self.table.rumor(node_id, inc, addrs, via=conn.node_id or "?", name=name):
                self._dial(node_id, addrs, f"{self.table.label(conn.node_id or '?')} is "
                                           "connected to it")

    def _on_peer_down(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        node_id, inc, reason = body["node_id"], int(body["incarnation"]), str(body.get("reason"))
        verdict = self.table.reported(node_id, inc, conn.node_id or "?", reason)
        if verdict is Verdict.REFUTE:
            self._refute(inc)
        elif verdict is Verdict.VERIFY:
            self._verify(node_id, inc, self.table.label(conn.node_id or "?"), reason)
        elif node_id not in self.table.members:
            self.table.forget_rumor(node_id)

    def _seen_drop(self, drop_id: str) -> bool:
        """Remember ``drop_id``; True when it was already known (a forwarded copy)."""
        if drop_id in self._drops_seen:
            return True
        self._drops_seen[drop_id] = None
        while len(self._drops_seen) > DROPS_REMEMBERED:
            del self._drops_seen[next(iter(self._drops_seen))]
        return False

    def _on_drop(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        model, drop_id, origin = body["model"], body["id"], body.get("origin", "?")
        if not isinstance(model, str) or not isinstance(drop_id, str) or not model:
            raise ValueError("DROP needs a model and an id")
        if self._seen_drop(drop_id):
            return
        self._broadcast(FrameType.DROP, body, exclude=conn.node_id)
        decision = desiredmod.from_drop(model, str(origin), body.get("version"),
                                        self.desired.get(model))
        if not self._took(self.desired.merge([decision]), conn):
            held = self.desired.get(model)
            if held is not None and held.want is not desiredmod.Want.DROPPED:
                log.info("node %s dropped model %s (heard from %s), but a later decision "
                         "holds: %s by %s (version %d)", self.table.label(str(origin)), model,
                         self.table.label(conn.node_id or "?"), held.want,
                         self.table.label(held.by), held.version)
            return
        log.info("node %s dropped model %s mesh-wide (heard from %s)",
                 self.table.label(str(origin)), model, self.table.label(conn.node_id or "?"))
        for cb in list(self._drop_listeners):
            try:
                cb(model, str(origin))
            except Exception:  # a listener's bug must not break the peer connection
                log.exception("drop listener %r failed for %s", cb, model)

    def _on_desired(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        self._took(self.desired.merge(desiredmod.parse(body)), conn)
        self._desired_heard = True
        waiters, self._desired_waiters = self._desired_waiters, []
        for d in waiters:
            d.callback(True)

    def _took(self, taken: list[Decision], conn: PeerProtocol) -> bool:
        """Decisions heard on ``conn`` won the merge: pass them on to the other peers, and
        to the listeners.  False when none did (nothing new: the flood stops here)."""
        if not taken:
            return False
        via = conn.node_id or "?"
        self._broadcast(FrameType.DESIRED, desiredmod.to_body(taken), exclude=via)
        for cb in list(self._desired_listeners):
            try:
                cb(taken, via)
            except Exception:  # a listener's bug must not break the peer connection
                log.exception("desired-state listener %r failed", cb)
        return True

    def _verify(self, node_id: str, inc: int, reporter: str, reason: str) -> None:
        target = self.conns.get(node_id)
        if target is None:
            self.table.verified(node_id, False, f"reported dead by {reporter} ({reason})")
            return
        timeout = self.cfg.verify_timeout_s

        def checked(rtt: float | None) -> None:
            if rtt is not None:
                self.table.verified(node_id, True, f"it answered in {rtt * 1000:.1f} ms")
                # tell it, so it refutes with a higher incarnation everywhere
                target.send_json(FrameType.PEER_DOWN, {"node_id": node_id, "incarnation": inc,
                                                       "reason": f"{reporter}: {reason}"})
                return
            why = f"reported dead by {reporter} ({reason}); no answer to our probe within {timeout:g} s"
            if self.conns.get(node_id) is target:
                del self.conns[node_id]
            if self.metrics is not None:
                self.metrics.connection_lost(node_id, DeathCause.REPORTED, target.silent_s())
            self.table.verified(node_id, False, why)
            target.close(why, code=CloseCode.TIMEOUT, notify=False, abort=True)
            self._after_loss()

        target.probe(timeout).addCallback(checked)

    def _refute(self, reported_inc: int) -> None:
        self.incarnation = self.state.store_incarnation(max(self.incarnation, reported_inc) + 1)
        log.info("refuting a death report: now incarnation %d", self.incarnation)
        self._announce_all(force=True)

    def _on_leaving(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        node_id = conn.node_id
        assert node_id is not None
        del self.conns[node_id]
        self.table.left(node_id, int(body.get("incarnation", 0)))
        conn.close("peer left", code=CloseCode.LEAVING, notify=False)
        self._after_loss()

    # -- sending ------------------------------------------------------------------------------------

    def _announce_body(self, *, force: bool) -> dict[str, Any]:
        info = dict(self.local_info())
        for key in ("node_id", "incarnation", "seq", "addrs"):
            info.pop(key, None)
        body = {"node_id": self.node_id, "incarnation": self.incarnation,
                "addrs": list(self.advertise), **info}
        last = self._last_announce
        if force or last is None or {k: v for k, v in last.items() if k != "seq"} != body:
            self._seq += 1
        body["seq"] = self._seq
        self._last_announce = body
        return body

    def _announce_all(self, force: bool = False) -> None:
        before = self._last_announce
        body = self._announce_body(force=force)
        if before is not None and before == body:
            return
        self._broadcast(FrameType.ANNOUNCE, body)

    def _broadcast(self, frame_type: int, body: dict[str, Any], *, exclude: str | None = None) -> None:
        for node_id, conn in list(self.conns.items()):
            if node_id != exclude and conn.state is PeerState.OPEN:
                conn.send_json(frame_type, body)

    def _digest(self, *, exclude: str) -> list[dict[str, Any]]:
        return [_digest_entry(v) for k, v in self.table.members.items() if k != exclude]

    # -- membership events and rejoining ------------------------------------------------------------

    def _membership_event(self, event: Event) -> None:
        self._note_lost(event)
        self._save_known()

    def _note_lost(self, event: Event) -> None:
        """Remember peers that went down without leaving, for ``_tend`` to re-dial."""
        if isinstance(event, (PeerUp, PeerChanged)):
            self._addrs[event.node.node_id] = event.node.addrs
            self._lost_peers.pop(event.node.node_id, None)
            self._lost_tries.pop(event.node.node_id, None)
        elif isinstance(event, PeerDown):
            addrs = self._addrs.pop(event.node_id, ())
            if addrs:
                self._lost_peers.pop(event.node_id, None)
                self._lost_peers[event.node_id] = addrs
                while len(self._lost_peers) > MAX_LOST:
                    del self._lost_peers[next(iter(self._lost_peers))]
        elif isinstance(event, PeerLeft):
            self._addrs.pop(event.node_id, None)
            self._lost_peers.pop(event.node_id, None)
            self._lost_tries.pop(event.node_id, None)

    def _save_known(self) -> None:
        boot, known = self.state.load_peers()
        merged = {k.node_id: k for k in known}
        for view in self.table.members.values():
            merged[view.node_id] = KnownNode(view.node_id, view.addrs)
        # keep the 64 most recent: members first
        ordered = [merged[k] for k in self.table.members] + [
            v for k, v in merged.items() if k not in self.table.members]
        try:
            self.state.save_peers(boot, ordered[:64])
        except Exception as e:  # noqa: BLE001 - a full disk must not break membership
            log.warning("cannot save known peers: %s", e)

    def _after_loss(self) -> None:
        if not self.conns and self._leaving is None and self.running:
            self._schedule_rejoin()

    def _schedule_rejoin(self) -> None:
        if self._rejoin_call is not None and self._rejoin_call.active():
            return
        delay = self._backoff.next_delay()
        log.info("no peers left; retrying known nodes in %.1f s", delay)
        self._rejoin_call = self.reactor.callLater(delay, self._rejoin)

    def _rejoin(self, first: bool = False) -> None:
        self._rejoin_call = None
        if self.conns or self._leaving is not None:
            return
        boot, known = self.state.load_peers()
        targets = {k.node_id: k.addrs for k in boot + known}
        for node_id, rumor in self.table.rumors.items():
            targets.setdefault(node_id, rumor.addrs)
        targets.pop(self.node_id, None)
        if targets:
            log.info("%s: dialling %d known node(s)", "rejoining" if first else "retrying",
                     len(targets))
        for node_id, addrs in targets.items():
            self._dial(node_id, addrs, "rejoin")
        if not first or targets:
            self._schedule_rejoin()

    def _tend(self) -> None:
        """Every rejoin_s: with peers, re-dial nodes others are connected to and we are not."""
        self._tend_call = self.reactor.callLater(self.cfg.rejoin_s, self._tend)
        if not self.conns:
            return
        for node_id, rumor in list(self.table.rumors.items()):
            self._dial(node_id, rumor.addrs, f"{self.table.label(rumor.via)} is connected to it")
        for node_id, addrs in list(self._lost_peers.items()):
            self._dial(node_id, addrs, "lost without leaving: a partition may have healed")

    def _cancel_timers(self) -> None:
        for call in (self._rejoin_call, self._tend_call):
            if call is not None and call.active():
                call.cancel()
        self._rejoin_call = self._tend_call = None
        self.joiner.cancel()

    def _conn_addr(self, node_id: str) -> str:
        conn = self.conns.get(node_id)
        return conn.peer_address if conn else "?"


def _preferred(a: PeerProtocol, b: PeerProtocol, self_id: str) -> PeerProtocol:
    """Of two control connections to one node, the one both ends keep.

    A newer incarnation of the peer wins (it restarted); between equals, the
    connection dialled by the smaller node id, so both ends choose the same one.
    """
    ia, ib = a.hello.incarnation, b.hello.incarnation  # type: ignore[union-attr]
    if ia != ib:
        return a if ia > ib else b

    def rank(c: PeerProtocol) -> tuple[str, bytes]:
        return (self_id if c.is_client else (c.node_id or "")), c.session_id

    return a if rank(a) <= rank(b) else b


def _digest_entry(view: PeerView) -> dict[str, Any]:
    entry = {"node_id": view.node_id, "incarnation": view.incarnation, "addrs": list(view.addrs)}
    if view.name:  # optional: a digest without names (an older meshd) is as good
        entry["name"] = view.name
    return entry


def _with_rtt(view: PeerView, rtt_ms: float | None) -> PeerView:
    from dataclasses import replace

    return replace(view, rtt_ms=rtt_ms)


def _fire(d: defer.Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


def _frame_name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return str(frame_type)
