"""The mesh-wide router: which llama-server, here or on which peer, answers a request.

The API asks :class:`MeshRouter` (the ``meshd.serving.routing.Router`` contract) for
the upstreams of a model, best first:

- every ready host of the model: this node's own llama-server when it serves
  the model warm, the others (from the peer table: peers announce the models
  they serve warm) through an HTTP tunnel (``meshd.serving.tunnel``);
- the first chosen by the host-selection hook, asked once per request with
  every host, this node among them (``placement.order_hosts``; the default
  picks this node when it is a host, else ``hash(client_id + model) %
  len(hosts)``), then the failover order: this node, then the rest by node
  id.  A host whose tunnel failed in the last few seconds goes last until the
  mesh has checked it.

What the router knows is rebuilt into one immutable :class:`RouteSnapshot`
after every change (membership events, a local backend changing state, a
drop), never per request; a request costs a dict lookup, one hook call when a
model has several hosts (none with one), and the upstream list.

A model is *known* when some node serves it, is loading it, is waiting for
VRAM to run it, or asks for it (``[models] serve``): a request for it with no
host ready gets 503 + Retry-After.  Anything else is unknown: 404 listing the
models the mesh serves.  A dropped model (``meshctl drop``) is gone from the
table at once, before any peer re-announces.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.interfaces import IStreamClientEndpoint

from meshd.placement import rules as placement
from meshd.placement.snapshot import MeshView, NodeView
from meshd.serving import routing
from meshd.serving.tunnel import TunnelEndpoint, TunnelMesh
from meshd.states import BackendState, ModelState

if TYPE_CHECKING:
    from meshd.placement.plugins import PolicyManager

log = logging.getLogger("meshd.serving.router")

# the states a model can be in, mesh-wide, best first (status and /v1/models)
WARM, LOADING, WAITING, COLD = ModelState.WARM, ModelState.LOADING, ModelState.WAITING, ModelState.COLD
# a model in one of these states is listed by /v1/models (someone runs or will run it)
LISTED_STATES = frozenset({WARM, LOADING, WAITING})
# local backend states that mean "a llama-server is coming up"
LOCAL_LOADING = frozenset({BackendState.STARTING, BackendState.LOADING, BackendState.RESTARTING})
# a host whose tunnel failed stays at the end of the failover order this long
SUSPECT_S = 10.0
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class ModelEntry:
    """One model as the whole mesh runs it (what status and /v1/models show)."""

    name: str
    state: ModelState
    hosts: tuple[str, ...] = ()  # ready hosts, sorted
    loading: tuple[str, ...] = ()  # nodes starting a llama-server for it
    waiting: tuple[str, ...] = ()  # nodes set to run it but short of VRAM
    size_bytes: int | None = None
    reason: str = ""

    @property
    def nodes(self) -> int:
        return len(set(self.hosts) | set(self.loading) | set(self.waiting))


@dataclass(frozen=True)
class RouteSnapshot:
    """Everything a routing decision reads, frozen at one change."""

    view: MeshView
    models: dict[str, ModelEntry] = field(default_factory=dict)
    # model -> NodeView of each ready host (self included), sorted by node id
    hosts: dict[str, tuple[NodeView, ...]] = field(default_factory=dict)

    def listed(self) -> list[ModelEntry]:
        return [m for m in self.models.values() if m.state in LISTED_STATES]


def build_snapshot(
    self_id: str,
    view: MeshView,
    *,
    local_states: Mapping[str, str],
    peer_loading: dict[str, tuple[str, ...]],
    peer_waiting: dict[str, tuple[str, ...]],
    local_waiting: tuple[str, ...] = (),
    local_reasons: dict[str, str] | None = None,
    local_sizes: dict[str, int] | None = None,
    dropped: frozenset[str] = frozenset(),
) -> RouteSnapshot:
    """The routing snapshot from a mesh view plus what views do not carry.

    ``local_states``: this node's served models -> ``BackendState``; ``peer_loading`` / ``peer_waiting``: node id -> models it
    is loading / waiting for VRAM to run; ``local_waiting``: the same for this
    node, and ``local_reasons`` why (the plan's numbers); ``local_sizes``: sizes of the models this node serves (they may live
    outside the scanned directories); ``dropped``: models this node was told
    to drop (left out entirely).
    Pure: tested without a mesh.
    """
    hosts: dict[str, list[NodeView]] = {}
    loading: dict[str, set[str]] = {}
    waiting: dict[str, set[str]] = {}
    me = view.node(self_id)
    for info in view.models:
        for node_id in info.hosts:
            if node_id == self_id:
                continue  # our own state comes from the backends below
            node = view.node(node_id)
            if node is not None:
                hosts.setdefault(info.name, []).append(node)
    for name, state in local_states.items():
        if state == BackendState.READY and me is not None:
            hosts.setdefault(name, []).append(me)
        elif state in LOCAL_LOADING:
            loading.setdefault(name, set()).add(self_id)
    for node_id, its_models in peer_loading.items():
        for name in its_models:
            loading.setdefault(name, set()).add(node_id)
    for node_id, its_models in peer_waiting.items():
        for name in its_models:
            waiting.setdefault(name, set()).add(node_id)
    for name in local_waiting:
        waiting.setdefault(name, set()).add(self_id)

    models: dict[str, ModelEntry] = {}
    names = {m.name for m in view.models} | set(hosts) | set(loading) | set(waiting)
    for name in sorted(names - dropped):
        known = view.model(name)
        ready = tuple(sorted(n.node_id for n in hosts.get(name, ())))
        load = tuple(sorted(loading.get(name, set()) - set(ready)))
        wait = tuple(sorted(waiting.get(name, set()) - set(ready) - set(load)))
        if ready:
            state, reason = WARM, ""
        elif load:
            state, reason = LOADING, f"loading on {', '.join(load)}"
        elif wait and (local_reasons or {}).get(name):
            state, reason = WAITING, f"waiting: {(local_reasons or {})[name]}"
        elif wait:
            state, reason = WAITING, f"waiting for VRAM on {', '.join(wait)}"
        elif known is not None and known.requested_by:
            state, reason = COLD, "no node serves it yet"
        else:
            state, reason = COLD, "on disk, not served"
        models[name] = ModelEntry(
            name=name, state=state, hosts=ready, loading=load, waiting=wait,
            size_bytes=view.size_of(name) or (local_sizes or {}).get(name), reason=reason)
    host_views = {m: tuple(sorted(ns, key=lambda n: n.node_id))
                  for m, ns in hosts.items() if m not in dropped}
    return RouteSnapshot(view=view, models=models, hosts=host_views)


def order_hosts(
    model: str,
    client_id: str,
    hosts: tuple[NodeView, ...],
    view: MeshView,
    *,
    self_id: str,
    suspects: frozenset[str] = frozenset(),
    policy: PolicyManager | None = None,
    answers: list[placement.HookRecord] | None = None,
) -> list[str]:
    """The node ids to try for one request, best first.

    ``placement.order_hosts``: the host-selection hook's choice among every
    ready host, this node included (the default picks this node when it is
    one), then this node, then the rest by node id.  Hosts in ``suspects``
    keep their relative order but go after every other.
    """
    if view.self_id != self_id:
        view = dataclasses.replace(view, self_id=self_id)
    ordered = placement.order_hosts(model, client_id, hosts, view, policy=policy, answers=answers)
    if suspects:
        ordered = [h for h in ordered if h not in suspects] + [h for h in ordered if h in suspects]
    return ordered


EndpointFactory = Callable[[str, str], IStreamClientEndpoint]


class RoutedPeer(Protocol):
    """A peer as the router reads it (``meshd.mesh.membership.PeerView``)."""

    @property
    def node_id(self) -> str: ...

    @property
    def loading(self) -> Sequence[str]: ...

    @property
    def waiting(self) -> Sequence[str]: ...


class RoutedMesh(TunnelMesh, Protocol):
    """The mesh as the router reads it: its peers, and what a tunnel to one needs."""

    def peers(self) -> Sequence[RoutedPeer]: ...


class RoutedNode(Protocol):
    """What the router needs of this node (``meshd.daemon.node.Node``): its id, its served
    models (``ServedModel``: ``backend``, ``size_bytes``, ``state``), the views, the drops."""

    @property
    def node_id(self) -> str: ...

    @property
    def started_at(self) -> float: ...

    @property
    def policy(self) -> PolicyManager | None: ...

    @property
    def served(self) -> Mapping[str, Any]: ...

    @property
    def dropped(self) -> Collection[str]: ...

    @property
    def mesh(self) -> RoutedMesh | None: ...

    def waiting_models(self) -> list[str]: ...

    def waiting_reasons(self) -> dict[str, str]: ...

    def mesh_view(self) -> MeshView: ...


class MeshRouter:
    """``routing.Router`` for an active node: local llama-servers and tunnels to peers.

    ``node`` is the ``meshd.daemon.node.Node`` (served models, the mesh, policy,
    dropped models); ``tunnel(node_id, model)`` makes the client endpoint of
    a tunnel (``meshd.serving.tunnel.TunnelEndpoint`` in the daemon).
    """

    def __init__(self, node: RoutedNode, *, reactor: Any,
                 tunnel: EndpointFactory | None = None):
        self.node = node
        self.reactor = reactor
        self._tunnel = tunnel or self._default_tunnel
        self.in_flight: dict[str, int] = {}  # node id -> requests in flight to it from here
        self._suspects: dict[str, float] = {}  # node id -> when its tunnel failed
        self._snapshot: RouteSnapshot | None = None
        self._upstreams: dict[tuple[str, str], routing.Upstream] = {}

    def _default_tunnel(self, node_id: str, model: str) -> IStreamClientEndpoint:
        mesh = self.node.mesh
        assert mesh is not None, "an active node routes to peers through its mesh"
        return cast(IStreamClientEndpoint, TunnelEndpoint(mesh, node_id, model))

    # -- keeping the table -----------------------------------------------------------------

    def invalidate(self, *_: Any) -> None:
        """Something changed (membership, a backend, a drop): rebuild on next use."""
        self._snapshot = None

    def snapshot(self) -> RouteSnapshot:
        snap = self._snapshot
        if snap is None:
            snap = self._snapshot = self._build()
            self._upstreams = {}
        return snap

    def _build(self) -> RouteSnapshot:
        node = self.node
        peer_loading: dict[str, tuple[str, ...]] = {}
        peer_waiting: dict[str, tuple[str, ...]] = {}
        if node.mesh is not None:
            for p in node.mesh.peers():
                peer_loading[p.node_id] = tuple(p.loading)
                peer_waiting[p.node_id] = tuple(p.waiting)
        local_waiting = tuple(node.waiting_models())
        return build_snapshot(
            node.node_id,
            node.mesh_view(),
            local_states={name: m.backend.state for name, m in node.served.items()},
            peer_loading=peer_loading,
            peer_waiting=peer_waiting,
            local_waiting=local_waiting,
            local_reasons=node.waiting_reasons(),
            local_sizes={name: m.size_bytes for name, m in node.served.items()},
            dropped=frozenset(node.dropped),
        )

    # -- routing.Router ----------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        created = int(self.node.started_at)
        return [
            {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "meshd",
                "meshd": {"hosts": list(m.hosts), "nodes": m.nodes, "state": m.state},
            }
            for m in self.snapshot().listed()
        ]

    def upstreams(self, model: str, client_id: str) -> list[routing.Upstream]:
        return [self._upstream(node_id, model) for node_id in self._order(model, client_id)]

    def _order(self, model: str, client_id: str,
               answers: list[placement.HookRecord] | None = None) -> list[str]:
        """The node ids a request for ``model`` from ``client_id`` tries, best first."""
        snap = self.snapshot()
        hosts = snap.hosts.get(model)
        if not hosts:
            entry = snap.models.get(model)
            if entry is None or (entry.state == COLD and entry.reason == "on disk, not served"):
                raise routing.UnknownModel(model, [m.name for m in snap.listed()])
            raise routing.NotReady(model, entry.reason, retry_after_s=RETRY_AFTER_S)
        if len(hosts) > 1:
            me = self.node.node_id
            # what this node has in flight to each host; its own view's load is the same
            # count, taken when the snapshot was built, so it is replaced, not added to
            hosts = tuple(
                dataclasses.replace(h, load=(0 if h.node_id == me else h.load)
                                    + self.in_flight.get(h.node_id, 0))
                for h in hosts)
        return order_hosts(model, client_id, hosts, snap.view, self_id=self.node.node_id,
                           suspects=self._current_suspects(), policy=self.node.policy,
                           answers=answers)

    def explain_route(self, model: str, client_id: str) -> dict[str, Any]:
        """``meshctl explain``'s routing part: the hosts a request for ``model`` from
        ``client_id`` would try now, in order, and which plugin chose the first (the
        hook is asked as a request asks it; nothing is sent)."""
        from meshd.placement.explain import route_explanation

        answers: list[placement.HookRecord] = []
        try:
            order = self._order(model, client_id, answers)
        except routing.RouteError as e:
            return route_explanation(client_id, error=e)
        return route_explanation(client_id, order, self.snapshot().view, self.node.node_id,
                                 answers, suspects=self._current_suspects(),
                                 in_flight=self.in_flight,
                                 note="the hook's choice first, then this node when it is a "
                                      "host, then by node id")

    def _upstream(self, node_id: str, model: str) -> routing.Upstream:
        key = (node_id, model)
        up = self._upstreams.get(key)
        if up is not None:
            return up
        if node_id == self.node.node_id:
            backend = self.node.served[model].backend
            up = routing.Upstream(name="local", endpoint=backend.endpoint,
                                  pool_key=f"local:{model}:{backend.port}", node_id=node_id,
                                  # read per request: each start has its own key (a fake
                                  # backend in tests, or rpc-less tooling, may have none)
                                  api_key=lambda: getattr(backend, "api_key", ""),
                                  traffic=getattr(backend, "traffic", None))
        else:
            up = routing.Upstream(name=node_id,
                                  endpoint=functools.partial(self._tunnel, node_id, model),
                                  pool_key=f"tunnel:{node_id}:{model}", node_id=node_id)
        self._upstreams[key] = up
        return up

    def local_upstream(self, model: str) -> routing.Upstream:
        """This node's own llama-server for ``model`` (which it serves), pooled like any upstream."""
        self.snapshot()  # a rebuilt table drops the upstream of a restarted llama-server
        return self._upstream(self.node.node_id, model)

    def _current_suspects(self) -> frozenset[str]:
        if not self._suspects:
            return frozenset()
        now = self.reactor.seconds()
        for node_id, at in list(self._suspects.items()):
            if now - at > SUSPECT_S:
                del self._suspects[node_id]
        return frozenset(self._suspects)

    def _node_of(self, upstream: routing.Upstream) -> str:
        return self.node.node_id if upstream.name == "local" else upstream.name

    def upstream_failed(self, upstream: routing.Upstream, reason: str) -> None:
        node_id = self._node_of(upstream)
        if node_id != self.node.node_id:
            self._suspects[node_id] = self.reactor.seconds()
        log.warning("host %s failed before answering: %s", upstream.name, reason)

    def request_started(self, upstream: routing.Upstream) -> None:
        key = self._node_of(upstream)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def request_finished(self, upstream: routing.Upstream) -> None:
        key = self._node_of(upstream)
        left = self.in_flight.get(key, 1) - 1
        if left > 0:
            self.in_flight[key] = left
        else:
            self.in_flight.pop(key, None)

    def load_of(self, node_id: str) -> int:
        """Requests this node has in flight to ``node_id`` (``NodeView.load`` for hooks)."""
        return self.in_flight.get(node_id, 0)


class LocalOnlyRouter:
    """``routing.Router`` for the far end of tunnels: this node's own llama-server, nothing else.

    A request that came through a tunnel (``meshd.serving.tunnel``) was routed by the
    requesting node; here it goes to this node's llama-server for the model or
    nowhere (``routing.NotReady``, which the tunnel's API answers by hanging
    up so the requester fails over), so it can never hop on to a third node.
    ``check(model)`` is the same test for the TUNNEL header.  Requests carried
    for peers are not counted in ``MeshRouter.in_flight`` (requests *from* here).
    """

    def __init__(self, router: MeshRouter):
        self.router = router

    def why_not(self, model: str) -> str:
        """Why this node cannot take a request for ``model`` now; ``""`` when it can."""
        node = self.router.node
        if model in node.dropped:
            return f"{model} was dropped from the mesh"
        served = node.served.get(model)
        if served is None:
            return f"this node does not serve {model}"
        if served.backend.state != BackendState.READY:
            return f"{model} is {served.state} on this node"
        return ""

    def check(self, model: str) -> None:
        """The TUNNEL header's test: ``TunnelRefused`` (the requester fails over) unless served here."""
        from meshd.serving.tunnel import TunnelRefused

        reason = self.why_not(model)
        if reason:
            raise TunnelRefused(reason)

    # -- routing.Router ----------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return self.router.models()

    def upstreams(self, model: str, client_id: str) -> list[routing.Upstream]:
        reason = self.why_not(model)
        if reason:
            raise routing.NotReady(model, reason, retry_after_s=RETRY_AFTER_S)
        return [self.router.local_upstream(model)]

    def upstream_failed(self, upstream: routing.Upstream, reason: str) -> None:
        self.router.upstream_failed(upstream, reason)

    def request_started(self, upstream: routing.Upstream) -> None:
        pass

    def request_finished(self, upstream: routing.Upstream) -> None:
        pass
