"""The routing table passive nodes live on, and every decision made from it.

No I/O here (``meshd.passive.node`` does the connections): what an active node
answers to ``ROUTE_REQUEST``, how it builds that answer once per change and
reuses the encoded bytes, how it counts the passive nodes checking in, and on
the passive side which active node to check in with and in what order to try
the others, and the mesh view a standby decides its promotion from.

The table (``ROUTE_TABLE`` body, ``docs/protocol.md``)::

    {"etag": "<answering node>.<incarnation>.<n>", "mesh_id", "source": node_id,
     "hosts": [{"model", "node_id", "addrs", "vram_bytes", "load", "state": "warm"|"loading"}],
     "active_nodes": [{"node_id", "addrs", "role", "vram_bytes", "serving", "loading",
                       "available_models": [{"name", "size_bytes"}]}],
     "standby": [{"node_id", "addrs", "vram_bytes", "available_models"}],
     "desired"?: {"models": {name: {"state", "version", "by", "at"}}}}

A standby's ``addrs`` are where it will listen for mesh connections once promoted
(it listens on none while it stands by): a passive node whose every active node
is gone dials them, so it finds the standby that took over.

``desired`` (the mesh's drop/serve decisions, ``meshd.mesh.desired``) is there only when
the mesh holds some: a standby must not promote for a dropped model it has on disk.

A node entry (active or standby) may also carry ``"name"``, the node's ``[node]
name``: optional (an older meshd sends none), cleaned on receipt (``meshd.nodename``).

An answer with the etag the request named is ``{"etag", "same": true}``:
nothing changed, and a refresh costs a few dozen bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshd.mesh import desired as desiredmod
from meshd.mesh import wire
from meshd.mesh.desired import Decision
from meshd.nodename import clean as clean_name
from meshd.placement.snapshot import MeshView, ModelFile, NodeView
from meshd.placement.spread import stable_index
from meshd.states import ModelState, Role

# a passive node counts as present while its last check-in is this many refresh periods old
PRESENT_REFRESHES = 3
# who checks in (CheckIn.kind): the passive roles
KINDS = (Role.CLIENT, Role.STANDBY)


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host of one model."""

    model: str
    node_id: str
    addrs: tuple[str, ...]
    vram_bytes: int = 0
    load: int = 0
    state: str = ModelState.WARM  # WARM: takes requests; LOADING: will soon

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "node_id": self.node_id, "addrs": list(self.addrs),
                "vram_bytes": self.vram_bytes, "load": self.load, "state": self.state}


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """An active node (``role`` host/worker/idle) or a standby (``role`` "standby")."""

    node_id: str
    role: str
    vram_bytes: int = 0
    addrs: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()
    loading: tuple[str, ...] = ()
    available_models: tuple[ModelFile, ...] = ()
    name: str = ""  # its [node] name, for people; "" when it sent none

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node_id": self.node_id, "vram_bytes": self.vram_bytes,
            "available_models": [{"name": m.name, "size_bytes": m.size_bytes}
                                 for m in self.available_models],
        }
        if self.name:
            body["name"] = self.name
        if self.role != Role.STANDBY:
            body.update(role=self.role, addrs=list(self.addrs), serving=list(self.serving),
                        loading=list(self.loading))
        else:
            body["addrs"] = list(self.addrs)  # where it listens once promoted
        return body

    def view(self) -> NodeView:
        """As placement sees it: a loading model counts as served (it has a host coming)."""
        return NodeView(node_id=self.node_id, role=self.role, vram_bytes=self.vram_bytes,
                        serving=self.serving + tuple(m for m in self.loading
                                                     if m not in self.serving),
                        available_models=self.available_models, addrs=self.addrs,
                        name=self.name)


@dataclass(frozen=True)
class RouteTable:
    etag: str
    mesh_id: str
    source: str
    hosts: tuple[HostEntry, ...] = ()
    active_nodes: tuple[NodeEntry, ...] = ()
    standby: tuple[NodeEntry, ...] = ()
    desired: tuple[Decision, ...] = ()  # the mesh's drop/serve decisions

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"etag": self.etag, "mesh_id": self.mesh_id, "source": self.source,
                "hosts": [h.to_body() for h in self.hosts],
                "active_nodes": [n.to_body() for n in self.active_nodes],
                "standby": [n.to_body() for n in self.standby]}
        if self.desired:  # absent when there is none: older passive nodes never see it
            body["desired"] = desiredmod.to_body(self.desired)
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RouteTable:
        """Parse a ROUTE_TABLE body; ValueError names what is wrong."""
        hosts = tuple(
            HostEntry(model=_str(h, "model"), node_id=_str(h, "node_id"),
                      addrs=_strs(h, "addrs"), vram_bytes=_int(h, "vram_bytes"),
                      load=_int(h, "load"), state=_str(h, "state", ModelState.WARM))
            for h in _list(body, "hosts"))
        active = tuple(_node(n, None) for n in _list(body, "active_nodes"))
        standby = tuple(_node(n, Role.STANDBY) for n in _list(body, "standby"))
        desired = tuple(desiredmod.parse(body["desired"])) if "desired" in body else ()
        return cls(etag=_str(body, "etag"), mesh_id=_str(body, "mesh_id"),
                   source=_str(body, "source"), hosts=hosts, active_nodes=active,
                   standby=standby, desired=desired)

    # -- reading it ---------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted({h.model for h in self.hosts})

    def hosts_of(self, model: str, *,
                 state: str | None = ModelState.WARM) -> tuple[HostEntry, ...]:
        return tuple(h for h in self.hosts
                     if h.model == model and (state is None or h.state == state))

    def model_summaries(self) -> list[tuple[str, list[str], int]]:
        """Per model, by name: its warm hosts' ids and how many nodes have it at all
        (warm or loading) -- what a passive node lists and reports."""
        out = []
        for name in self.models():
            every = self.hosts_of(name, state=None)
            warm = [h.node_id for h in every if h.state == ModelState.WARM]
            out.append((name, warm, len({h.node_id for h in every})))
        return out

    def addrs_of(self, node_id: str) -> tuple[str, ...]:
        for n in self.active_nodes:
            if n.node_id == node_id:
                return n.addrs
        for h in self.hosts:
            if h.node_id == node_id:
                return h.addrs
        return ()

    def name_of(self, node_id: str) -> str:
        """The node's [node] name as the table gives it; "" when it gives none."""
        for n in (*self.active_nodes, *self.standby):
            if n.node_id == node_id:
                return n.name
        return ""

    def active_ids(self) -> list[str]:
        return sorted(n.node_id for n in self.active_nodes)

    def standby_addrs(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(node_id, addrs)`` of every listed standby that said where it will listen, by
        node id: where a passive node looks once every active node is gone (one of them
        may have promoted)."""
        return [(s.node_id, s.addrs) for s in sorted(self.standby, key=lambda s: s.node_id)
                if s.addrs]


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key!r} is not a list")
    return value


def _str(body: Any, key: str, default: str | None = None) -> str:
    if not isinstance(body, dict):
        raise ValueError("entry is not an object")
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is not a string")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key!r} is not an integer")
    return value


def _strs(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = _list(body, key)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} holds a non-string")
    return tuple(value)


def _models(body: dict[str, Any]) -> tuple[ModelFile, ...]:
    out = []
    for m in _list(body, "available_models"):
        out.append(ModelFile(_str(m, "name"), _int(m, "size_bytes")))
    return tuple(out)


def _node(body: Any, role: str | None) -> NodeEntry:
    if not isinstance(body, dict):
        raise ValueError("node entry is not an object")
    return NodeEntry(node_id=_str(body, "node_id"), role=role or _str(body, "role", Role.IDLE),
                     vram_bytes=_int(body, "vram_bytes"), addrs=_strs(body, "addrs"),
                     serving=_strs(body, "serving"), loading=_strs(body, "loading"),
                     available_models=_models(body), name=clean_name(body.get("name")))


# -- the request -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckIn:
    """A ROUTE_REQUEST body: who asks, and (a standby) what it could serve and where it
    will listen once promoted."""

    kind: str  # Role.CLIENT | Role.STANDBY
    etag: str | None = None  # the table it holds; answered "same" when still current
    refresh_s: float = 30.0
    vram_bytes: int = 0
    available_models: tuple[ModelFile, ...] = ()
    addrs: tuple[str, ...] = ()  # a standby's mesh addresses once promoted
    name: str = ""  # a standby's [node] name, for its routing-table entry

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "refresh_s": self.refresh_s}
        if self.etag:
            body["etag"] = self.etag
        if self.name:
            body["name"] = self.name
        if self.kind == Role.STANDBY:
            body["vram_bytes"] = self.vram_bytes
            body["available_models"] = [{"name": m.name, "size_bytes": m.size_bytes}
                                        for m in self.available_models]
            body["addrs"] = list(self.addrs)
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> CheckIn:
        kind = _str(body, "kind")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        etag = body.get("etag")
        refresh = body.get("refresh_s", 30.0)
        if not isinstance(refresh, (int, float)) or isinstance(refresh, bool) or refresh <= 0:
            raise ValueError("'refresh_s' is not a positive number")
        if kind == Role.CLIENT:
            return cls(kind, etag if isinstance(etag, str) else None, float(refresh))
        return cls(kind, etag if isinstance(etag, str) else None, float(refresh),
                   _int(body, "vram_bytes"), _models(body), _strs(body, "addrs"),
                   name=clean_name(body.get("name")))


# -- the active side: one answer per change ----------------------------------------------------------


class Answers:
    """The ROUTE_TABLE payloads, built once per change and reused for every request.

    ``invalidate()`` (a membership event, a local change, a standby that
    appeared) only marks the table stale; the next ``current()`` rebuilds it
    with ``build()``.  When the rebuilt table is the same as before, the etag
    stays, so passive nodes holding it keep getting the few-byte "same" answer.
    """

    def __init__(self, source: str, incarnation: int, build: Callable[[], RouteTable]):
        self._prefix = f"{source}.{incarnation}."
        self._build = build
        self._n = 0
        self._content: dict[str, Any] | None = None
        self._stale = True
        self.etag = ""
        self.full = b""  # JSON payload of the whole table
        self.same = b""  # JSON payload of {"etag", "same": true}
        self.builds = 0

    def invalidate(self) -> None:
        self._stale = True

    def current(self) -> tuple[str, bytes, bytes]:
        if self._stale:
            self._stale = False
            table = self._build()
            self.builds += 1
            content = table.to_body()
            content.pop("etag")
            if content != self._content:
                self._content = content
                self._n += 1
                self.etag = f"{self._prefix}{self._n}"
                self.full = wire.dump_json({**content, "etag": self.etag})
                self.same = wire.dump_json({"etag": self.etag, "same": True})
        return self.etag, self.full, self.same

    def answer(self, etag: str | None) -> bytes:
        """The payload for a request that holds ``etag``."""
        current, full, same = self.current()
        return same if etag == current else full


@dataclass(slots=True)
class Present:
    """One checked-in passive connection (mutated in place at each check-in)."""

    node_id: str
    kind: str
    last_s: float
    keep_s: float
    standby: NodeEntry | None = None
    sent_etag: str = ""
    requests: int = 0


class PassiveRegistry:
    """The passive nodes checking in with this active node, keyed by their connection.

    A check-in costs a dictionary lookup and a few attribute writes; counting
    for ``meshctl status`` walks the (bounded) table only when asked.
    """

    def __init__(self) -> None:
        self.entries: dict[Any, Present] = {}
        self.requests = 0

    def check_in(self, key: Any, node_id: str, req: CheckIn, now: float) -> bool:
        """Record a check-in; True when the standby listing changed (the table must be rebuilt)."""
        self.requests += 1
        keep_s = PRESENT_REFRESHES * req.refresh_s
        entry = self.entries.get(key)
        standby = None
        if req.kind == Role.STANDBY:
            standby = NodeEntry(node_id, Role.STANDBY, req.vram_bytes, addrs=req.addrs,
                                available_models=req.available_models, name=req.name)
        if entry is None:
            self.entries[key] = Present(node_id, req.kind, now, keep_s, standby, requests=1)
            return standby is not None
        entry.last_s = now
        entry.keep_s = keep_s
        entry.requests += 1
        if entry.kind != req.kind or entry.standby != standby:
            entry.kind = req.kind
            entry.standby = standby
            return True
        return False

    def drop(self, key: Any) -> bool:
        """A connection closed; True when it was a standby (the listing changed)."""
        entry = self.entries.pop(key, None)
        return entry is not None and entry.standby is not None

    def expired(self, now: float) -> list[Any]:
        """Connections whose last check-in is too old (the caller closes and drops them)."""
        return [k for k, e in self.entries.items() if now - e.last_s > e.keep_s]

    def counts(self, now: float) -> dict[str, int]:
        out = {"clients": 0, "standby": 0}
        for e in self.entries.values():
            if now - e.last_s <= e.keep_s:
                out["clients" if e.kind == Role.CLIENT else "standby"] += 1
        return out

    def standbys(self) -> tuple[NodeEntry, ...]:
        """Every standby checked in, one entry per node id, sorted by node id."""
        by_id = {e.standby.node_id: e.standby for e in self.entries.values()
                 if e.standby is not None}
        return tuple(by_id[k] for k in sorted(by_id))


def build_table(*, mesh_id: str, source: str, nodes: Iterable[NodeEntry],
                standby: Iterable[NodeEntry], load: Callable[[str], int] = lambda _: 0,
                desired: Iterable[Decision] = ()) -> RouteTable:
    """The table from the active nodes this node knows (itself included) and its standbys."""
    active = tuple(sorted(nodes, key=lambda n: n.node_id))
    hosts: list[HostEntry] = []
    for n in active:
        if n.role == Role.WORKER:
            continue
        for model in n.serving:
            hosts.append(HostEntry(model, n.node_id, n.addrs, n.vram_bytes, load(n.node_id)))
        for model in n.loading:
            if model not in n.serving:
                hosts.append(HostEntry(model, n.node_id, n.addrs, n.vram_bytes, 0, ModelState.LOADING))
    hosts.sort(key=lambda h: (h.model, h.node_id))
    active_ids = {n.node_id for n in active}
    return RouteTable(etag="", mesh_id=mesh_id, source=source, hosts=tuple(hosts),
                      active_nodes=active,
                      standby=tuple(s for s in standby if s.node_id not in active_ids),
                      desired=tuple(sorted(desired, key=lambda d: d.model)))


# -- the passive side ----------------------------------------------------------------------------------


def checkin_order(active_ids: Sequence[str], self_id: str, kind: str) -> list[str]:
    """The active nodes to check in with, in the order to try them.

    Standbys all start at the lowest node id, so they see the same standby
    listing (the promotion tie-break is computed from it); clients spread
    over the active nodes by ``hash(node id) % n``.  After the first, the
    others follow in node-id order, wrapping around.
    """
    ids = sorted(set(active_ids))
    if not ids:
        return []
    start = 0 if kind == Role.STANDBY else stable_index(self_id, "", len(ids))
    return ids[start:] + ids[:start]


def next_candidates(order: Sequence[str], failed: Iterable[str]) -> list[str]:
    """``order`` without the nodes that failed this round."""
    gone = set(failed)
    return [n for n in order if n not in gone]


@dataclass
class StandbyMemory:
    """Standby entries the passive node has seen, kept ``keep_s`` after their last table.

    When a standby moves to another active node (its own died), the new one
    may not have heard from every other standby yet; remembering the listing
    of the last tables keeps the promotion tie-break computed over the same
    set of standbys on every one of them.
    """

    keep_s: float
    seen: dict[str, tuple[NodeEntry, float]] = field(default_factory=dict)

    def update(self, table: RouteTable, now: float) -> tuple[NodeEntry, ...]:
        active = {n.node_id for n in table.active_nodes}
        for s in table.standby:
            self.seen[s.node_id] = (s, now)
        for node_id in list(self.seen):
            _, at = self.seen[node_id]
            if node_id in active or now - at > self.keep_s:
                del self.seen[node_id]
        return tuple(self.seen[k][0] for k in sorted(self.seen))


def table_view(table: RouteTable, me: NodeView, standby: Iterable[NodeEntry] = (),
               *, max_rtt_ms: float = 80.0) -> MeshView:
    """The mesh as a passive node sees it: the table's nodes, its standbys and itself."""
    nodes: dict[str, NodeView] = {}
    for n in table.active_nodes:
        nodes[n.node_id] = n.view()
    for s in (*table.standby, *standby):
        if s.node_id not in nodes:
            nodes[s.node_id] = s.view()
    nodes[me.node_id] = me
    return MeshView(self_id=me.node_id, nodes=tuple(nodes[k] for k in sorted(nodes)),
                    max_rtt_ms=max_rtt_ms)


def host_views(hosts: Iterable[HostEntry]) -> tuple[NodeView, ...]:
    """Hosts as the host-selection hook takes them (sorted by node id)."""
    return tuple(sorted((NodeView(node_id=h.node_id, role=Role.HOST, vram_bytes=h.vram_bytes,
                                  serving=(h.model,), addrs=h.addrs, load=h.load)
                         for h in hosts), key=lambda n: n.node_id))
