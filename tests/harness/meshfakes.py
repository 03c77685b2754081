"""In-memory stand-ins for the routing and election tests: a real ``meshd.daemon.node.Node``
over a fake mesh (a peer table the test writes), fake backends, a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.config import Config
from meshd.daemon.node import Node, ServedModel
from meshd.mesh.membership import DiskModel, PeerView
from meshd.mesh.penalties import Penalties
from meshd.models.scan import LocalModel, ScanResult
from meshd.placement.snapshot import GB

MB = 1024**2


class FakeBackend:
    def __init__(self, state: str = "ready", port: int = 5000):
        self.state = state
        self.port = port
        self.pid = 100
        self.restarts = 0
        self.stopped = 0
        self._listeners: list = []

    def add_listener(self, cb) -> None:
        self._listeners.append(cb)

    def set(self, state: str) -> None:
        self.state = state
        for cb in list(self._listeners):
            cb(state)

    def endpoint(self) -> Any:
        return ("local-endpoint", self.port)

    def stop(self, *, kill: bool = False) -> defer.Deferred:
        self.stopped += 1
        self.state = "stopped"
        return defer.succeed(None)


class FakeMesh:
    """``peers()`` from a dict the test edits; records re-gossip and drops."""

    def __init__(self) -> None:
        self.penalties = Penalties(Clock(), failures=10, refill_s=1.0)
        self.members: dict[str, PeerView] = {}
        self.conns: dict[str, Any] = {}
        self.changed = 0
        self.drops: list[str] = []
        self.published: list = []  # decisions told to the mesh (meshctl drop / serve)
        self.mesh_id = "mesh-1"

    def peers(self) -> list[PeerView]:
        return [self.members[k] for k in sorted(self.members)]

    def join_status(self) -> dict[str, str] | None:
        return None  # in a mesh

    def local_changed(self) -> None:
        self.changed += 1

    def drop_model(self, model: str) -> str:
        self.drops.append(model)
        return "drop-id"

    def publish_desired(self, decisions: list) -> None:
        self.published.extend(decisions)

    def learn_decisions(self, timeout_s: float) -> defer.Deferred:
        return defer.succeed(False)  # nobody to ask

    def status_peers(self) -> list[dict[str, Any]]:
        return []


def peer(node_id: str, *, serving=(), loading=(), waiting=(), vram_gb: float = 8.0,
         disk: dict[str, int] | None = None, role: str = "host", requested=()) -> PeerView:
    return PeerView(
        node_id=node_id, addrs=("127.0.0.1:1",), role=role, serving=tuple(serving),
        vram_bytes=int(vram_gb * GB),
        available_models=tuple(DiskModel(n, s) for n, s in (disk or {}).items()),
        requested_models=tuple(requested), rtt_ms=1.0, state="alive", incarnation=1, api="",
        loading=tuple(loading), waiting=tuple(waiting))


def make_node(node_id: str = "node-a", *, vram_gb: float = 8.0, disk: dict[str, int] | None = None,
              client: bool = False, standby: bool = False, split: bool = False,
              clock: Clock | None = None) -> Node:
    cfg = Config().replace("node", client=client, standby=standby)
    cfg = cfg.replace("models", split=split)
    node = Node(cfg, reactor=clock or Clock(), node_id=node_id, vram_bytes=int(vram_gb * GB))
    node.scan = ScanResult(models={
        name: LocalModel(name=name, path=f"/models/{name}.gguf", parts=(f"{name}.gguf",),
                         size_bytes=size)
        for name, size in (disk or {}).items()})
    node.mesh = FakeMesh()
    return node


def serve(node: Node, name: str, state: str = "ready", size: int = 300 * MB) -> FakeBackend:
    backend = FakeBackend(state)
    node.add_served(ServedModel(name, f"/models/{name}.gguf", size, backend))
    return backend
