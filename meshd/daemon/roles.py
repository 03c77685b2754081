"""A node's role as an explicit state machine, and the service groups it swaps.

A node is a *client* (API only), a *standby* (passive, VRAM and models on disk,
may promote), or *active*: in the gossip and *idle*, a *host* (runs a
llama-server) or a split *worker*.  The moves, on one screen (``ROLE_MOVES``)::

    client                       (never moves)
    standby  -> idle             promotion (then serving decides host / worker)
    idle     -> host | worker    serving, or elected to
    idle     -> standby          assignment gave it nothing (``standby_reason``)
    host     -> idle | worker
    worker   -> idle | host

Moving between a passive role and an active one swaps one :class:`RoleGroup`
for the other (active: tunnels, election, route server, mesh; passive: the
passive node) through the machine's outputs (:class:`RoleOutputs`), and points
the API's :class:`SwitchableRouter` at the new group's router.  Among the active
roles nothing is swapped: host and worker are read from what the node serves
(``serving_role``) each time the role is read, so there is one place it is
worked out.  :class:`RoleMachine` is pure (tested without a reactor);
:class:`RoleService` is its outputs in the daemon's service tree.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from meshd.daemon.tree import OrderedMultiService, first_line
from meshd.errors import RoleChangeRefused, StartupError
from meshd.serving import routing
from meshd.states import PASSIVE_ROLES, NodeState, Role

if TYPE_CHECKING:
    from meshd.config import NodeConfig
    from meshd.daemon.node import Node, RoleParts
    from meshd.serving.tunnel import TunnelServer

log = logging.getLogger("meshd.daemon.roles")

MOVES_KEPT = 64
ACTIVE_ROLES = frozenset({Role.IDLE, Role.HOST, Role.WORKER})

ROLE_MOVES: dict[Role, frozenset[Role]] = {
    Role.CLIENT: frozenset(),
    Role.STANDBY: frozenset({Role.IDLE}),
    Role.IDLE: frozenset({Role.HOST, Role.WORKER, Role.STANDBY}),
    Role.HOST: frozenset({Role.IDLE, Role.WORKER}),
    Role.WORKER: frozenset({Role.IDLE, Role.HOST}),
}


def initial_role(node: NodeConfig) -> Role:
    """The role a node starts in: ``[node] client``, ``[node] standby``, else active idle."""
    if node.client:
        return Role.CLIENT
    if node.standby:
        return Role.STANDBY
    return Role.IDLE


class RoleOutputs(Protocol):
    """What the machine makes happen when a node changes between passive and active."""

    def activate(self, model: str, reason: str) -> None:
        """A standby promoted: swap the passive group for an active one, serve ``model``."""

    def deactivate(self, reason: str) -> None:
        """An idle node stands by: swap the active group for a passive one."""


class RoleMachine:
    """The node's role; ``promote`` and ``stand_by`` are its inputs, ``RoleOutputs`` its outputs.

    ``serving_role()`` says which active role the node's serving state makes it
    (host, worker or idle); it is asked each time an active node's role is read.
    After :meth:`close` (the daemon is stopping) every input is ignored.
    """

    def __init__(self, initial: Role, *,
                 serving_role: Callable[[], Role] = lambda: Role.IDLE):
        self._role = initial
        self._serving_role = serving_role
        self._outputs: RoleOutputs | None = None
        self.promotion: dict[str, Any] | None = None  # what a promotion decided, and when
        self.closed = False
        # the last MOVES_KEPT moves, oldest first; every move since start is counted
        # in move_counts (the metric): a node flapping for months keeps no longer list
        self.moves: list[tuple[Role, Role]] = []
        self.move_counts: Counter[tuple[Role, Role]] = Counter()

    def connect(self, outputs: RoleOutputs) -> None:
        self._outputs = outputs

    @property
    def role(self) -> Role:
        if self._role in ACTIVE_ROLES:
            now = self._serving_role()
            if now != self._role:
                self._move(now)
        return self._role

    @property
    def passive(self) -> bool:
        return self._role in PASSIVE_ROLES

    def may(self, to: Role) -> bool:
        return to in ROLE_MOVES[self._role]

    def _move(self, to: Role) -> None:
        if to not in ROLE_MOVES[self._role]:
            raise RoleChangeRefused(f"a {self._role} node cannot become {to}")
        log.debug("role: %s -> %s", self._role, to)
        self.moves.append((self._role, to))
        if len(self.moves) > MOVES_KEPT:
            del self.moves[0]
        self.move_counts[(self._role, to)] += 1
        self._role = to

    # -- inputs --------------------------------------------------------------------------

    def promote(self, model: str, reason: str, record: dict[str, Any]) -> bool:
        """Standby -> active, serving ``model``; ``record`` is the promotion's status entry.
        False when the daemon is stopping; :class:`RoleChangeRefused` unless a standby."""
        if self.closed:
            log.info("not promoting to %s: the node is stopping", model)
            return False
        self._move(Role.IDLE)
        self.promotion = record
        if self._outputs is not None:
            self._outputs.activate(model, reason)
        return True

    def stand_by(self, reason: str) -> bool:
        """Active idle -> standby.  False when the daemon is stopping;
        :class:`RoleChangeRefused` unless an idle active node."""
        if self.closed:
            return False
        if self.role is not Role.IDLE:
            raise RoleChangeRefused(f"a {self._role} node cannot become {Role.STANDBY}")
        self._move(Role.STANDBY)
        self.promotion = None
        if self._outputs is not None:
            self._outputs.deactivate(reason)
        return True

    def close(self) -> None:
        """The daemon is stopping: no role change from now on."""
        self.closed = True


# -- the API's router, whichever role ------------------------------------------------------------


class SwitchableRouter:
    """The API's ``routing.Router``: the current role's router (the mesh-wide router of an
    active node, the routing table's of a passive one), switched by the role machine."""

    def __init__(self, target: routing.Router | None = None):
        self.target = target

    def point_at(self, target: routing.Router) -> None:
        self.target = target

    def _current(self) -> routing.Router:
        if self.target is None:  # not reachable: the group is built before the API listens
            raise routing.NotReady("*", "the node is starting")
        return self.target

    def models(self) -> list[dict[str, Any]]:
        return self._current().models() if self.target is not None else []

    def upstreams(self, model: str, client_id: str) -> list[routing.Upstream]:
        return self._current().upstreams(model, client_id)

    def upstream_failed(self, upstream: routing.Upstream, reason: str) -> None:
        self._current().upstream_failed(upstream, reason)

    def request_started(self, upstream: routing.Upstream) -> None:
        self._current().request_started(upstream)

    def request_finished(self, upstream: routing.Upstream) -> None:
        self._current().request_finished(upstream)


# -- the service groups --------------------------------------------------------------------------


class RoleGroup(OrderedMultiService):
    """The services of one role, started in order and stopped in reverse.

    ``router`` is what the API routes with in this role; ``parts`` what the node
    reads (``Node.use``); ``tunnels`` the tunnel server to drain on stop (active);
    ``facing`` the children that face the mesh, stopped first by :meth:`leave`
    (the mesh sends LEAVING; a passive node stops checking in) while the rest
    keeps going until the daemon has drained.  ``listen`` names the address a
    ``CannotListenError`` is about (``[mesh] listen ...``).
    """

    def __init__(self, kind: str, children: Iterable[service.Service], *,
                 router: routing.Router, parts: RoleParts,
                 tunnels: TunnelServer | None = None, facing: Iterable[str] = (),
                 listen: str = ""):
        super().__init__()
        self.name = kind  # type: ignore[assignment]  # Twisted declares it None
        self.router = router
        self.parts = parts
        self.tunnels = tunnels
        self.facing = tuple(facing)
        self.listen = listen
        for child in children:
            child.setServiceParent(self)

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        d = super().startService()
        if self.listen:
            d.addErrback(self._listen_failed)
        return d

    def _listen_failed(self, failure: Failure) -> None:
        failure.trap(CannotListenError)
        raise StartupError(f"{self.listen}: {first_line(failure.value)}")

    def leave(self) -> defer.Deferred[None]:
        """Stop the children that face the mesh, last started first."""
        return defer.ensureDeferred(self._leave())

    async def _leave(self) -> None:
        for child in reversed(list(self)):
            if child.name in self.facing and child.running:
                await defer.maybeDeferred(child.stopService)


class GroupBuilder(Protocol):
    """Builds the group of each kind (``meshd.daemon.service`` has the daemon's)."""

    def active(self, roles: RoleService) -> RoleGroup: ...

    def passive(self, roles: RoleService, reason: str | None) -> RoleGroup: ...


class RoleService(service.Service):
    """The current role group, and the role machine's outputs that swap it.

    The group is built at once (so the API has its router before it listens) and
    started by :meth:`enter`; :meth:`leave` stops the part facing the mesh, and
    ``stopService`` the rest.  ``promote`` (a standby's passive node decided) and
    ``unassigned`` (the election gave an idle node nothing) are where the parts
    ask for a role change; the machine decides whether it is one.
    """

    name = "roles"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, node: Node, router: SwitchableRouter, groups: GroupBuilder, *,
                 reactor: Any, serve: Callable[[str, str, int], None],
                 status: Callable[[str], Any]):
        self.node = node
        self.machine = node.roles
        self.router = router
        self.groups = groups
        self.reactor = reactor
        self._serve = serve
        self._status = status
        self.machine.connect(self)
        self.group = groups.passive(self, None) if self.machine.passive else groups.active(self)
        self._use(self.group)

    @property
    def tunnels(self) -> TunnelServer | None:
        return self.group.tunnels

    def _use(self, group: RoleGroup) -> None:
        self.group = group
        self.node.use(group.parts)
        self.router.point_at(group.router)

    # -- in the tree -----------------------------------------------------------------------

    def enter(self) -> defer.Deferred[None]:
        """Start the current group: into the mesh (active) or checking in (passive)."""
        return self.group.startService()

    def leave(self) -> defer.Deferred[None]:
        """The daemon stops: no more role changes; leave the mesh / stop checking in."""
        self.machine.close()
        return self.group.leave()

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802 - Twisted's name
        super().stopService()
        self.machine.close()
        if self.group.running:
            return self.group.stopService()
        return None

    # -- asked by the parts ------------------------------------------------------------------

    def promote(self, model: str, reason: str) -> None:
        """The standby's passive node decided to serve ``model`` (its ``on_promote``)."""
        node = self.node
        scanned = node.scan.models.get(model) if node.scan is not None else None
        if scanned is None:
            log.error("cannot promote to %s: it is not on this node's disk any more", model)
            return
        passive = node.passive
        record = dict((passive.promotion if passive is not None else None) or {},
                      model=model, reason=reason)
        self.machine.promote(model, reason, record)

    def unassigned(self, assignment: str) -> bool:
        """Assignment gave this idle node nothing: a standby from now on, when it may be one."""
        from meshd.passive.node import standby_reason

        if self.machine.closed or self.machine.role is not Role.IDLE:
            return False
        reason = standby_reason(self.node, assignment)
        if reason is None:
            return False
        return self.machine.stand_by(reason)

    # -- the machine's outputs ---------------------------------------------------------------

    def deactivate(self, reason: str) -> None:
        log.info("becoming a standby: %s; leaving the gossip, checking in on the routing table "
                 "from now on", reason)
        old = self.group
        from meshd.daemon.node import RoleParts

        self.node.use(RoleParts())  # no mesh, no route server from now on
        d = old.stopService() if old.running else defer.succeed(None)  # the mesh sends LEAVING
        d.addErrback(lambda f: log.error("leaving the gossip: %s", f.getErrorMessage()))
        d.addCallback(lambda _: self._passive_from_now_on(reason))

    def _passive_from_now_on(self, reason: str) -> None:
        if not self.running or self.machine.closed or self.node.state == NodeState.STOPPING:
            return
        group = self.groups.passive(self, reason)
        self._use(group)
        group.startService().addErrback(
            lambda f: log.error("cannot check in as a standby: %s", f.getErrorMessage()))
        self.node.status_changed()
        self._status(f"{self.node.role} (passive), API on {self.node.config.api.listen}")

    def activate(self, model: str, reason: str) -> None:
        node = self.node
        t0 = self.reactor.seconds()
        record = self.machine.promotion if self.machine.promotion is not None else {}
        old = self.group
        # not from inside the passive node's own callback: it stops a moment later
        self.reactor.callLater(0, lambda: old.stopService() if old.running else None)
        group = self.groups.active(self)
        self._use(group)
        failed: list[Failure] = []
        group.startService().addErrback(failed.append)
        if failed:
            log.error("promotion to %s failed: %s", model, failed[0].getErrorMessage())
            return
        scanned = node.scan.models.get(model) if node.scan is not None else None
        if scanned is None:
            return
        try:
            self._serve(model, str(scanned.path), scanned.size_bytes)
        except Exception as e:  # noqa: BLE001 - e.g. no llama-server binary: stay up, say why
            log.error("promotion to %s failed: %s", model, e)
            return
        record["serving_at"] = t0
        served = node.served.get(model)
        if served is None:  # the election keeps it waiting (a split): status says why
            log.info("promoted to %s: the election decides when its llama-server starts", model)
            return
        backend = served.backend

        def warm(_: Any) -> None:
            record["warm_at"] = self.reactor.seconds()
            log.info("promoted: serving %s (load took %.1f s)", model, record["warm_at"] - t0)
            self._status(node.status_line())

        backend.when_ready().addCallbacks(warm, lambda f: log.error(
            "promoted to %s but llama-server failed: %s", model, f.getErrorMessage()))
