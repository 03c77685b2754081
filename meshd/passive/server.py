"""The active side of the passive path: answer route requests from clients and standbys.

It builds the routing table once per membership change and answers every
request with the same encoded bytes; see ``meshd.passive`` for the whole story.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from meshd.mesh import wire
from meshd.mesh.desired import DesiredState
from meshd.mesh.peer import (
    PeerProtocol,
)
from meshd.mesh.wire import CloseCode, FrameType
from meshd.passive.client import PURPOSE
from meshd.placement.snapshot import ModelFile, NodeView
from meshd.serving.routetable import (
    PRESENT_REFRESHES,
    Answers,
    CheckIn,
    NodeEntry,
    PassiveRegistry,
    RouteTable,
    build_table,
)
from meshd.states import Role

log = logging.getLogger(__name__)


class NamedSize(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...


class RoutedPeer(Protocol):
    """A peer as the table is built from it (``meshd.mesh.membership.PeerView``, frozen)."""

    @property
    def node_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def vram_bytes(self) -> int: ...
    @property
    def addrs(self) -> Sequence[str]: ...
    @property
    def serving(self) -> Sequence[str]: ...
    @property
    def loading(self) -> Sequence[str]: ...
    @property
    def available_models(self) -> Sequence[NamedSize]: ...
    @property
    def name(self) -> str: ...


class TableMesh(Protocol):
    """What the route server needs of the gossip (``meshd.mesh.gossip.MeshService``)."""

    node_id: str
    incarnation: int
    advertise: list[str]

    @property
    def mesh_id(self) -> str | None: ...

    def register_purpose(self, purpose: str, handler: Callable[[Any], None], *,
                         token_join: bool = ...) -> None: ...
    def add_listener(self, listener: Callable[[Any], None]) -> None: ...
    def add_local_listener(self, listener: Callable[[], None]) -> None: ...
    def peers(self) -> Sequence[RoutedPeer]: ...

    @property
    def desired(self) -> DesiredState: ...


class LoadCounter(Protocol):
    def load_of(self, node_id: str) -> int: ...


class TableNode(Protocol):
    """What the route server reads of this node (``meshd.daemon.node.Node``)."""

    @property
    def router(self) -> LoadCounter | None: ...

    def local_info(self) -> dict[str, Any]: ...

# -- the active side --------------------------------------------------------------------------


class RouteServer(service.Service):
    """Answers passive nodes on ``"route"`` connections, pushes table changes, counts them.

    Cheap by construction: the table is rebuilt only after a change (membership
    event, local change, a standby appearing or leaving) and its encoded
    payload is reused for every request; a request from a passive node holding
    the current table gets ``{"etag", "same": true}``.  A check-in costs the
    parse of its (small) request, a dict lookup and the send.
    """

    name = "route-server"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, mesh: TableMesh, node: TableNode, *, clock: IReactorTime,
                 refresh_s: float):
        self.mesh = mesh
        self.node = node
        self.clock = clock
        self.refresh_s = refresh_s
        self.registry = PassiveRegistry()
        self._answers: Answers | None = None
        self._pending: dict[PeerProtocol, float] = {}  # open, no check-in yet
        self._push_call: IDelayedCall | None = None
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
            node_id=self.mesh.node_id, role=info.get("role", Role.IDLE),
            vram_bytes=int(info.get("vram_bytes", 0)), addrs=tuple(self.mesh.advertise),
            serving=tuple(info.get("serving", ())), loading=tuple(info.get("loading", ())),
            available_models=tuple(ModelFile(m["name"], m["size_bytes"])
                                   for m in info.get("available_models", ())),
            name=str(info.get("name") or ""))
        nodes = [me]
        for p in self.mesh.peers():
            nodes.append(NodeEntry(
                node_id=p.node_id, role=p.role, vram_bytes=p.vram_bytes, addrs=tuple(p.addrs),
                serving=tuple(p.serving), loading=tuple(p.loading),
                available_models=tuple(ModelFile(m.name, m.size_bytes)
                                       for m in p.available_models), name=p.name))
        router = self.node.router
        own_load = router.load_of(self.mesh.node_id) if router is not None else 0
        return build_table(mesh_id=self.mesh.mesh_id or "", source=self.mesh.node_id,
                           nodes=nodes, standby=self.registry.standbys(),
                           load=lambda nid: own_load if nid == self.mesh.node_id else 0,
                           desired=self.mesh.desired.decisions.values())

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
            conn.close(f"bad ROUTE_REQUEST: {e}", code=CloseCode.PROTOCOL_ERROR, abort=True)
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
            conn.close(f"no check-in for {now - entry.last_s:.0f} s", code=CloseCode.TIMEOUT,
                       abort=True)
            if self.registry.drop(conn):
                self.changed()
        limit = PRESENT_REFRESHES * self.refresh_s
        for conn, since in list(self._pending.items()):
            if now - since > limit:
                del self._pending[conn]
                conn.close("no ROUTE_REQUEST", code=CloseCode.TIMEOUT, abort=True)

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
            conn.close("this node is stopping", code=CloseCode.STOPPING)  # they move to the next active node at once
