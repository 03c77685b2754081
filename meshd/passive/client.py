"""The passive side's one connection: check in with an active node, fetch and keep the table.
"""

from __future__ import annotations

import logging
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from meshd.backoff import Backoff
from meshd.mesh import tokens as tokensmod
from meshd.mesh import wire
from meshd.mesh.identity import Identity
from meshd.mesh.invites import parse_welcome
from meshd.mesh.peer import (
    ClientAuth,
    PeerClosed,
    PeerProtocol,
    PeerState,
    Timing,
    TLSOptions,
    dial_any,
    dial_order,
)
from meshd.mesh.wire import CloseCode, FrameType
from meshd.nodename import label
from meshd.serving.routetable import (
    CheckIn,
    RouteTable,
    checkin_order,
)
from meshd.statedir import KnownNode, MeshState

PURPOSE = "route"
REFRESH_JITTER = 0.1  # refreshes are spread +-10 % so many clients do not tick together


log = logging.getLogger(__name__)

# -- the passive side: one connection, the table ------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Somewhere to check in: an active node of the last table, a bootstrap token's issuer,
    or (last) a standby of the last table, which answers once it promoted."""

    node_id: str
    addrs: tuple[str, ...]
    token: tokensmod.Token | None = None  # from [mesh] join
    standby: bool = False


class _NoDelegate:
    """A tunnel's connection before the tunnel takes it over: nothing to do."""

    def peer_open(self, conn: PeerProtocol) -> None:
        pass

    def peer_frame(self, conn: PeerProtocol, frame: wire.Frame) -> None:
        pass

    def peer_closed(self, conn: PeerProtocol, reason: str) -> None:
        pass


class RouteClient:
    """The passive side of the route protocol: which active node, when to ask, failover.

    ``on_table(table)`` gets every new table (pushed or answered); ``on_mesh(state)``
    the mesh id and secret a token join was WELCOMEd with.  All timing goes
    through ``reactor`` (a ``Clock`` in tests) and ``connect_fn`` is the dial seam.
    """

    def __init__(self, *, reactor: Any, identity: Identity, kind: str,
                 checkin: Callable[[str | None], CheckIn], timing: Timing,
                 refresh_s: float, answer_timeout_s: float, rejoin_max_s: float,
                 mesh: MeshState | None = None, tokens: list[tokensmod.Token] | None = None,
                 known: list[KnownNode] | None = None,
                 on_table: Callable[[RouteTable], None] = lambda t: None,
                 on_mesh: Callable[[MeshState], None] = lambda m: None,
                 on_unreachable: Callable[[str], None] = lambda why: None,
                 connect_fn: Callable[[Target, ClientAuth], defer.Deferred[PeerProtocol]]
                 | None = None,
                 random: Callable[[], float] = _random.random):
        self.reactor = reactor
        self.identity = identity
        self.node_id = identity.node_id
        self.kind = kind
        self._checkin = checkin
        self.timing = timing
        self.refresh_s = refresh_s
        self.answer_timeout_s = answer_timeout_s
        self.mesh = mesh
        self.tokens = list(tokens or [])
        self.known = list(known or [])
        self.on_table = on_table
        self.on_mesh = on_mesh
        self.on_unreachable = on_unreachable
        self._random = random
        self.tls = TLSOptions(identity)
        self._connect = connect_fn or self._dial
        self.conn: PeerProtocol | None = None
        self.via: str | None = None  # the active node we check in with
        self.table: RouteTable | None = None
        self.table_at: float | None = None  # when the table last proved current
        self.tables = 0  # new tables received
        self.requests = 0
        self._round: list[Target] = []
        self._failed: set[str] = set()
        self._unreached: set[str] = set()  # failed to connect since the last answer
        self._told = False  # on_unreachable was called in this round
        self._connecting = False
        self._waiting: IDelayedCall | None = None  # the answer timer of the request in flight
        self._refresh_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._backoff = Backoff.reconnect(rejoin_max_s, random=random)
        self._stopped = True
        self.history: list[tuple[float, str]] = []  # (time, what) of the last few switches

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._next_round("start")

    def stop(self) -> None:
        self._stopped = True
        for call in (self._waiting, self._refresh_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._waiting = self._refresh_call = self._retry_call = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close("passive node stopping", code=CloseCode.STOPPING)

    def refresh_now(self, reason: str) -> None:
        """Ask for the table at once (a tunnel failed); connect if there is no connection."""
        if self._stopped:
            return
        log.info("refreshing the routing table now: %s", reason)
        if self.conn is not None:
            if self._waiting is None:
                self._request()
        elif not self._connecting and self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
            self._retry_call = None
            self._next_round(reason)

    # -- where to check in --------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        """Every place to try, in order: the last table's active nodes, then the tokens, then
        nodes known from the state directory, then the last table's standbys (when every
        active node is gone, the one that promoted is where the mesh went on)."""
        out: list[Target] = []
        seen: set[str] = set()
        if self.table is not None and self.mesh is not None:
            for node_id in checkin_order(self.table.active_ids(), self.node_id, self.kind):
                out.append(Target(node_id, self.table.addrs_of(node_id)))
                seen.add(node_id)
        for token in self.tokens:
            if token.issuer not in seen:
                out.append(Target(token.issuer, token.addrs, token))
                seen.add(token.issuer)
        if self.mesh is not None:
            for k in self.known:
                if k.node_id not in seen and k.node_id != self.node_id:
                    out.append(Target(k.node_id, k.addrs))
                    seen.add(k.node_id)
        if self.table is not None and self.mesh is not None:
            for node_id, addrs in self.table.standby_addrs():
                if node_id not in seen and node_id != self.node_id:
                    out.append(Target(node_id, addrs, standby=True))
                    seen.add(node_id)
        return out

    def _auth(self, target: Target) -> ClientAuth | None:
        token = target.token
        if self.mesh is not None and (token is None or token.mesh_id == self.mesh.mesh_id):
            return ClientAuth(self.mesh.mesh_id, self.mesh.secret, expect_node_id=target.node_id,
                              pin=token.pin if token else None)
        if token is not None:
            return ClientAuth(token.mesh_id, token.key, token_id=token.token_id,
                              expect_node_id=token.issuer, pin=token.pin)
        return None

    def _next_round(self, why: str) -> None:
        """Start over: every target but the one just lost (the next round has it again)."""
        targets = self.targets()
        self._round = [t for t in targets if t.node_id not in self._failed]
        self._failed = set()
        self._told = False
        if not self._round and not targets:
            log.error("no active node to check in with and no [mesh] join token: this passive "
                      "node cannot reach the mesh")
        self._try_next(why)

    def _try_next(self, why: str) -> None:
        if self._stopped or self.conn is not None or self._connecting:
            return
        while self._round:
            if self._round[0].standby and self._tell_unreachable(why):
                return  # decided to promote: this passive node stops
            target = self._round.pop(0)
            auth = self._auth(target)
            if auth is None:
                continue
            self._connecting = True
            d = self._connect(target, auth)
            d.addCallbacks(self._connected, self._connect_failed,
                           callbackArgs=(target,), errbackArgs=(target,))
            return
        delay = self._backoff.next_delay()
        log.warning("no active node answered (%s); trying again in %.1f s", why, delay)
        self._retry_call = self.reactor.callLater(delay, self._retry)
        self._tell_unreachable(why)  # may promote, and stop this

    def _tell_unreachable(self, why: str) -> bool:
        """Once a round, as soon as every active node and token failed (before the standbys
        are dialled: a standby deciding to promote need not wait on the others' dials):
        ``on_unreachable``.  True when that stopped this client."""
        if self._told or not self.all_unreachable():
            return False
        self._told = True
        self.on_unreachable(why)
        return self._stopped

    def all_unreachable(self) -> bool:
        """A full round failed: every active node of the last table and every token's issuer
        refused or timed out a connection since the last answer (a lost connection alone
        does not count: the node it went to is dialled once more first)."""
        if self.table is None:
            return False
        needed = set(self.table.active_ids()) | {t.issuer for t in self.tokens}
        return needed <= self._unreached

    def _retry(self) -> None:
        self._retry_call = None
        self._next_round("retry")

    def _dial(self, target: Target, auth: ClientAuth) -> defer.Deferred[PeerProtocol]:
        def build() -> PeerProtocol:
            return PeerProtocol(identity=self.identity, incarnation=lambda: 0, delegate=self,
                                clock=self.reactor, timing=self.timing, client=auth,
                                purpose=PURPOSE)

        return dial_any(self.reactor, dial_order(target.addrs), self.tls, build,
                        self.timing.handshake_timeout_s)

    def _connected(self, conn: PeerProtocol, target: Target) -> None:
        self._connecting = False
        if self._stopped or conn.state is not PeerState.OPEN:
            conn.close("passive node stopping", code=CloseCode.STOPPING)
            return
        self.conn = conn
        self.via = target.node_id
        self._unreached.discard(target.node_id)
        self._note(f"checking in with {target.node_id}" + (" (token)" if target.token else ""))
        log.info("checking in with active node %s at %s", self._label(target.node_id),
                 conn.peer_address)
        self._request()

    def _connect_failed(self, failure: Failure, target: Target) -> None:
        self._connecting = False
        reason = failure.value.reason if failure.check(PeerClosed) else failure.getErrorMessage()
        log.info("cannot check in with %s: %s", self._label(target.node_id), reason)
        self._unreached.add(target.node_id)
        self._try_next(f"{target.node_id}: {reason}")

    # -- requests and answers ---------------------------------------------------------------------

    def _request(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        delay = self.refresh_s * (1 + REFRESH_JITTER * (2 * self._random() - 1))
        self._refresh_call = self.reactor.callLater(delay, self._request)
        if self._waiting is not None and self._waiting.active():
            return  # one request at a time: the answer to the one in flight will do
        etag = self.table.etag if self.table is not None and self.table.source == self.via else None
        self.requests += 1
        conn.send_json(FrameType.ROUTE_REQUEST, self._checkin(etag).to_body())
        self._waiting = self.reactor.callLater(self.answer_timeout_s, self._no_answer, conn)

    def _no_answer(self, conn: PeerProtocol) -> None:
        self._waiting = None
        if conn is self.conn:
            conn.close(f"no routing table within {self.answer_timeout_s:g} s",
                       code=CloseCode.TIMEOUT, abort=True)

    def peer_open(self, conn: PeerProtocol) -> None:
        pass

    def peer_frame(self, conn: PeerProtocol, frame: wire.Frame) -> None:
        if conn is not self.conn and frame.type != FrameType.WELCOME:
            return
        try:
            if frame.type == FrameType.WELCOME:
                self.mesh = parse_welcome(frame.json())
                log.info("joined mesh %s as a passive %s via %s", self.mesh.mesh_id, self.kind,
                         conn.node_id)
                self.on_mesh(self.mesh)
            elif frame.type == FrameType.ROUTE_TABLE:
                self._answer(conn, frame.json())
        except (wire.FrameError, ValueError, KeyError, TypeError) as e:
            conn.close(f"bad {FrameType(frame.type).name} frame: {e}",
                       code=CloseCode.PROTOCOL_ERROR, abort=True)

    def _answer(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        now = self.reactor.seconds()
        self._backoff.reset()
        self._unreached.clear()
        if body.get("same") is True and self.table is not None and body.get("etag") == self.table.etag:
            self.table_at = now
            return
        table = RouteTable.from_body(body)
        if self.mesh is not None and table.mesh_id != self.mesh.mesh_id:
            raise ValueError(f"table of mesh {table.mesh_id}, we are in {self.mesh.mesh_id}")
        self.table = table
        self.table_at = now
        self.tables += 1
        self.on_table(table)

    def peer_closed(self, conn: PeerProtocol, reason: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        gone = self.via
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        if self._stopped:
            return
        self._note(f"lost {gone}: {reason}")
        log.warning("lost the active node %s (%s): trying the next one",
                    self._label(gone or "?"), reason)
        self._failed = {gone} if gone else set()
        self._next_round(f"{gone} lost")

    def _label(self, node_id: str) -> str:
        """An active node for a log line: with its name when the last table has one."""
        return label(self.table.name_of(node_id) if self.table is not None else "", node_id)

    def _note(self, what: str) -> None:
        self.history = [*self.history[-9:], (self.reactor.seconds(), what)]

    # -- what others ask --------------------------------------------------------------------------

    def dialer(self) -> PassiveDialer:
        return PassiveDialer(self)


class PassiveDialer:
    """What ``meshd.serving.tunnel.TunnelEndpoint`` needs of a mesh, for a passive node:
    authenticated connections to the hosts of its table, and a way to say one failed."""

    def __init__(self, client: RouteClient):
        self.client = client

    def connect_peer(self, node_id: str, purpose: str) -> defer.Deferred[PeerProtocol]:
        c = self.client
        addrs = c.table.addrs_of(node_id) if c.table is not None else ()
        if c.mesh is None or not addrs:
            return defer.fail(PeerClosed(f"node {node_id} is not in the routing table"))
        auth = ClientAuth(c.mesh.mesh_id, c.mesh.secret, expect_node_id=node_id)

        def build() -> PeerProtocol:
            return PeerProtocol(identity=c.identity, incarnation=lambda: 0, delegate=_NoDelegate(),
                                clock=c.reactor, timing=c.timing, client=auth, purpose=purpose)

        return dial_any(c.reactor, dial_order(addrs), c.tls, build, c.timing.handshake_timeout_s)

    def peer_unreachable(self, node_id: str, reason: str) -> None:
        self.client.refresh_now(f"tunnel to {node_id} failed: {reason}")
