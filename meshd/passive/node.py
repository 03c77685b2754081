"""The passive node (client or standby) as a service.

It checks in on the routing table (``meshd.passive.client``), routes the API with
it (``meshd.passive.router``) and, on a standby, asks the promotion hook on every
table.  Role changes to and from it are the role machine's (``meshd.daemon.roles``):
this module only says whether an idle node may stand by (:func:`standby_reason`).
"""

from __future__ import annotations

import dataclasses
import logging
import random as _random
from collections.abc import Callable, Collection
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer

from meshd.config import Config
from meshd.mesh import tokens as tokensmod
from meshd.mesh.desired import Decision
from meshd.mesh.peer import (
    PeerProtocol,
    Timing,
)
from meshd.passive.client import RouteClient
from meshd.passive.router import PassiveRouter
from meshd.placement import rules as placement
from meshd.placement.snapshot import NodeView
from meshd.serving.routetable import (
    PRESENT_REFRESHES,
    CheckIn,
    RouteTable,
    StandbyMemory,
    table_view,
)
from meshd.statedir import KnownNode, MeshState, StateDir
from meshd.states import ModelState, Role

log = logging.getLogger(__name__)


class StandbySelf(Protocol):
    """What the passive node reads of the daemon's node (``meshd.daemon.node.Node``)."""

    @property
    def dropped(self) -> Collection[str]: ...

    def node_view(self) -> NodeView: ...

    def learn_desired(self, decisions: list[Decision], via: str) -> None: ...

# -- the whole passive node ---------------------------------------------------------------------------


class PassiveNode(service.Service):
    """``run_passive``: the route client, the API's router, and (standby) the promotion check.

    ``node`` is the daemon's :class:`meshd.daemon.node.Node` (the standby's own
    view, its dropped models; None for a client, which has no view to give);
    ``on_promote(model, reason)`` is called once, when the standby decides to serve.
    """

    name = "passive"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, config: Config, node: StandbySelf | None, identity: Any,
                 state: StateDir | None, *,
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
        self.kind = Role.CLIENT if config.node.client else Role.STANDBY
        self.on_promote = on_promote
        self.promotion: dict[str, Any] | None = None
        self.reason: str | None = None  # why an active node became this standby
        self._addrs: tuple[str, ...] | None = None  # where it listens once promoted
        cfg = config.mesh
        self.memory = StandbyMemory(keep_s=PRESENT_REFRESHES * cfg.refresh_s)
        tokens = []
        for text in cfg.join:
            try:
                tokens.append(tokensmod.decode(text, now=reactor.seconds()))
            except tokensmod.TokenError as e:
                log.error("[mesh] join: cannot use a token: %s", e)
        mesh: MeshState | None = None
        known: list[KnownNode] = []
        if self.kind == Role.STANDBY and state is not None:
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
        if self.kind == Role.CLIENT or self.node is None:
            return CheckIn(Role.CLIENT, etag, refresh)
        me = self.node.node_view()
        if self._addrs is None:
            self._addrs = promoted_addrs(self.config)
        return CheckIn(Role.STANDBY, etag, refresh, me.vram_bytes, me.available_models,
                       self._addrs, name=self.config.node.name)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        log.info("passive %s: checking in every %g s, never gossiping", self.kind,
                 self.config.mesh.refresh_s)
        self.client.start()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.client.stop()

    def _on_mesh(self, mesh: MeshState) -> None:
        if self.kind == Role.STANDBY and self.state is not None:
            self.state.save_mesh(mesh)  # a standby may become active: it must rejoin by itself

    def _on_table(self, table: RouteTable) -> None:
        self.router.update(table)
        log.debug("routing table %s from %s: %d host(s), %d active node(s), %d standby",
                  table.etag, table.source, len(table.hosts), len(table.active_nodes),
                  len(table.standby))
        if self.kind != Role.STANDBY:
            return
        if self.state is not None:
            try:
                boot, _ = self.state.load_peers()
                self.state.save_peers(boot, [KnownNode(n.node_id, n.addrs)
                                             for n in table.active_nodes][:64])
            except Exception as e:  # noqa: BLE001 - a full disk must not stop routing
                log.warning("cannot save the active nodes: %s", e)
        if table.desired and self.node is not None:
            # the mesh's drops, before deciding: never promote for a dropped model
            self.node.learn_desired(list(table.desired), table.source)
        self.consider_promotion(table)

    def _on_unreachable(self, why: str) -> None:
        """Every active node of the last table and every token failed: decide from the last
        table with its active nodes (and so its hosts) dead, among the standbys it listed --
        the same tie-break the other standbys compute, so only one of them promotes."""
        last = self.client.table
        if self.kind != Role.STANDBY or last is None or self.promotion is not None:
            return
        dead = RouteTable(etag=last.etag, mesh_id=last.mesh_id, source=last.source,
                          standby=last.standby)
        log.warning("standby: no active node of the last table (%s: %s) nor any token answers "
                    "(%s): deciding from that table with its hosts dead", last.etag,
                    ", ".join(last.active_ids()) or "none", why)
        self.consider_promotion(dead, because="every active node is unreachable")

    def consider_promotion(self, table: RouteTable,
                           because: str = "") -> placement.Promotion | None:
        if self.promotion is not None or self.on_promote is None or self.node is None:
            return None
        now = self.reactor.seconds()
        me = without_dropped(self.node)
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
            # [node] names of the nodes its table lists, so status shows hosts by name too
            "names": ({n.node_id: n.name for n in (*c.table.active_nodes, *c.table.standby)
                       if n.name} if c.table else {}),
            "requests": c.requests,
            "tables": c.tables,
            "history": [{"at": at, "what": what} for at, what in c.history],
        }

    def model_status(self) -> list[dict[str, Any]]:
        table = self.client.table
        if table is None:
            return []
        return [{"name": name, "state": ModelState.WARM if warm else ModelState.LOADING,
                 "hosts": warm, "size_bytes": None, "split": None}
                for name, warm, _ in table.model_summaries()]


def promoted_addrs(config: Config) -> tuple[str, ...]:
    """Where a standby will listen for mesh connections once promoted (``[mesh] listen``,
    advertised as gossip will): the table lists it, so a passive node whose every active
    node is gone can find it.  None with ``[mesh] listen`` on port 0 and no
    ``[mesh] advertise`` (the port is chosen only when it listens)."""
    from meshd.config import parse_address
    from meshd.mesh.addresses import advertise_addresses

    try:
        host, port = parse_address(config.mesh.listen)
        addrs = advertise_addresses(config.mesh.advertise, host, port)
    except (ValueError, OSError) as e:
        log.warning("standby: cannot tell where it will listen once promoted: %s", e)
        return ()
    return tuple(a for a in addrs if not a.endswith(":0"))


def without_dropped(node: StandbySelf) -> NodeView:
    """The node's own view without the models dropped mesh-wide (``meshctl drop``): a node
    whose model was dropped must not stand by for it, nor promote to serve it again."""
    me = node.node_view()
    dropped = node.dropped
    if not dropped:
        return me
    return dataclasses.replace(me, available_models=tuple(
        m for m in me.available_models if m.name not in dropped))


class IdleSelf(StandbySelf, Protocol):
    """What :func:`standby_reason` reads of an active node."""

    @property
    def config(self) -> Config: ...

    @property
    def served(self) -> Collection[str]: ...

    @property
    def mesh(self) -> Any: ...

    @property
    def passive(self) -> Any: ...


def standby_reason(node: IdleSelf, assignment: str) -> str | None:
    """Why an active node that assignment gave nothing becomes a standby, or None to stay
    idle: it must have VRAM and models on disk, and some other member must be set to serve
    a model (it stays active: the mesh keeps an active node to check in with)."""
    mesh = node.mesh
    if node.config.node.client or node.passive is not None or mesh is None or node.served:
        return None
    me = without_dropped(node)
    if me.vram_bytes <= 0 or not me.available_models:
        return None
    if not any(tuple(p.serving) + tuple(p.loading) + tuple(p.waiting) for p in mesh.peers()):
        return None
    return f"assignment gave it nothing: {assignment}"
