"""This node's part in split models: the rpc-server it lends as a worker, and, as a host,
the rpc-server and tunnel entry ports its llama-server runs over.

The election (``meshd.placement.election``) decides; this carries it out:

- **Worker** (``lend(model, host)``): one ``ggml-rpc-server`` on 127.0.0.1 with
  its tensor cache on, and ``"rpc"`` tunnels accepted from the elected host
  only, while that rpc-server is ready (``refusal``).  ``unlend`` stops both.
- **Host** (``prepare(model, shares)``): an entry port per remote worker
  (``meshd.serving.rpctunnel.EntryPort``), each worker probed through a tunnel
  until it answers (its rpc-server is up and it agrees this node is its host);
  on a node without GPUs its own share runs in a local rpc-server too
  (llama.cpp gives the CPU device no ``--tensor-split`` share).  The answer is
  the ``--rpc`` list and the ``--tensor-split`` weights in llama.cpp's device
  order: RPC devices first, in ``--rpc`` order, then the local GPUs (this
  llama.cpp version puts RPC servers at the front of the device list).
  ``release(model)`` closes the entries and stops the local rpc-server; it is
  called after the llama-server that used them stopped (stop order: llama-server
  first, then the rpc-servers).

The RPC cache: rpc-server keeps tensors it was sent (over 10 MiB each) under
``$LLAMA_CACHE/rpc``, so a restart or re-plan does not send the weights over
the network again.  llama.cpp never cleans it: before each start the oldest
files go until the directory is under ``[llama] rpc_cache_max_gb``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task

from meshd.backoff import Backoff
from meshd.serving import rpctunnel
from meshd.states import BackendState
from meshd.units import gib

if TYPE_CHECKING:
    from meshd.backends.supervisor import RpcServer
    from meshd.config import Config
    from meshd.serving.tunnel import TunnelMesh

log = logging.getLogger("meshd.daemon.split")

# a worker is probed this often (doubling) until it answers, while the plan stands
PROBE_MIN_S, PROBE_MAX_S = 0.25, 2.0


def cache_root(config: Config, environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where rpc-server's tensor cache lives (``LLAMA_CACHE``): ``[llama] rpc_cache_dir``, else
    the unit's cache directory (systemd's ``CACHE_DIRECTORY``), else beside the state."""
    if config.llama.rpc_cache_dir:
        return Path(config.llama.rpc_cache_dir)
    unit_cache = environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if unit_cache:
        return Path(unit_cache)
    return Path(config.node.state_dir) / "cache"


def evict(directory: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently used files until ``directory`` holds at most ``max_bytes``."""
    try:
        files = [(p.stat(), p) for p in directory.iterdir() if p.is_file()]
    except OSError:
        return []
    total = sum(st.st_size for st, _ in files)
    removed = []
    for st, p in sorted(files, key=lambda f: max(f[0].st_atime, f[0].st_mtime)):
        if total <= max_bytes:
            break
        try:
            p.unlink()
        except OSError:
            continue
        total -= st.st_size
        removed.append(p)
    if removed:
        log.info("rpc cache %s: removed %d least recently used file(s), %s left", directory,
                 len(removed), gib(total))
    return removed


@dataclass
class HostedSplit:
    """What a split host runs beside its llama-server for one model."""

    model: str
    shares: tuple[tuple[str, float], ...]
    entries: dict[str, rpctunnel.EntryPort] = field(default_factory=dict)
    local_rpc: RpcServer | None = None
    cancelled: bool = False
    waiting_for: set[str] = field(default_factory=set)

    def tunnels(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries.values()]


class SplitRuntime:
    """Carries out this node's split decisions (see the module doc).

    ``make_rpc(name, cache_dir)`` builds a (not started) ``RpcServer``;
    ``mesh()`` is the mesh now (tunnels are opened through it); ``llama_pid(model)``
    is the pid of this node's llama-server for the model (the one process an
    entry port lets in); ``has_gpus`` says whether this node's own share runs on
    its GPUs or in a local rpc-server.
    """

    def __init__(self, config: Config, *, reactor: Any, node_id: str,
                 make_rpc: Callable[[str, Path | None], RpcServer],
                 mesh: Callable[[], TunnelMesh | None],
                 llama_pid: Callable[[str], int | None],
                 has_gpus: bool = False,
                 gpu_weights: Sequence[float] = ()):
        self.config = config
        self.reactor = reactor
        self.node_id = node_id
        self._make_rpc = make_rpc
        self._mesh = mesh
        self._llama_pid = llama_pid
        self.has_gpus = has_gpus
        self.gpu_weights = tuple(gpu_weights) or (1.0,)
        # on_broken(model, why): a hosted split lost a part it cannot run without (a
        # worker's tunnel, the local rpc-server); the owner starts the split over
        self.on_broken: Callable[[str, str], Any] | None = None
        # worker side
        self.lending: tuple[str, str] | None = None  # (model, host)
        self.worker_rpc: RpcServer | None = None
        self.tunnel_host = rpctunnel.RpcTunnelHost(reactor, refusal=self.refusal,
                                                   rpc_port=self.worker_port)
        # host side
        self.hosting: dict[str, HostedSplit] = {}

    def attach(self, mesh: TunnelMesh) -> None:
        self.tunnel_host.attach(mesh)

    # -- the cache ---------------------------------------------------------------------------

    def _cache_dir(self) -> Path | None:
        llama = self.config.llama
        if not llama.rpc_cache:
            return None
        root = cache_root(self.config)
        rpc_dir = root / "rpc"
        try:
            rpc_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            log.warning("rpc cache %s: %s; running without the cache", rpc_dir, e)
            return None
        evict(rpc_dir, int(llama.rpc_cache_max_gb * 2**30))
        return root

    def _start_rpc(self, name: str) -> RpcServer:
        server = self._make_rpc(name, self._cache_dir())
        server.start()
        return server

    # -- worker ------------------------------------------------------------------------------

    def lend(self, model: str, host: str) -> None:
        """This node is a worker of ``host`` for ``model``: run the rpc-server, accept its tunnels."""
        if self.lending != (model, host):
            log.info("lending this node's rpc-server to host %s for %s", host, model)
        old = self.lending
        self.lending = (model, host)
        if old is not None and old[1] != host:
            self.tunnel_host.close_all()  # the old host's tunnels are not for the new one
        if self.worker_rpc is None:
            self.worker_rpc = self._start_rpc(f"{model} worker")

    def unlend(self) -> defer.Deferred[None]:
        """No longer a worker: close the host's tunnels, stop the rpc-server."""
        if self.lending is not None:
            log.info("no longer lending this node's rpc-server (was for %s, host %s)",
                     self.lending[0], self.lending[1])
        self.lending = None
        self.tunnel_host.close_all()
        rpc, self.worker_rpc = self.worker_rpc, None
        return rpc.stop() if rpc is not None else defer.succeed(None)

    def worker_port(self) -> int | None:
        rpc = self.worker_rpc
        return rpc.port if rpc is not None and rpc.state == BackendState.READY else None

    def refusal(self, model: str, who: str) -> str:
        """Why an ``"rpc"`` tunnel for ``model`` from ``who`` is refused (``""``: open it)."""
        if self.lending is None:
            return "this node is no split worker now"
        lent_model, host = self.lending
        if model != lent_model:
            return f"this node lends its rpc-server for {lent_model}, not {model}"
        if who != host:
            return f"this node's rpc-server is lent to host {host}, not {who}"
        if self.worker_port() is None:
            state = self.worker_rpc.state if self.worker_rpc is not None else "stopped"
            return f"this node's rpc-server is {state}"
        return ""

    # -- host ----------------------------------------------------------------------------------

    def prepare(self, model: str, shares: tuple[tuple[str, float], ...]
                ) -> defer.Deferred[tuple[list[str], list[float]]]:
        """Set up ``model``'s split: entry ports, workers answering, the local rpc-server;
        fires with ``(--rpc list, --tensor-split weights)``."""
        return defer.ensureDeferred(self._prepare(model, shares))

    async def _prepare(self, model: str, shares: tuple[tuple[str, float], ...]
                       ) -> tuple[list[str], list[float]]:
        mesh = self._mesh()
        if mesh is None:
            raise RuntimeError("not in a mesh")
        if model in self.hosting:  # not released (no stop came between): its ports go now
            self.release(model)
        hosted = self.hosting[model] = HostedSplit(model, shares)
        own = sum(s for n, s in shares if n == self.node_id)
        remote = [(n, s) for n, s in shares if n != self.node_id]
        rpc: list[str] = []
        weights: list[float] = []
        if own > 0 and not self.has_gpus:
            hosted.local_rpc = self._start_rpc(f"{model} host")
        for worker, share in remote:
            entry = rpctunnel.EntryPort(mesh, worker, model,
                                        allowed_pid=lambda: self._llama_pid(model),
                                        on_broken=lambda why: self._broken(hosted, why))
            hosted.entries[worker] = entry
            port = entry.listen(self.reactor)
            rpc.append(f"{rpctunnel.LOOPBACK}:{port}")
            weights.append(share)
        await defer.DeferredList([defer.ensureDeferred(self._until_answers(hosted, mesh, w))
                                  for w, _ in remote], consumeErrors=True)
        if hosted.cancelled:
            raise defer.CancelledError(f"the split of {model} was re-planned")
        if hosted.local_rpc is not None:
            local = hosted.local_rpc
            await local.when_ready()
            assert local.port is not None
            rpc.insert(0, f"{rpctunnel.LOOPBACK}:{local.port}")
            weights.insert(0, own)
            # it restarts on another port, which the running llama-server does not know
            local.add_listener(lambda state: self._broken(hosted, f"its local rpc-server is {state}")
                               if state != BackendState.READY else None)
        elif own > 0:  # the local GPUs come after the RPC devices
            total = sum(self.gpu_weights)
            weights += [own * w / total for w in self.gpu_weights]
        log.info("split of %s ready: rpc %s, tensor split %s", model, ",".join(rpc),
                 ",".join(f"{w:.3f}" for w in weights))
        return rpc, weights

    async def _until_answers(self, hosted: HostedSplit, mesh: TunnelMesh, worker: str) -> None:
        backoff = Backoff(PROBE_MIN_S, PROBE_MAX_S)
        hosted.waiting_for.add(worker)
        last = ""
        while not hosted.cancelled:
            try:
                await rpctunnel.probe(mesh, worker, hosted.model)
            except Exception as e:  # noqa: BLE001 - refused or unreachable: ask again
                reason = str(e)
                if reason != last:
                    log.info("split of %s: waiting for worker %s: %s", hosted.model, worker,
                             reason)
                    last = reason
                await task.deferLater(self.reactor, backoff.next_delay())
                continue
            hosted.waiting_for.discard(worker)
            return

    def _broken(self, hosted: HostedSplit, why: str) -> None:
        if hosted.cancelled or self.hosting.get(hosted.model) is not hosted:
            return  # being taken down, or replaced already
        log.warning("split of %s: %s", hosted.model, why)
        if self.on_broken is not None:
            self.on_broken(hosted.model, why)

    def release(self, model: str) -> defer.Deferred[None]:
        """The llama-server of ``model``'s split stopped: close its entries and local rpc-server."""
        hosted = self.hosting.pop(model, None)
        if hosted is None:
            return defer.succeed(None)
        hosted.cancelled = True
        steps = [e.close() for e in hosted.entries.values()]
        if hosted.local_rpc is not None:
            steps.append(hosted.local_rpc.stop())
        return _all(steps)

    # -- status --------------------------------------------------------------------------------

    def tunnels(self, model: str) -> list[dict[str, Any]] | None:
        hosted = self.hosting.get(model)
        return hosted.tunnels() if hosted is not None else None

    def to_dict(self) -> dict[str, Any]:
        rpc = self.worker_rpc
        return {
            "lending": ({"model": self.lending[0], "host": self.lending[1]}
                        if self.lending is not None else None),
            "rpc_server": rpc.to_dict() if rpc is not None else None,
            "hosting": {m: {"tunnels": h.tunnels(), "waiting_for": sorted(h.waiting_for),
                            "local_rpc": h.local_rpc.to_dict() if h.local_rpc else None}
                        for m, h in self.hosting.items()},
        }

    def stop(self) -> defer.Deferred[None]:
        """The daemon stops (after the llama-servers): every split part goes."""
        return _all([self.release(m) for m in list(self.hosting)] + [self.unlend()])


def _all(steps: list[defer.Deferred[Any]]) -> defer.Deferred[None]:
    """Fires once every step ended, whatever each one's outcome (errors logged)."""
    async def wait() -> None:
        for ok, result in await defer.DeferredList(steps, consumeErrors=True):
            if not ok:
                log.error("stopping a split part: %s", result.getErrorMessage())
    return defer.ensureDeferred(wait())
