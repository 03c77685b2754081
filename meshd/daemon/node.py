"""The node: what this daemon serves, and the one place status is assembled from.

The API, the control socket and the console all read the node; none of them
reaches into the backends or the mesh directly.  This keeps ``meshctl status
--json``, ``/api/status`` and ``/v1/models`` telling the same story.

The parts that depend on the node's role (the mesh, the route server, the
election, the passive node) are the current role group's (``meshd.daemon.roles``):
the role machine hands them over with :meth:`Node.use`, and the node's role is
the machine's (:attr:`Node.role`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet import defer
from twisted.python.failure import Failure

from meshd import __version__
from meshd.config import Config
from meshd.daemon.roles import RoleMachine, initial_role
from meshd.mesh.desired import Decision, DesiredState, Want
from meshd.nodename import label
from meshd.placement.explain import ExplanationStore
from meshd.placement.snapshot import MeshView, ModelFile, NodeView
from meshd.serving.router import RoutedMesh
from meshd.states import MODEL_STATE_OF_BACKEND, BackendState, ModelState, NodeState, Role

if TYPE_CHECKING:
    from meshd.daemon.split import SplitRuntime
    from meshd.mesh.membership import PeerView
    from meshd.metrics import NodeMetrics
    from meshd.models.download import Downloader
    from meshd.models.gpu import GpuReport
    from meshd.models.scan import LocalModel, ScanResult
    from meshd.passive.node import PassiveNode
    from meshd.passive.server import RouteServer
    from meshd.placement.election import Rebalancer
    from meshd.placement.plugins import PolicyManager
    from meshd.serving.router import MeshRouter
    from meshd.statedir import StateDir

log = logging.getLogger("meshd.daemon.node")


class Backend(Protocol):
    """What the node reads of a supervised llama-server (``meshd.backends.supervisor``)."""

    @property
    def state(self) -> BackendState: ...

    @property
    def pid(self) -> int | None: ...

    port: int | None
    restarts: int

    def add_listener(self, listener: Callable[[str], Any]) -> None: ...

    def when_ready(self) -> defer.Deferred[Any]: ...

    def stop(self, *, kill: bool = False) -> defer.Deferred[Any]: ...


class NodeMesh(RoutedMesh, Protocol):
    """What the node, and the router through it, need of the gossip (``meshd.mesh.gossip.MeshService``)."""

    @property
    def mesh_id(self) -> str | None: ...

    @property
    def conns(self) -> Sized: ...

    def peers(self) -> list[PeerView]: ...

    def status_peers(self) -> list[dict[str, Any]]: ...

    def local_changed(self) -> None: ...

    def drop_model(self, model: str) -> str: ...

    def publish_desired(self, decisions: list[Decision]) -> None: ...

    def learn_decisions(self, timeout_s: float) -> defer.Deferred[bool]: ...

    def make_token(self, ttl_s: float = ..., once: bool = ...) -> dict[str, Any]: ...

    def revoke_token(self, token_id: str) -> dict[str, Any]: ...

    def join(self, token: str) -> defer.Deferred[dict[str, Any]]: ...

    def join_status(self) -> dict[str, str] | None: ...


@dataclass(frozen=True)
class RoleParts:
    """The role-dependent parts the node reads, handed over by the role machine at a
    role change: an active node has a mesh, a route server and an election; a passive
    one its passive node.  ``router`` (the mesh-wide router) stays once made."""

    mesh: NodeMesh | None = None
    route_server: RouteServer | None = None
    rebalancer: Rebalancer | None = None
    passive: PassiveNode | None = None
    router: MeshRouter | None = None


@dataclass
class ServedModel:
    """A model this node serves with its own llama-server."""

    name: str
    path: str
    size_bytes: int
    backend: Backend  # meshd.backends.supervisor.LlamaServer

    @property
    def state(self) -> ModelState:
        return MODEL_STATE_OF_BACKEND[BackendState(self.backend.state)]


class Node:
    """This daemon's runtime state and the control socket's target (the API's router is ``meshd.serving.router``)."""

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        node_id: str,
        vram_bytes: int,
        gpu_report: GpuReport | None = None,
        shutdown: Callable[[], None] | None = None,
    ):
        self.config = config
        self.reactor = reactor
        self.node_id = node_id
        self.vram_bytes = vram_bytes
        self.gpu_report = gpu_report
        self.started_at: float = reactor.seconds()
        self.state = NodeState.STARTING
        self.served: dict[str, ServedModel] = {}
        self.wanted: list[str] = []
        # the role: client, standby or active (idle, host, worker from what it serves)
        self.roles = RoleMachine(initial_role(config.node), serving_role=self._serving_role)
        # the current role group's parts (Node.use): set by the role machine's outputs
        self.mesh: NodeMesh | None = None
        self.router: MeshRouter | None = None  # the API's router on an active node
        self.rebalancer: Rebalancer | None = None  # this node's model, election, assignment
        # rpc-servers and tunnel entries of split models (meshd.daemon.split), whatever the role
        self.split: SplitRuntime | None = None
        self.route_server: RouteServer | None = None  # answers passive nodes (active side)
        self.passive: PassiveNode | None = None  # while this node is passive
        # the mesh's drop/serve decisions (meshctl drop / serve): a dropped model is not
        # served, routed, assigned or promoted; kept across role changes, saved in state_dir
        self.desired = DesiredState()
        self.state_dir: StateDir | None = None  # where desired.json is saved (None: nowhere)
        # `meshctl serve` lifted the drop of a model of [models] serve: serve it again
        self.serve_again: Callable[[str], None] | None = None
        # models a drop stopped here, or kept from starting: the ones a lift serves again
        self.held_back: set[str] = set()
        self.policy: PolicyManager | None = None
        # the daemon's Prometheus registry (meshd.metrics): the parts that count read it here
        self.metrics: NodeMetrics | None = None
        self.downloader: Downloader | None = None
        self.scan: ScanResult | None = None
        self._shutdown = shutdown or (lambda: None)
        # meshd.daemon.reload's Reloader.reload, set by the service tree
        self.reloader: Callable[[], dict[str, Any]] | None = None
        self._status_listeners: list[Callable[[], None]] = []
        self._membership_listeners: list[Callable[[Any], None]] = []
        # the last election per model, for `meshctl explain` (meshd.placement.explain)
        self.explanations = ExplanationStore()

    def use(self, parts: RoleParts) -> None:
        """The role machine's hand-over at a role change (``meshd.daemon.roles``)."""
        self.mesh = parts.mesh
        self.route_server = parts.route_server
        self.rebalancer = parts.rebalancer
        self.passive = parts.passive
        if parts.router is not None:
            self.router = parts.router

    @property
    def dropped(self) -> frozenset[str]:
        """The models dropped mesh-wide (``meshctl drop``) and not served again since."""
        return self.desired.dropped

    @property
    def promotion(self) -> dict[str, Any] | None:
        """What a standby's promotion decided, and when (status)."""
        return self.roles.promotion

    # -- telling the console ----------------------------------------------------

    def add_status_listener(self, cb: Callable[[], None]) -> None:
        """``cb()`` whenever ``status()`` may read differently (models, backends, scans).

        Membership and downloads have listeners of their own (``mesh.add_listener``,
        ``downloader.downloads.listeners``).
        """
        self._status_listeners.append(cb)

    def add_membership_listener(self, cb: Callable[[Any], None]) -> None:
        """``cb(event)`` on every membership event of whichever mesh this node is in
        (the role machine builds a new mesh at a promotion; listeners stay)."""
        self._membership_listeners.append(cb)

    def remove_membership_listener(self, cb: Callable[[Any], None]) -> None:
        if cb in self._membership_listeners:
            self._membership_listeners.remove(cb)

    def membership_changed(self, event: Any) -> None:
        for cb in list(self._membership_listeners):
            try:
                cb(event)
            except Exception:
                log.exception("membership listener %r failed", cb)

    def status_changed(self) -> None:
        for cb in list(self._status_listeners):
            try:
                cb()
            except Exception:
                log.exception("status listener %r failed", cb)

    # -- what we serve ------------------------------------------------------

    def add_served(self, model: ServedModel) -> None:
        self.served[model.name] = model
        name = model.name

        def changed(state: str) -> None:
            self._backend_changed(name, state)

        model.backend.add_listener(changed)
        self.status_changed()

    def _backend_changed(self, name: str, state: str) -> None:
        log.debug("model %s backend is %s", name, state)
        if self.mesh is not None:
            self.mesh.local_changed()
        self.status_changed()

    @property
    def role(self) -> Role:
        return self.roles.role

    def _serving_role(self) -> Role:
        """An active node's role from what it serves: host when a llama-server of its own
        runs, host or worker when the election set it to serve a model it cannot run yet."""
        if self.served:
            return Role.HOST
        placed = self.rebalancer.role if self.rebalancer is not None else None
        return Role(placed) if placed is not None else Role.IDLE

    def status_line(self) -> str:
        """systemd's STATUS= and the ready line."""
        serving = f"serving {self.serving}" if self.serving else "serving nothing"
        return f"{self.role}, {serving}, API on {self.config.api.listen}"

    @property
    def serving(self) -> str | None:
        return next(iter(self.served), None)

    # -- what the mesh is told about us ------------------------------------------

    def local_info(self) -> dict[str, Any]:
        """This node's announce fields (the mesh adds identity and addresses)."""
        scan = self.scan
        return {
            "name": self.config.node.name,
            "role": self.role,
            "vram_bytes": self.vram_bytes,
            "serving": [name for name, m in self.served.items() if m.state == ModelState.WARM],
            "loading": [name for name, m in self.served.items()
                        if m.state == ModelState.LOADING],
            "waiting": self.waiting_models(),
            "available_models": [
                {"name": m.name, "size_bytes": m.size_bytes}
                for m in (scan.models.values() if scan else ())
            ],
            "requested_models": self.requested_models(),
            "versions": {"meshd": __version__},
            "api": self.config.api.listen,
        }

    # -- views for placement --------------------------------------------------

    def node_view(self) -> NodeView:
        scan = self.scan
        return NodeView(
            node_id=self.node_id,
            role=self.role,
            vram_bytes=self.vram_bytes,
            serving=tuple(self.served),
            available_models=tuple(
                ModelFile(m.name, m.size_bytes) for m in (scan.models.values() if scan else ())
            ),
            requested_models=tuple(self.requested_models()),
            rtt_ms=0.0,
            load=self.router.load_of(self.node_id) if self.router is not None else 0,
            name=self.config.node.name,
        )

    def mesh_view(self) -> MeshView:
        nodes = [self.node_view()]
        if self.mesh is not None:
            for p in self.mesh.peers():
                nodes.append(
                    NodeView(
                        node_id=p.node_id,
                        role=p.role,
                        vram_bytes=p.vram_bytes,
                        serving=tuple(p.serving),
                        available_models=tuple(
                            ModelFile(m.name, m.size_bytes) for m in p.available_models
                        ),
                        requested_models=tuple(p.requested_models),
                        rtt_ms=p.rtt_ms,
                        addrs=tuple(p.addrs),
                        name=p.name,
                    )
                )
        if self.route_server is not None:  # standbys checked in with us (for promotion ties)
            known = {n.node_id for n in nodes}
            nodes += [v for v in self.route_server.standby_views() if v.node_id not in known]
        return MeshView(
            self_id=self.node_id, nodes=tuple(nodes), max_rtt_ms=self.config.models.max_rtt_ms
        )

    # -- status and control ----------------------------------------------------

    def waiting_models(self) -> list[str]:
        """Models this node is set to serve but does not run (short of VRAM, a split worker)."""
        return self.rebalancer.waiting_models() if self.rebalancer is not None else []

    def waiting_reasons(self) -> dict[str, str]:
        """Why each model of :meth:`waiting_models` waits (the plan's numbers), for the 503."""
        d = self.rebalancer.decision if self.rebalancer is not None else None
        return {d.model: d.reason} if d is not None and d.reason else {}

    def model_status(self) -> list[dict[str, Any]]:
        """``models`` of ``meshctl status``: every model of the mesh once there is a router."""
        if self.router is not None:
            return self._mesh_model_status(self.router)
        out = []
        for m in self.served.values():
            b = m.backend
            out.append(
                {
                    "name": m.name,
                    "state": m.state,
                    "hosts": [self.node_id],
                    "size_bytes": m.size_bytes,
                    "split": None,
                    "backend": {
                        "state": b.state,
                        "pid": b.pid,
                        "port": b.port,
                        "restarts": b.restarts,
                    },
                }
            )
        for name in self.wanted:
            if name not in self.served:
                out.append({"name": name, "state": ModelState.COLD, "hosts": [],
                            "size_bytes": None, "split": None})
        return out

    def _split_status(self, model: str, decision: Any) -> dict[str, Any] | None:
        """``models[].split``: the plan's host and shares; on the host its RPC tunnels too."""
        if decision is None or decision.model != model:
            return None
        out = decision.split_status()
        tunnels = self.split.tunnels(model) if self.split is not None else None
        if out is not None and tunnels is not None:
            out["tunnels"] = tunnels
        return cast("dict[str, Any] | None", out)

    def _mesh_model_status(self, router: MeshRouter) -> list[dict[str, Any]]:
        snap = router.snapshot()
        decision = self.rebalancer.decision if self.rebalancer is not None else None
        out = []
        for m in snap.models.values():
            entry: dict[str, Any] = {
                "name": m.name, "state": m.state, "hosts": list(m.hosts),
                "size_bytes": m.size_bytes,
                "split": self._split_status(m.name, decision),
                "loading": list(m.loading), "waiting": list(m.waiting), "reason": m.reason,
            }
            if decision is not None and decision.model == m.name and m.name not in self.served:
                entry["local"] = {"state": decision.state, "reason": decision.reason}
            served = self.served.get(m.name)
            if served is not None:
                b = served.backend
                entry["local"] = {"state": served.state}
                entry["backend"] = {"state": b.state, "pid": b.pid, "port": b.port,
                                    "restarts": b.restarts}
            out.append(entry)
        return out

    # -- drop and serve: the mesh's desired state ------------------------------------------

    def requested_models(self) -> list[str]:
        """What this node asks the mesh to serve: ``[models] serve`` after the first, and
        the models ``meshctl serve`` asked for; none that is dropped."""
        asked = [*self.wanted, *sorted(m for m, d in self.desired.decisions.items()
                                       if d.want is Want.SERVE)]
        return [m for m in dict.fromkeys(asked) if m not in self.dropped]

    def drop(self, model: str) -> dict[str, Any]:
        """``meshctl drop MODEL``: stop serving ``model`` here and on every node of the mesh."""
        from meshd.errors import Refused

        self._refuse_if_passive("drop")
        known = model in self.served or model in self.wanted or model in self.desired.decisions
        if self.router is not None:
            entry = self.router.snapshot().models.get(model)
            known = known or (entry is not None and entry.reason != "on disk, not served")
        if not known:
            raise Refused(f"model {model!r} is not served in this mesh")
        decision = self._decide(model, Want.DROPPED)
        self._apply_drop(model, origin=self.node_id)
        peers = 0
        if self.mesh is not None:
            peers = len(self.mesh.conns)
            self.mesh.publish_desired([decision])
            self.mesh.drop_model(model)  # for peers older than DESIRED
        return {"dropped": model, "told_peers": peers, "version": decision.version}

    def serve_model(self, model: str) -> dict[str, Any]:
        """``meshctl serve MODEL``: lift a mesh-wide drop of ``model`` (the opposite of
        ``drop``), here and on every node: nodes configured to serve it serve it again, and
        the mesh asks for it (an idle node may be assigned it)."""
        from meshd.errors import Refused

        self._refuse_if_passive("serve")
        if not self._known_anywhere(model):
            raise Refused(f"model {model!r} is not dropped, served, on any node's disk or in "
                          "the catalog: nothing to serve")
        was_dropped = model in self.dropped
        decision = self._decide(model, Want.SERVE)
        self._lifted(model, origin=self.node_id)
        peers = 0
        if self.mesh is not None:
            peers = len(self.mesh.conns)
            self.mesh.publish_desired([decision])
        return {"serving": model, "was_dropped": was_dropped, "told_peers": peers,
                "version": decision.version}

    def desired_status(self) -> list[dict[str, Any]]:
        """``meshctl status`` ``desired``: every drop/serve decision, by model."""
        return [{"model": d.model, **d.to_body()}
                for _, d in sorted(self.desired.decisions.items())]

    def desired_heard(self, decisions: list[Decision], via: str) -> None:
        """Decisions from the mesh won the merge (already in :attr:`desired`): save, apply."""
        self._save_desired()
        for d in decisions:
            if d.want is Want.DROPPED:
                self._apply_drop(d.model, origin=d.by)
            else:
                self._lifted(d.model, origin=d.by)

    def learn_desired(self, decisions: list[Decision], via: str) -> None:
        """Decisions a passive node read in a routing table: merged, saved, applied."""
        taken = self.desired.merge(decisions)
        if taken:
            self.desired_heard(taken, via)

    def _refuse_if_passive(self, command: str) -> None:
        from meshd.errors import Refused

        if self.roles.passive:
            raise Refused(f"this node is a {self.role}: it takes no part in the gossip, so no "
                          f"other node would hear it; run meshctl {command} on an active node")

    def _decide(self, model: str, want: Want) -> Decision:
        from meshd.errors import Refused

        try:
            decision = self.desired.decide(model, want, by=self.node_id, at=_wall_clock())
        except ValueError as e:
            raise Refused(str(e)) from None
        self._save_desired()
        return decision

    def _save_desired(self) -> None:
        if self.state_dir is None:
            return
        try:
            self.state_dir.save_desired(self.desired.decisions.values())
        except Exception as e:  # noqa: BLE001 - a full disk must not undo the decision here
            log.warning("cannot save the mesh's drop/serve decisions: %s (they hold until "
                        "this node restarts)", e)

    def _known_anywhere(self, model: str) -> bool:
        if self.desired.get(model) is not None or model in self.served or model in self.wanted:
            return True
        if any(m.name == model for m in self.mesh_view().models):
            return True
        from meshd.models.catalog import load_catalog

        try:
            return load_catalog().get(model) is not None
        except Exception:  # noqa: BLE001 - a broken catalog is said at start
            return False

    def _who(self, origin: str) -> str:
        """The node a decision came from, for a log line: its name while it is a peer."""
        if origin == self.node_id:
            return "this node"
        names = {p.node_id: p.name for p in self.mesh.peers()} if self.mesh else {}
        return f"node {label(names.get(origin), origin)}"

    def _lifted(self, model: str, origin: str) -> None:
        """``meshctl serve`` on ``origin``: serve ``model`` again if ``[models] serve`` names
        it, and let an idle node take it."""
        log.info("model %s asked for mesh-wide by %s (meshctl serve): not dropped any more",
                 model, self._who(origin))
        if self.router is not None:
            self.router.invalidate()
        if self.mesh is not None:
            self.mesh.local_changed()
        self.status_changed()
        if model in self.held_back:
            self.held_back.discard(model)
            if model not in self.served and self.serve_again is not None:
                self.serve_again(model)
        if self.rebalancer is not None:
            self.rebalancer.on_event()  # an idle node may promote for it, or be assigned it

    def drop_local(self, model: str, origin: str) -> None:
        """Stop serving ``model`` on this node and remember the drop (DROP from ``origin``)."""
        fresh = model not in self.dropped
        if fresh:  # a drop heard without a decision (a peer older than DESIRED, a test)
            from meshd.mesh.desired import from_drop

            self.desired.merge([from_drop(model, origin, None, self.desired.get(model))])
            self._save_desired()
        self._apply_drop(model, origin, say=fresh)

    def _apply_drop(self, model: str, origin: str, *, say: bool = True) -> None:
        """``model`` is dropped (already in :attr:`desired`): stop it, route it nowhere."""
        self.held_back.add(model)
        if self.rebalancer is not None:
            self.rebalancer.forget(model)
        if model in self.served:
            self.stop_serving(model)
        if say:
            log.info("model %s dropped mesh-wide by %s: not serving, routing or assigning it "
                     "(meshctl serve %s lifts the drop)", model, self._who(origin), model)
        if self.router is not None:
            self.router.invalidate()
        if self.mesh is not None:
            self.mesh.local_changed()
        self.status_changed()
        if self.rebalancer is not None:
            self.rebalancer.on_event()  # an idle node may take another model

    def stop_serving(self, model: str, *, kill: bool = False) -> defer.Deferred[Any]:
        """Stop this node's llama-server for ``model`` and forget it; fires once it is gone.
        ``kill``: SIGKILL at once (a split that lost a part: it cannot recover)."""
        served = self.served.pop(model, None)
        if served is None:
            return defer.succeed(None)
        log.info("stopping llama-server for %s", model)
        if self.router is not None:
            self.router.invalidate()
        if self.mesh is not None:
            self.mesh.local_changed()
        self.status_changed()
        return served.backend.stop(kill=kill)

    def status(self) -> dict[str, Any]:
        out = self._status()
        passive = self.passive
        if passive is not None:  # no mesh of its own: the routing table it lives on
            out["mesh_id"] = passive.mesh_id
            out["models"] = passive.model_status()
            out["route"] = passive.status()
        promotion = self.promotion
        if promotion is not None:
            out["promotion"] = promotion
        return out

    def _status(self) -> dict[str, Any]:
        return {
            "name": self.config.node.name,  # what people call it; node_id stays the identity
            "node_id": self.node_id,
            "mesh_id": self.mesh.mesh_id if self.mesh is not None else None,
            # not in a mesh yet: joining, or waiting for `meshctl join` (and why)
            "join": self.mesh.join_status() if self.mesh is not None else None,
            "role": self.role,
            "serving": self.serving,
            "state": self.state,
            "api": self.config.api.listen,
            "uptime_s": round(self.reactor.seconds() - self.started_at, 3),
            "vram_bytes": self.vram_bytes,
            "peers": self.peers(),
            "passive": (self.route_server.counts() if self.route_server is not None
                        else {"clients": 0, "standby": 0}),
            "models": self.model_status(),
            "downloads": self.downloader.downloads.to_status() if self.downloader else [],
            # gated or failed downloads stay visible, with the numbers and the reason
            "downloads_refused": (
                self.downloader.downloads.refused_status() if self.downloader else []
            ),
            "downloads_failed": self.downloader.downloads.failed_status() if self.downloader else [],
            # the mesh's drop/serve decisions (meshctl drop / serve), by model
            "desired": self.desired_status(),
        }

    def peers(self) -> list[dict[str, Any]]:
        return self.mesh.status_peers() if self.mesh is not None else []

    def model_table(self, catalog: bool = False) -> dict[str, Any]:
        """``meshctl models``: the mesh's models, what is on this disk, and the catalog."""
        from meshd.models.catalog import catalog_listing, load_catalog

        scan = self.scan
        table: dict[str, Any] = {
            "mesh": self.model_status(),
            "disk": [m.to_dict() for m in scan.models.values()] if scan else [],
            "problems": list(scan.problems) if scan else [],
        }
        if catalog:
            table["catalog"] = catalog_listing(load_catalog(), scan) if scan else []
        return table

    def download(self, name: str) -> defer.Deferred[dict[str, Any]]:
        """Start a download by hand; gated like any other.  Progress shows in status.

        Answers once the transfer has begun (``downloading``), the model turned
        out to be on disk already (``on disk``), or it was refused: for an ``hf:``
        name the gate decides only after the hub said how big the file is, and
        the refusal, with its numbers, is the answer (``meshctl`` exit 3).
        """
        from meshd.errors import Refused

        if self.downloader is None:
            raise Refused("downloads are not available on this node")
        answer: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def started() -> None:
            if not answer.called:
                answer.callback({"name": name, "state": "downloading"})

        def done(model: LocalModel) -> None:
            self._downloaded(model)
            if not answer.called:
                answer.callback({"name": model.name, "state": "on disk"})

        def failed(f: Failure) -> None:
            if not answer.called:  # refused, unknown, or failed before any transfer began
                answer.errback(Failure(Refused(f.getErrorMessage())))
            else:
                log.error("download of %s failed: %s", name, f.getErrorMessage())

        self.downloader.download(name, on_started=started).addCallbacks(done, failed)
        return answer

    def _downloaded(self, model: LocalModel) -> None:
        log.info("downloaded %s (%s)", model.name, model.path)
        self.rescan()
        if self.rebalancer is not None:
            self.rebalancer.downloaded()

    def rescan(self) -> None:
        """Scan the model directories again (after a download, on SIGHUP) and re-gossip."""
        from meshd.models import scan as modelsmod

        self.scan = modelsmod.scan([self.config.node.models_dir, *self.config.models.extra_dirs])
        if self.mesh is not None:
            self.mesh.local_changed()
        self.status_changed()

    def explain(self, model: str, client_id: str = "") -> dict[str, Any]:
        """``meshctl explain MODEL``: why ``model`` is where it is (``meshd.placement.explain``)."""
        from meshd.placement.explain import explain_model

        return explain_model(self, model, client_id)

    def reload(self) -> dict[str, Any]:
        """``meshctl reload``, SIGHUP: the configuration read again and what can be applied
        live applied (``meshd.daemon.reload``); raises ``Refused`` when the file is broken."""
        if self.reloader is not None:
            return self.reloader()
        self.rescan()
        return {"reloaded": True, "models_on_disk": len(self.scan.models) if self.scan else 0}

    def gpus(self) -> dict[str, Any]:
        if self.gpu_report is None:
            return {}
        return self.gpu_report.to_dict()

    def make_token(self, ttl_s: float = 86400, once: bool = False) -> dict[str, Any]:
        return self._mesh().make_token(ttl_s=ttl_s, once=once)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._mesh().revoke_token(token_id)

    def join(self, token: str) -> defer.Deferred:
        return self._mesh().join(token)

    def _mesh(self) -> NodeMesh:
        from meshd.errors import Refused

        if self.mesh is None:
            raise Refused("the mesh is not started yet")
        return self.mesh

    def leave(self) -> defer.Deferred:
        """Answer the caller first, then shut down as SIGTERM would."""
        log.info("leave requested over the control socket")
        self.reactor.callLater(0.05, self._shutdown)
        return defer.succeed({"leaving": True})


def _wall_clock() -> float:
    """Seconds since the epoch, for a decision's ``at`` (people read it; the merge does not)."""
    import time

    return round(time.time(), 3)
