"""Frozen, plain views of the mesh that placement hooks receive.

A plugin decides from these and nothing else: they are immutable (frozen
dataclasses holding tuples, strings and numbers), so a plugin cannot corrupt
the daemon's peer table, and a decision depends only on what is in the view,
which is what lets every node compute the same answer from the same table.

The mesh code builds a :class:`MeshView` from its peer table (or a passive
node from its routing table) once per membership change and reuses it for
every decision and request until the next change; the derived indexes
(``models``, ``hosts_of``, ...) are computed on first use and cached on the
instance, so building a view costs one :class:`NodeView` per node and nothing
more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from meshd.states import PASSIVE_ROLES, PlanMode, Role
from meshd.units import GIB, gib

# the roles a node can have (see DESIGN.md "Roles"); passive ones do not gossip or take part
# in elections
ROLES = tuple(Role)
# for plugins: sizes are binary, ``8 * GB`` is 8 GiB (``meshd.units``)
GB = GIB
gb = gib


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A model a node has on disk (a split GGUF set counts as one, its size summed)."""

    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as placement sees it.

    ``serving`` names the models this node runs for the mesh: as their host
    (it answers HTTP requests for them) or, when ``role == "worker"``, as an
    rpc-server worker of a split.  ``rtt_ms`` is the round trip from the node
    that built the view (``MeshView.self_id``; 0.0 for itself; None when not
    measured yet).  ``load`` is the number of requests in flight on the node,
    as last reported.
    """

    node_id: str
    role: str = Role.IDLE  # a Role; plain strings from JSON compare equal
    vram_bytes: int = 0
    serving: tuple[str, ...] = ()
    available_models: tuple[ModelFile, ...] = ()
    requested_models: tuple[str, ...] = ()
    rtt_ms: float | None = None
    load: int = 0
    addrs: tuple[str, ...] = ()
    # its [node] name, for people (explanations, logs); "" when unknown. Never decide by it:
    # two nodes may share a name, the node id is the identity
    name: str = ""

    def __post_init__(self) -> None:
        # lists sneak in from JSON; keep the view immutable and hashable
        for name in ("serving", "available_models", "requested_models", "addrs"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def passive(self) -> bool:
        return self.role in PASSIVE_ROLES

    def size_of(self, model: str) -> int | None:
        """Size of ``model`` on this node's disk; None when it does not have it."""
        for f in self.available_models:
            if f.name == model:
                return f.size_bytes
        return None

    def has(self, model: str) -> bool:
        return self.size_of(model) is not None

    def hosts(self, model: str) -> bool:
        """True when this node answers requests for ``model`` (not as a split worker)."""
        return self.role != Role.WORKER and model in self.serving


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model known anywhere in the mesh, with who hosts it and who has it."""

    name: str
    # from any node's disk, else from the catalog; None when nobody knows
    size_bytes: int | None
    # node ids, sorted
    hosts: tuple[str, ...] = ()
    on_disk: tuple[str, ...] = ()
    requested_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeshView:
    """The whole mesh as one node sees it, at one moment.

    ``nodes`` holds every node the viewer knows, itself included (active
    peers, and the standby nodes a routing table lists).  ``catalog`` gives
    sizes for models nobody has on disk yet (the shipped catalog), so a
    download can be judged before it starts.  ``max_rtt_ms`` is ``[models]
    max_rtt_ms``: peers further away are not used for a split.
    """

    self_id: str
    nodes: tuple[NodeView, ...] = ()
    catalog: tuple[ModelFile, ...] = ()
    max_rtt_ms: float = 80.0

    def __post_init__(self) -> None:
        for name in ("nodes", "catalog"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    # -- indexes, computed on first use -------------------------------------

    @cached_property
    def by_id(self) -> MappingProxyType[str, NodeView]:
        return MappingProxyType({n.node_id: n for n in self.nodes})

    @property
    def self_node(self) -> NodeView | None:
        return self.by_id.get(self.self_id)

    def node(self, node_id: str) -> NodeView | None:
        return self.by_id.get(node_id)

    @cached_property
    def _models(self) -> MappingProxyType[str, ModelInfo]:
        sizes: dict[str, int] = {f.name: f.size_bytes for f in self.catalog}
        hosts: dict[str, list[str]] = {}
        on_disk: dict[str, list[str]] = {}
        requested: dict[str, list[str]] = {}
        for n in self.nodes:
            for f in n.available_models:
                # a size measured on a disk beats the catalog's
                sizes[f.name] = f.size_bytes
                on_disk.setdefault(f.name, []).append(n.node_id)
            for m in n.requested_models:
                requested.setdefault(m, []).append(n.node_id)
            for m in n.serving:
                hosts.setdefault(m, [])
                if n.hosts(m):
                    hosts[m].append(n.node_id)
        names = sorted(set(hosts) | set(on_disk) | set(requested))
        return MappingProxyType(
            {
                name: ModelInfo(
                    name=name,
                    size_bytes=sizes.get(name),
                    hosts=tuple(sorted(hosts.get(name, ()))),
                    on_disk=tuple(sorted(on_disk.get(name, ()))),
                    requested_by=tuple(sorted(requested.get(name, ()))),
                )
                for name in names
            }
        )

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """Every model requested, on disk or served anywhere, sorted by name.

        The catalog's entries add sizes but not models: a model is in the
        mesh only when some node asks for it, has it or serves it.
        """
        return tuple(self._models.values())

    def model(self, name: str) -> ModelInfo | None:
        return self._models.get(name)

    def size_of(self, model: str) -> int | None:
        info = self._models.get(model)
        if info is not None and info.size_bytes is not None:
            return info.size_bytes
        for f in self.catalog:
            if f.name == model:
                return f.size_bytes
        return None

    @cached_property
    def _hosts(self) -> dict[str, tuple[NodeView, ...]]:
        out: dict[str, list[NodeView]] = {}
        for n in sorted(self.nodes, key=_node_key):
            if n.role == Role.WORKER:
                continue
            for m in n.serving:
                out.setdefault(m, []).append(n)
        return {m: tuple(ns) for m, ns in out.items()}

    def hosts_of(self, model: str) -> tuple[NodeView, ...]:
        """The nodes that answer requests for ``model``, sorted by node id."""
        return self._hosts.get(model, ())

    # -- building -----------------------------------------------------------

    def with_node(self, node: NodeView) -> MeshView:
        """This view with ``node`` added, or replacing the node with its id."""
        others = tuple(n for n in self.nodes if n.node_id != node.node_id)
        return MeshView(
            self_id=self.self_id,
            nodes=(*others, node),
            catalog=self.catalog,
            max_rtt_ms=self.max_rtt_ms,
        )


def _node_key(n: NodeView) -> str:
    return n.node_id


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """How a group runs one model: ``meshd_plan_split``'s answer.

    ``mode`` is a :class:`meshd.states.PlanMode` (a plugin may give the plain word):

    - ``mode == "solo"``: every node in ``solo`` runs its own llama-server
      with the whole model (no split); ``host`` is None.
    - ``mode == "split"``: ``host`` runs llama-server over the rpc-servers of
      the nodes in ``shares`` (``(node_id, share)``, the host first, shares
      summing to 1).
    - ``mode == "wait"``: the group cannot run the model yet; ``reason``
      says why ("need 51.7 GiB, group has 24.0 GiB of 2 nodes") and ``need_bytes`` /
      ``have_bytes`` carry the numbers for status.
    """

    mode: PlanMode | str
    host: str | None = None
    solo: tuple[str, ...] = ()
    shares: tuple[tuple[str, float], ...] = ()
    need_bytes: int = 0
    have_bytes: int = 0
    reason: str = ""
    # the plugin whose answer this is (filled in by meshd.placement.rules)
    decided_by: str = field(default="", compare=False)

    @property
    def workers(self) -> tuple[tuple[str, float], ...]:
        """The shares of the nodes other than the host."""
        return tuple(s for s in self.shares if s[0] != self.host)


def freeze(value: Any) -> Any:
    """A read-only copy of parsed TOML: tables become mapping proxies, lists tuples.

    Plugin settings are shared by every call; freezing them means one call
    cannot change what the next sees.
    """
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def node_ids(nodes: Iterable[NodeView]) -> tuple[str, ...]:
    return tuple(n.node_id for n in nodes)
