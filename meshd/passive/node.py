"""Passive nodes: API-only clients and standby GPUs, on one lightweight path.

A passive node (``[node] client = true`` / ``--client``, or ``[node] standby =
true``) never gossips and is in nobody's peer list.  It keeps ONE connection
(purpose ``"route"``) to one active node, asks it for the routing table
(``ROUTE_REQUEST`` -> ``ROUTE_TABLE``, ``meshd.serving.routetable``) every ``[mesh]
refresh_s`` and at once when a tunnel fails, and serves every model in the
table on its own API through tunnels (``meshd.serving.tunnel``) to the hosts, the
host chosen by the host-selection hook.  The active node also pushes the table
down that connection when it changes (a host died, a model appeared), which
is what lets a standby promote within a second of a host's death.

Which active node: standbys the lowest node id of the last table (so every
standby sees the same standby listing and the promotion tie-break agrees),
clients ``hash(node id) % n``; when it is unreachable (connection lost, no
answer within ``[mesh] connect_timeout_s``) the next one of the last table,
and only when every one failed the bootstrap tokens (``[mesh] join``) -- then
again after a back-off (1 s doubling up to ``[mesh] rejoin_s``).

Identity: a client makes a fresh key and node id in memory at every start and
writes nothing (so it can sit beside a GPU node on the same machine, even with
the same state directory); it needs a token every start and holds the mesh
secret only in memory.  A standby uses the state directory like any node (it
may become active: its node id must be stable), saves the mesh secret it is
WELCOMEd with and the active nodes of its last table (``peers.json``), so once
promoted it rejoins the gossip with them.

Promotion (standby only): at every table it asks ``placement.should_promote``
with the table as the mesh view (active nodes, loading hosts counted as hosts,
every standby listed -- those of the last tables kept for 3 refreshes); the
default promotes when a model it has on disk and that fits has no host, with
a deterministic tie-break (VRAM, then node id) among the standbys.  Promotion
is the daemon's business (``on_promote``): stop this, start llama-server,
join the gossip.  When a full round of check-ins failed (every active node of
the last table and every token refused a dial since the last answer), it asks
the same hook with that table's active nodes taken as dead: the only host of a
model and the only active node may die together.

An active node that joined without a model and that assignment gives nothing
becomes a standby (:func:`stand_by`, the reverse of :func:`promote`): it
leaves the gossip and checks in here, with its identity and the mesh secret.

The active side is :class:`RouteServer`: it builds the table once per
membership change and answers every request with the same encoded bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.python.failure import Failure

from meshd.config import Config
from meshd.mesh import tokens as tokensmod
from meshd.mesh import wire
from meshd.mesh.membership import Backoff
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
from meshd.mesh.wire import FrameType
from meshd.placement import rules as placement
from meshd.placement.snapshot import ModelFile, NodeView
from meshd.serving import routing
from meshd.serving.routetable import (
    PRESENT_REFRESHES,
    Answers,
    CheckIn,
    NodeEntry,
    PassiveRegistry,
    RouteTable,
    StandbyMemory,
    build_table,
    checkin_order,
    host_views,
    table_view,
)
from meshd.statedir import KnownNode, MeshState, StateDir

log = logging.getLogger("meshd.passive.node")

PURPOSE = "route"
REFRESH_JITTER = 0.1  # refreshes are spread +-10 % so many clients do not tick together


# -- the active side --------------------------------------------------------------------------


class RouteServer(service.Service):
    """Answers passive nodes on ``"route"`` connections, pushes table changes, counts them.

    Cheap by construction: the table is rebuilt only after a change (membership
    event, local change, a standby appearing or leaving) and its encoded
    payload is reused for every request; a request from a passive node holding
    the current table gets ``{"etag", "same": true}``.  A check-in costs the
    parse of its (small) request, a dict lookup and the send.
    """

    name = "route-server"

    def __init__(self, mesh: Any, node: Any, *, clock: Any, refresh_s: float):
        self.mesh = mesh
        self.node = node
        self.clock = clock
        self.refresh_s = refresh_s
        self.registry = PassiveRegistry()
        self._answers: Answers | None = None
        self._pending: dict[PeerProtocol, float] = {}  # open, no check-in yet
        self._push_call: Any = None
        self._sweep: task.LoopingCall | None = None
        mesh.register_purpose(PURPOSE, self._accept, token_join=True)
        mesh.add_listener(lambda event: self.changed())
        mesh.add_local_listener(self.changed)

    # -- the table ---------------------------------------------------------------------------

    @property
    def answers(self) -> Answers:
        if self._answers is None:
            self._answers = Answers(self.mesh.node_id, self.mesh.incarnation, self._build)
        return self._answers

    def _build(self) -> RouteTable:
        info = self.node.local_info()
        me = NodeEntry(
            node_id=self.mesh.node_id, role=info.get("role", "idle"),
            vram_bytes=int(info.get("vram_bytes", 0)), addrs=tuple(self.mesh.advertise),
            serving=tuple(info.get("serving", ())), loading=tuple(info.get("loading", ())),
            available_models=tuple(ModelFile(m["name"], m["size_bytes"])
                                   for m in info.get("available_models", ())))
        nodes = [me]
        for p in self.mesh.peers():
            nodes.append(NodeEntry(
                node_id=p.node_id, role=p.role, vram_bytes=p.vram_bytes, addrs=tuple(p.addrs),
                serving=tuple(p.serving), loading=tuple(getattr(p, "loading", ())),
                available_models=tuple(ModelFile(m.name, m.size_bytes)
                                       for m in p.available_models)))
        router = getattr(self.node, "router", None)
        own_load = router.load_of(self.mesh.node_id) if router is not None else 0
        return build_table(mesh_id=self.mesh.mesh_id or "", source=self.mesh.node_id,
                           nodes=nodes, standby=self.registry.standbys(),
                           load=lambda nid: own_load if nid == self.mesh.node_id else 0)

    def changed(self) -> None:
        """Something in the table may have changed: rebuild lazily, push once (coalesced)."""
        self.answers.invalidate()
        if self._push_call is None and self.registry.entries:
            self._push_call = self.clock.callLater(0, self._push)

    def _push(self) -> None:
        self._push_call = None
        etag, full, _ = self.answers.current()
        pushed = 0
        for conn, entry in list(self.registry.entries.items()):
            if entry.sent_etag != etag:
                entry.sent_etag = etag
                conn.send(FrameType.ROUTE_TABLE, full)
                pushed += 1
        if pushed:
            log.debug("routing table %s pushed to %d passive node(s)", etag, pushed)

    # -- what status and placement read --------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {**self.registry.counts(self.clock.seconds()), "requests": self.registry.requests}

    def standby_views(self) -> list[NodeView]:
        return [s.view() for s in self.registry.standbys()]

    # -- connections ------------------------------------------------------------------------------

    def _accept(self, conn: PeerProtocol) -> None:
        conn.delegate = self  # its frames and its end come here, not to the gossip
        self._pending[conn] = self.clock.seconds()
        log.debug("passive node %s connected from %s", conn.node_id, conn.peer_address)

    def peer_open(self, conn: PeerProtocol) -> None:  # pragma: no cover - opened before we own it
        pass

    def peer_frame(self, conn: PeerProtocol, frame: wire.Frame) -> None:
        if frame.type != FrameType.ROUTE_REQUEST:
            return  # newer frame types, or gossip a passive node has no business sending
        try:
            req = CheckIn.from_body(frame.json())
        except (wire.FrameError, ValueError) as e:
            conn.close(f"bad ROUTE_REQUEST: {e}", abort=True)
            return
        self._pending.pop(conn, None)
        if self.registry.check_in(conn, conn.node_id or "?", req, self.clock.seconds()):
            self.answers.invalidate()  # a standby appeared or changed: it is in the listing
            self.changed()
        answers = self.answers
        payload = answers.answer(req.etag)
        entry = self.registry.entries[conn]
        entry.sent_etag = answers.etag
        conn.send(FrameType.ROUTE_TABLE, payload)

    def peer_closed(self, conn: PeerProtocol, reason: str) -> None:
        self._pending.pop(conn, None)
        entry = self.registry.entries.get(conn)
        if entry is not None:
            log.debug("passive %s %s gone: %s", entry.kind, entry.node_id, reason)
        if self.registry.drop(conn):
            self.changed()

    def sweep(self) -> None:
        """Close connections whose passive node stopped checking in (3 refreshes)."""
        now = self.clock.seconds()
        for conn in self.registry.expired(now):
            entry = self.registry.entries[conn]
            conn.close(f"no check-in for {now - entry.last_s:.0f} s", abort=True)
            if self.registry.drop(conn):
                self.changed()
        limit = PRESENT_REFRESHES * self.refresh_s
        for conn, since in list(self._pending.items()):
            if now - since > limit:
                del self._pending[conn]
                conn.close("no ROUTE_REQUEST", abort=True)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._sweep = task.LoopingCall(self.sweep)
        self._sweep.clock = self.clock
        self._sweep.start(self.refresh_s, now=False)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._push_call is not None and self._push_call.active():
            self._push_call.cancel()
        for conn in [*self.registry.entries, *self._pending]:
            conn.close("this node is stopping")  # they move to the next active node at once


# -- the passive side: one connection, the table ------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Somewhere to check in: an active node of the last table, or a bootstrap token's issuer."""

    node_id: str
    addrs: tuple[str, ...]
    token: tokensmod.Token | None = None  # from [mesh] join


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

    def __init__(self, *, reactor: Any, identity: Any, kind: str,
                 checkin: Callable[[str | None], CheckIn], timing: Timing,
                 refresh_s: float, answer_timeout_s: float, rejoin_max_s: float,
                 mesh: MeshState | None = None, tokens: list[tokensmod.Token] | None = None,
                 known: list[KnownNode] | None = None,
                 on_table: Callable[[RouteTable], None] = lambda t: None,
                 on_mesh: Callable[[MeshState], None] = lambda m: None,
                 on_unreachable: Callable[[str], None] = lambda why: None,
                 connect_fn: Callable[..., defer.Deferred[PeerProtocol]] | None = None,
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
        self._connecting = False
        self._waiting: Any = None  # the answer timer of the request in flight
        self._refresh_call: Any = None
        self._retry_call: Any = None
        self._backoff = Backoff(min(1.0, rejoin_max_s), rejoin_max_s, random=random)
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
            conn.close("passive node stopping")

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
        nodes known from the state directory."""
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
        if not self._round and not targets:
            log.error("no active node to check in with and no [mesh] join token: this passive "
                      "node cannot reach the mesh")
        self._try_next(why)

    def _try_next(self, why: str) -> None:
        if self._stopped or self.conn is not None or self._connecting:
            return
        while self._round:
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
        if self.all_unreachable():
            self.on_unreachable(why)  # may promote, and stop this

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
            conn.close("passive node stopping")
            return
        self.conn = conn
        self.via = target.node_id
        self._unreached.discard(target.node_id)
        self._note(f"checking in with {target.node_id}" + (" (token)" if target.token else ""))
        log.info("checking in with active node %s at %s", target.node_id, conn.peer_address)
        self._request()

    def _connect_failed(self, failure: Failure, target: Target) -> None:
        self._connecting = False
        reason = failure.value.reason if failure.check(PeerClosed) else failure.getErrorMessage()
        log.info("cannot check in with %s: %s", target.node_id, reason)
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
            conn.close(f"no routing table within {self.answer_timeout_s:g} s", abort=True)

    def peer_open(self, conn: PeerProtocol) -> None:
        pass

    def peer_frame(self, conn: PeerProtocol, frame: wire.Frame) -> None:
        if conn is not self.conn and frame.type != FrameType.WELCOME:
            return
        try:
            if frame.type == FrameType.WELCOME:
                body = frame.json()
                self.mesh = MeshState(str(body["mesh_id"]), base64.b64decode(body["secret"]))
                log.info("joined mesh %s as a passive %s via %s", self.mesh.mesh_id, self.kind,
                         conn.node_id)
                self.on_mesh(self.mesh)
            elif frame.type == FrameType.ROUTE_TABLE:
                self._answer(conn, frame.json())
        except (wire.FrameError, ValueError, KeyError, TypeError) as e:
            conn.close(f"bad {FrameType(frame.type).name} frame: {e}", abort=True)

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
        log.warning("lost the active node %s (%s): trying the next one", gone, reason)
        self._failed = {gone} if gone else set()
        self._next_round(f"{gone} lost")

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


# -- routing requests from the table ----------------------------------------------------------------


class PassiveRouter:
    """The API's :class:`meshd.serving.routing.Router` on a passive node: every model of the table,
    each request to a host chosen by the host-selection hook, one failover host after it."""

    def __init__(self, self_id: str, *, endpoint_for: Callable[[str, str], Any],
                 on_failure: Callable[[str, str], None] = lambda n, r: None,
                 policy: Any = None, started_at: float | None = None):
        self.self_id = self_id
        self.endpoint_for = endpoint_for
        self.on_failure = on_failure
        self.policy = policy
        self.table: RouteTable | None = None
        self.failed: set[str] = set()  # hosts a request failed on since the last table
        self.in_flight: dict[str, int] = {}
        self._view: Any = None
        self._created = int(started_at if started_at is not None else time.time())

    def update(self, table: RouteTable) -> None:
        self.table = table
        self.failed.clear()
        self._view = None

    def _mesh_view(self) -> Any:
        if self._view is None:
            assert self.table is not None
            self._view = table_view(self.table, NodeView(self.self_id, role="client"))
        return self._view

    def models(self) -> list[dict[str, Any]]:
        table = self.table
        if table is None:
            return []
        out = []
        for name in table.models():
            every = table.hosts_of(name, state=None)
            warm = [h.node_id for h in every if h.state == "warm"]
            out.append({"id": name, "object": "model", "created": self._created,
                        "owned_by": "meshd",
                        "meshd": {"hosts": warm, "nodes": len({h.node_id for h in every}),
                                  "state": "warm" if warm else "loading"}})
        return out

    def upstreams(self, model: str, client_id: str) -> list[routing.Upstream]:
        table = self.table
        if table is None:
            raise routing.NotReady(model, "this passive node has no routing table yet", 2)
        if not table.hosts_of(model, state=None):
            raise routing.UnknownModel(model, table.models())
        warm = table.hosts_of(model)
        if not warm:
            raise routing.NotReady(model, "its host is loading it", 5)
        usable = [h for h in warm if h.node_id not in self.failed] or list(warm)
        views = host_views(usable)
        mesh = self._mesh_view()
        first = placement.choose_host(model, client_id, views, mesh, policy=self.policy)
        order = [first]
        rest = tuple(v for v in views if v.node_id != first)
        if rest:
            order.append(placement.choose_host(model, client_id, rest, mesh, policy=self.policy))
        return [self._upstream(node_id, model) for node_id in order]

    def _upstream(self, node_id: str, model: str) -> routing.Upstream:
        return routing.Upstream(name=node_id,
                                endpoint=lambda: self.endpoint_for(node_id, model),
                                pool_key=f"tunnel:{node_id}:{model}")

    def upstream_failed(self, upstream: routing.Upstream, reason: str) -> None:
        log.warning("host %s failed before answering: %s", upstream.name, reason)
        self.failed.add(upstream.name)
        self.on_failure(upstream.name, reason)

    def request_started(self, upstream: routing.Upstream) -> None:
        self.in_flight[upstream.name] = self.in_flight.get(upstream.name, 0) + 1

    def request_finished(self, upstream: routing.Upstream) -> None:
        self.in_flight[upstream.name] = max(0, self.in_flight.get(upstream.name, 1) - 1)


# -- the whole passive node ---------------------------------------------------------------------------


class PassiveNode(service.Service):
    """``run_passive``: the route client, the API's router, and (standby) the promotion check.

    ``node`` is the daemon's :class:`meshd.daemon.node.Node` (status, the standby's
    own view); ``on_promote(model, reason)`` is called once, when the standby
    decides to serve.
    """

    name = "passive"

    def __init__(self, config: Config, node: Any, identity: Any, state: StateDir | None, *,
                 reactor: Any, policy: Any = None,
                 on_promote: Callable[[str, str], None] | None = None,
                 endpoint_for: Callable[[Any, str, str], Any] | None = None,
                 connect_fn: Callable[..., defer.Deferred[PeerProtocol]] | None = None,
                 random: Callable[[], float] = _random.random):
        self.config = config
        self.node = node
        self.state = state
        self.reactor = reactor
        self.policy = policy
        self.kind = "client" if config.node.client else "standby"
        self.on_promote = on_promote
        self.promotion: dict[str, Any] | None = None
        self.reason: str | None = None  # why an active node became this standby
        cfg = config.mesh
        self.memory = StandbyMemory(keep_s=PRESENT_REFRESHES * cfg.refresh_s)
        tokens = []
        for text in cfg.join:
            try:
                tokens.append(tokensmod.decode(text, now=reactor.seconds()))
            except tokensmod.TokenError as e:
                log.error("[mesh] join: cannot use a token: %s", e)
        mesh, known = None, []
        if self.kind == "standby" and state is not None:
            mesh = state.load_mesh()
            boot, known = state.load_peers()
            known = boot + known
        self.client = RouteClient(
            reactor=reactor, identity=identity, kind=self.kind, checkin=self._checkin,
            timing=Timing(heartbeat_s=cfg.heartbeat_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                          handshake_timeout_s=cfg.connect_timeout_s,
                          max_frame_bytes=cfg.max_frame_bytes),
            refresh_s=cfg.refresh_s, answer_timeout_s=cfg.connect_timeout_s,
            rejoin_max_s=cfg.rejoin_s, mesh=mesh, tokens=tokens, known=known,
            on_table=self._on_table, on_mesh=self._on_mesh, on_unreachable=self._on_unreachable,
            connect_fn=connect_fn, random=random)
        dialer = self.client.dialer()
        if endpoint_for is None:
            from meshd.serving.tunnel import TunnelEndpoint

            def endpoint_for(d: Any, node_id: str, model: str) -> Any:
                return TunnelEndpoint(d, node_id, model)

        make = endpoint_for
        self.router = PassiveRouter(
            identity.node_id, endpoint_for=lambda nid, model: make(dialer, nid, model),
            on_failure=lambda nid, reason: self.client.refresh_now(
                f"a request to {nid} failed: {reason}"),
            policy=policy, started_at=reactor.seconds())

    @property
    def mesh_id(self) -> str | None:
        return self.client.mesh.mesh_id if self.client.mesh is not None else None

    def _checkin(self, etag: str | None) -> CheckIn:
        refresh = self.config.mesh.refresh_s
        if self.kind == "client":
            return CheckIn("client", etag, refresh)
        me = self.node.node_view()
        return CheckIn("standby", etag, refresh, me.vram_bytes, me.available_models)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        log.info("passive %s: checking in every %g s, never gossiping", self.kind,
                 self.config.mesh.refresh_s)
        self.client.start()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.client.stop()

    def _on_mesh(self, mesh: MeshState) -> None:
        if self.kind == "standby" and self.state is not None:
            self.state.save_mesh(mesh)  # a standby may become active: it must rejoin by itself

    def _on_table(self, table: RouteTable) -> None:
        self.router.update(table)
        log.debug("routing table %s from %s: %d host(s), %d active node(s), %d standby",
                  table.etag, table.source, len(table.hosts), len(table.active_nodes),
                  len(table.standby))
        if self.kind != "standby":
            return
        if self.state is not None:
            try:
                boot, _ = self.state.load_peers()
                self.state.save_peers(boot, [KnownNode(n.node_id, n.addrs)
                                             for n in table.active_nodes][:64])
            except Exception as e:  # noqa: BLE001 - a full disk must not stop routing
                log.warning("cannot save the active nodes: %s", e)
        self.consider_promotion(table)

    def _on_unreachable(self, why: str) -> None:
        """Every active node of the last table and every token failed: decide from the last
        table with its active nodes (and so its hosts) dead, among the standbys it listed --
        the same tie-break the other standbys compute, so only one of them promotes."""
        last = self.client.table
        if self.kind != "standby" or last is None or self.promotion is not None:
            return
        dead = RouteTable(etag=last.etag, mesh_id=last.mesh_id, source=last.source,
                          standby=last.standby)
        log.warning("standby: no active node of the last table (%s: %s) nor any token answers "
                    "(%s): deciding from that table with its hosts dead", last.etag,
                    ", ".join(last.active_ids()) or "none", why)
        self.consider_promotion(dead, because="every active node is unreachable")

    def consider_promotion(self, table: RouteTable,
                           because: str = "") -> placement.Promotion | None:
        if self.promotion is not None or self.on_promote is None:
            return None
        now = self.reactor.seconds()
        me = _without_dropped(self.node)
        standby = self.memory.update(table, now)
        view = table_view(table, me, standby, max_rtt_ms=self.config.models.max_rtt_ms)
        decision = placement.should_promote(me, view, policy=self.policy)
        if not decision.promote or decision.model is None:
            return decision
        self.promotion = {"model": decision.model, "reason": decision.reason,
                          "table": table.etag, "table_at": self.client.table_at,
                          "decided_at": now}
        if because:
            self.promotion["because"] = because
        log.info("standby promoting to serve %s: %s (table %s from %s%s)", decision.model,
                 decision.reason, table.etag, table.source, f"; {because}" if because else "")
        self.on_promote(decision.model, decision.reason)
        return decision

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.client
        now = self.reactor.seconds()
        return {
            "kind": self.kind,
            **({"reason": self.reason} if self.reason else {}),
            "via": c.via if c.conn is not None else None,
            "table": c.table.etag if c.table else None,
            "table_age_s": round(now - c.table_at, 3) if c.table_at is not None else None,
            "active_nodes": c.table.active_ids() if c.table else [],
            "requests": c.requests,
            "tables": c.tables,
            "history": [{"at": at, "what": what} for at, what in c.history],
        }

    def model_status(self) -> list[dict[str, Any]]:
        table = self.client.table
        if table is None:
            return []
        out = []
        for name in table.models():
            every = table.hosts_of(name, state=None)
            warm = [h.node_id for h in every if h.state == "warm"]
            out.append({"name": name, "state": "warm" if warm else "loading",
                        "hosts": warm, "size_bytes": None, "split": None})
        return out


def _without_dropped(node: Any) -> NodeView:
    """The node's own view without the models dropped mesh-wide (``meshctl drop``): a node
    whose model was dropped must not stand by for it, nor promote to serve it again."""
    me = node.node_view()
    dropped = getattr(node, "dropped", None)
    if not dropped:
        return me
    return dataclasses.replace(me, available_models=tuple(
        m for m in me.available_models if m.name not in dropped))


# -- in the daemon ------------------------------------------------------------------------------------


async def run_passive(top: Any, identity: Any, state: StateDir) -> None:
    """The daemon's passive path (``meshd.daemon.service.MeshdService`` calls it for ``client`` and
    ``standby``): control socket and models are up; start the API on the table's router and
    check in.  No gossip, no mesh listener."""
    node = top.node
    cfg = top.config
    await top._listen_api()
    start_passive(top, identity, state)
    node.state = "running"
    line = f"{node.role} (passive), API on {cfg.api.listen}"
    top.notifier.ready(line)
    log.info("ready: %s", line)


def start_passive(top: Any, identity: Any, state: StateDir,
                  reason: str | None = None) -> PassiveNode:
    """Check in as a passive node from now on: the API serves the table's router; a standby
    promotes (:func:`promote`) when the promotion hook says so."""
    node = top.node
    cfg = top.config
    client = cfg.node.client
    passive = PassiveNode(cfg, node, identity, None if client else state,
                          reactor=top.reactor, policy=node.policy,
                          on_promote=None if client else (
                              lambda model, reason: promote(top, identity, state, model, reason)))
    passive.reason = reason
    node.passive = passive
    if top.api is not None:
        top.api.router = passive.router
    passive.setServiceParent(top)
    return passive


def standby_reason(node: Any, assignment: str) -> str | None:
    """Why an active node that assignment gave nothing becomes a standby, or None to stay
    idle: it must have VRAM and models on disk, and some other member must be set to serve
    a model (it stays active: the mesh keeps an active node to check in with)."""
    mesh = node.mesh
    if node.config.node.client or node.passive is not None or mesh is None or node.served:
        return None
    me = _without_dropped(node)
    if me.vram_bytes <= 0 or not me.available_models:
        return None
    if not any(tuple(p.serving) + tuple(getattr(p, "loading", ())) + tuple(getattr(p, "waiting", ()))
               for p in mesh.peers()):
        return None
    return f"assignment gave it nothing: {assignment}"


def stand_by(top: Any, assignment: str) -> bool:
    """Active idle node -> standby, the reverse of :func:`promote`: leave the gossip
    (LEAVING, as ``MeshService.leave``), stop answering passive nodes, and check in on the
    routing table with the same identity and mesh secret.  False: it stays idle (why not:
    :func:`standby_reason`)."""
    node = top.node
    reason = standby_reason(node, assignment)
    if reason is None:
        return False
    mesh, route_server = node.mesh, node.route_server
    identity, state = mesh.identity, mesh.state
    log.info("becoming a standby: %s; leaving the gossip, checking in on the routing table "
             "from now on", reason)
    node.mesh = node.route_server = None
    node.promotion = None
    if top.tunnels is not None:
        top.tunnels.close_all()
    if top.rebalancer is not None:
        top.rebalancer.stop()
    left = defer.DeferredList([defer.maybeDeferred(s.disownServiceParent)
                               for s in (route_server, mesh) if s is not None],
                              consumeErrors=True)  # the mesh's stop sends LEAVING

    def passive(_: Any) -> None:
        if not top.running or node.state == "stopping":
            return
        start_passive(top, identity, state, reason)
        node.status_changed()
        top.notifier.status(f"{node.role} (passive), API on {top.config.api.listen}")

    left.addCallback(passive)
    return True


def promote(top: Any, identity: Any, state: StateDir, model: str, reason: str) -> None:
    """Standby -> active: stop checking in, join the gossip, start serving ``model``."""
    node = top.node
    passive = node.passive
    scanned = node.scan.models.get(model) if node.scan is not None else None
    if scanned is None:
        log.error("cannot promote to %s: it is not on this node's disk any more", model)
        return
    t0 = top.reactor.seconds()
    record = dict(passive.promotion or {}, model=model, reason=reason)
    node.passive = None
    node.promotion = record  # from now on its role is no longer "standby"
    top.reactor.callLater(0, passive.disownServiceParent)  # not from inside its own callback
    top._start_mesh(identity, state)
    try:
        top._serve(model, str(scanned.path), scanned.size_bytes)
    except Exception as e:  # noqa: BLE001 - e.g. no llama-server binary: stay up, say why
        log.error("promotion to %s failed: %s", model, e)
        return
    top.api.router = getattr(top, "router", None) or node  # the mesh-wide router from now on
    record["serving_at"] = t0
    served = node.served.get(model)
    if served is None:  # the election keeps it waiting (a split): status says why
        log.info("promoted to %s: the election decides when its llama-server starts", model)
        return
    backend = served.backend

    def warm(_: Any) -> None:
        record["warm_at"] = top.reactor.seconds()
        log.info("promoted: serving %s (load took %.1f s)", model, record["warm_at"] - t0)
        top.notifier.status(top._status_line())

    backend.when_ready().addCallbacks(warm, lambda f: log.error(
        "promoted to %s but llama-server failed: %s", model, f.getErrorMessage()))
