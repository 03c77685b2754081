"""The daemon as a tree of Twisted services, started and stopped in order.

Start: state directory, identity, GPUs, models, control socket, llama-server,
API listener, mesh, web console; READY=1 once the API listens and the model is
loaded.  Stop (SIGTERM, Ctrl-C, ``meshctl leave``): STOPPING=1, leave the mesh,
close the console, stop accepting API connections, let in-flight streams finish within ``[api]
drain_s``, stop llama-server, remove the control socket, exit 0.

The systemd glue (notify, watchdog) is one service here, not code spread
through the tree; every part takes the reactor so tests can pass a fake one.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.python.failure import Failure

from meshd import config as configmod
from meshd.config import Config
from meshd.errors import StartupError

log = logging.getLogger("meshd")


def preflight(config: Config) -> list[str]:
    """Problems found before starting: models that cannot be resolved, plugins that do not load."""
    from meshd.models import scan as modelsmod
    from meshd.models.catalog import load_catalog

    problems: list[str] = []
    try:
        catalog = load_catalog()
    except Exception as e:  # a broken shipped catalog is a bug, but say so plainly
        return [f"catalog: {e}"]
    # a models directory that does not exist yet is made at start; the start-up
    # scan reports missing extra_dirs in the log, once logging is set up
    scan = modelsmod.scan([d for d in model_dirs(config) if Path(d).is_dir()])
    for i, entry in enumerate(config.models.serve):
        try:
            modelsmod.resolve(entry, scan, catalog)
        except modelsmod.ModelError as e:
            problems.append(f"[models] serve[{i}]: {e}")
    from meshd.placement import plugins

    problems += plugins.check(config)
    return problems


def model_dirs(config: Config) -> list[str]:
    return [config.node.models_dir, *config.models.extra_dirs]


class MeshdService(service.MultiService):
    """The whole daemon.  ``exit_code`` is what the process should exit with."""

    def __init__(self, config: Config, *, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.exit_code = 0
        self.node = None
        self.api = None
        self._api_port = None
        self._control_port = None
        self.console = None
        self._stopping = None
        self.router = None  # meshd.serving.router.MeshRouter (active nodes)
        self.rebalancer = None  # meshd.placement.election.Rebalancer (active nodes)
        self.tunnels = None  # meshd.serving.tunnel.TunnelServer: tunnels from peers to our llama-servers
        self._model_files: dict[str, tuple[str, int]] = {}  # model -> (path, size_bytes)
        from meshd.daemon.sdnotify import Notifier

        self.notifier = Notifier()

    # -- start --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if self._stopping is not None:
            # asked to stop while starting (Ctrl-C during the model load): the
            # interrupted start is the stop's doing, not a failure
            log.info("stopped before start-up finished (%s)", failure.getErrorMessage())
            return
        if failure.check(StartupError):
            log.error("cannot start: %s", failure.value)
        else:
            log.error("cannot start: %s", failure.getErrorMessage(), exc_info=failure.value)
        self.exit_code = 1
        self.shutdown()

    async def _start(self) -> None:
        from meshd.daemon import node as nodemod
        from meshd.models import gpu

        cfg = self.config
        self.notifier.status("starting")
        state_dir = Path(cfg.node.state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            Path(cfg.node.models_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"[node] state_dir/models_dir: {e}") from None

        identity, state = _identity(state_dir, ephemeral=cfg.node.client)
        report = gpu.detect(cfg.node)
        vram_bytes = 0 if cfg.node.client else report.vram_bytes
        self.node = nodemod.Node(
            cfg,
            reactor=self.reactor,
            node_id=identity.node_id,
            vram_bytes=vram_bytes,
            gpu_report=report,
            shutdown=self.shutdown,
        )
        log.info(
            "node %s starting: %s of VRAM (%s)",
            identity.node_id,
            _gb(vram_bytes),
            report.source,
        )

        await self._listen_control()
        self.node.policy = self._load_policy()
        self.node.rescan()
        for problem in self.node.scan.problems:
            log.warning("models: %s", problem)
        self.node.downloader = self._downloader()
        if cfg.node.client or cfg.node.standby:  # passive: no gossip, the routing table only
            from meshd.passive.node import run_passive

            await run_passive(self, identity, state)
            return
        first = self._resolve_models()
        self._ensure_router()
        await self._listen_api()
        self._start_mesh(identity, state)
        await self._listen_console()
        self.node.state = "running"
        if first is not None and first.path is None:
            # not on disk yet: the API answers 503 for it until the download is done
            self.notifier.ready(f"downloading {first.name}; API on {cfg.api.listen}")
            log.info("model %s is not on disk: downloading it", first.name)
            model = await self.node.downloader.download(first.entry)
            self.node.rescan()
            self._serve(first.name, str(model.path), model.size_bytes)
            await self._when_serving(first.name)
        elif first is not None:
            self._serve(first.name, str(first.path), first.size_bytes or 0)
            self.notifier.status(f"loading {first.name}; API on {cfg.api.listen}")
            await self._when_serving(first.name)
        self.notifier.ready(self._status_line())
        log.info("ready: %s", self._status_line())

    def _serve(self, name: str, path: str, size_bytes: int) -> None:
        """This node is to serve ``name``: the election decides whether its llama-server runs
        now (solo, or elected split host) or the node waits (short of VRAM, a worker)."""
        self._model_files[name] = (path, size_bytes)
        if self.rebalancer is None:
            self._spawn(name)
        else:
            self.rebalancer.serve(name)

    async def _when_serving(self, name: str) -> None:
        """Wait for ``name``'s llama-server, if the election started one."""
        served = self.node.served.get(name)
        if served is not None:
            await served.backend.when_ready()

    def _spawn(self, name: str) -> None:
        """Start a llama-server for ``name`` and publish it as served."""
        from meshd.backends import supervisor as backend
        from meshd.daemon import node as nodemod
        from meshd.models.scan import fallback_chat_template

        files = self._model_files.get(name)
        if files is None:  # assigned by the election: from this node's disk
            local = self.node.scan.models.get(name) if self.node.scan is not None else None
            if local is None:
                log.error("cannot start llama-server for %s: not on this node's disk", name)
                return
            files = self._model_files[name] = (str(local.path), local.size_bytes)
        path, size_bytes = files
        try:
            bin_dir = backend.find_bin_dir(self.config.llama)
        except backend.BackendError as e:
            raise StartupError(str(e)) from None
        visible = self.node.gpu_report.cuda_visible_devices()
        server = backend.LlamaServer(
            name=name,
            model_path=path,
            llama=self.config.llama,
            bin_dir=bin_dir,
            reactor=self.reactor,
            extra_env={"CUDA_VISIBLE_DEVICES": visible} if visible is not None else None,
            chat_template=fallback_chat_template(path),
        )
        self.node.add_served(nodemod.ServedModel(name, path, size_bytes, server))
        server.add_listener(lambda state, n=name: self._backend_state(n, state))
        server.start()

    def _start_mesh(self, identity, state) -> None:
        from meshd.mesh.gossip import MeshService

        mesh = MeshService(
            self.config, state, identity, reactor=self.reactor, local_info=self.node.local_info
        )
        self.node.mesh = mesh
        try:
            mesh.setServiceParent(self)
        except CannotListenError as e:
            raise StartupError(f"[mesh] listen {self.config.mesh.listen}: {_reason(e)}") from None
        from meshd.passive.server import RouteServer  # answers passive nodes (clients, standbys)

        self.node.route_server = RouteServer(mesh, self.node, clock=self.reactor,
                                             refresh_s=self.config.mesh.refresh_s)
        self.node.route_server.setServiceParent(self)
        self._wire_routing(mesh)

    def _ensure_router(self):
        """The mesh-wide router (``meshd.serving.router``) and this node's election (``meshd.placement.election``)."""
        if self.router is None:
            from meshd.placement.election import Rebalancer
            from meshd.serving.router import MeshRouter

            node = self.node
            self.router = node.router = MeshRouter(node, reactor=self.reactor)
            node.add_status_listener(self.router.invalidate)
            self.rebalancer = node.rebalancer = Rebalancer(
                node, reactor=self.reactor, start=self._spawn, stop=node.stop_serving,
                changed=self._placement_changed, settle_s=self.config.models.assign_settle_s,
                unassigned=self._unassigned)
        if self.api is not None:
            self.api.router = self.router
        return self.router

    def _unassigned(self, reason: str) -> None:
        """Assignment gave this idle node nothing: a standby from now on, when it may be one."""
        from meshd.passive.node import stand_by

        stand_by(self, reason)

    def _placement_changed(self) -> None:
        self.router.invalidate()
        if self.node.mesh is not None:
            self.node.mesh.local_changed()
        self.node.status_changed()
        self.notifier.status(self._status_line())

    def _wire_routing(self, mesh) -> None:
        """Tunnels in and out, routing and election on every membership event, drops."""
        from meshd.serving.api import ApiServer
        from meshd.serving.router import LocalOnlyRouter
        from meshd.serving.tunnel import TunnelServer

        self._ensure_router()
        local = LocalOnlyRouter(self.router)
        # mTLS authenticated the peer: the tunnel API asks no API key
        api = ApiServer(local, dataclasses.replace(self.config.api, api_key=""),
                        reactor=self.reactor, relay=True)
        self.tunnels = TunnelServer(local.check, api)
        self.tunnels.attach(mesh)
        mesh.add_listener(self.router.invalidate)
        mesh.add_listener(self.rebalancer.on_event)
        mesh.add_drop_listener(self.node.drop_local)

    def _load_policy(self):
        from meshd.placement import plugins

        try:
            return plugins.load(self.config)
        except plugins.PluginError as e:
            raise StartupError("; ".join(e.problems)) from None

    def _downloader(self):
        from meshd.models.download import Downloader
        from meshd.placement import rules as placement

        node = self.node

        def gate(model: str, size_bytes: int, split_peers_available: bool):
            return placement.allow_download(
                model,
                size_bytes,
                node.node_view(),
                node.mesh_view(),
                split_peers_available=split_peers_available,
                policy=node.policy,
            )

        return Downloader(self.config, reactor=self.reactor, gate=gate)

    def _status_line(self) -> str:
        n = self.node
        serving = f"serving {n.serving}" if n.serving else "serving nothing"
        return f"{n.role}, {serving}, API on {self.config.api.listen}"

    def _backend_state(self, name: str, state: str) -> None:
        if state == "ready":
            self.notifier.status(self._status_line())
        elif state in ("restarting", "failed"):
            self.notifier.status(f"{name}: llama-server {state}")

    def _resolve_models(self):
        """The first ``[models] serve`` entry resolved (maybe still to download); the rest are wanted."""
        from meshd.models import scan as modelsmod
        from meshd.models.catalog import load_catalog

        entries = self.config.models.serve
        if not entries or self.config.node.client:
            return None
        catalog = load_catalog()
        try:
            resolved = [modelsmod.resolve(e, self.node.scan, catalog) for e in entries]
        except modelsmod.ModelError as e:
            raise StartupError(f"[models] serve: {e}") from None
        self.node.wanted = [r.name for r in resolved[1:]]
        return resolved[0]

    async def _listen_control(self) -> None:
        from meshd.daemon.control import listen_control

        path = self.config.node.control_socket
        try:
            self._control_port = await listen_control(path, self.node, reactor=self.reactor)
        except Exception as e:
            raise StartupError(f"[node] control_socket: {_reason(e)}") from None
        log.info("control socket on %s", path)

    async def _listen_api(self) -> None:
        from meshd.serving import api

        self.api = api.ApiServer(self.router or self.node, self.config.api, reactor=self.reactor)
        ep = endpoints.serverFromString(self.reactor, configmod.tcp_endpoint(self.config.api.listen))
        try:
            self._api_port = await ep.listen(self.api.site)
        except Exception as e:
            raise StartupError(f"[api] listen {self.config.api.listen}: {_reason(e)}") from None
        log.info("API on http://%s", self.config.api.listen)

    async def _listen_console(self) -> None:
        """The web console, once the node has its mesh and downloader to watch."""
        if not self.config.console.enabled:
            return
        from meshd.console.server import Console

        self.console = Console(self.node, self.config, reactor=self.reactor)
        try:
            await self.console.listen()
        except Exception as e:
            raise StartupError(
                f"[console] listen {self.config.console.listen}: {_reason(e)}") from None
        log.info("console on http://%s", self.config.console.listen)

    # -- stop -----------------------------------------------------------------

    def shutdown(self) -> None:
        """Ask the reactor to stop; stopService does the orderly part."""
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already stopping
            pass

    def stopService(self) -> defer.Deferred:
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        self.notifier.stopping()
        if self.node is not None:
            self.node.state = "stopping"
        log.info("stopping")
        await defer.maybeDeferred(super().stopService)
        if self.console is not None:
            await self.console.stop()
        if self._api_port is not None:
            await defer.maybeDeferred(self._api_port.stopListening)
        if self.api is not None:
            in_flight = self.api.in_flight + (self.tunnels.api.in_flight if self.tunnels else 0)
            if in_flight:
                log.info(
                    "waiting up to %.0f s for %d in-flight request(s)",
                    self.config.api.drain_s,
                    in_flight,
                )
            drains = [self.api.drain(self.config.api.drain_s)]
            if self.tunnels is not None:  # requests peers sent us through tunnels
                drains.append(self.tunnels.drain(self.config.api.drain_s))
            await defer.DeferredList(drains, consumeErrors=True)
        if self.node is not None and self.node.downloader is not None:
            self.node.downloader.cancel_all()
        if self.node is not None:
            if self.rebalancer is not None:
                self.rebalancer.stop()
            if self.tunnels is not None:
                self.tunnels.close_all()
            stops = [defer.maybeDeferred(m.backend.stop) for m in self.node.served.values()]
            await defer.DeferredList(stops, consumeErrors=True)
        if self._control_port is not None:
            await defer.maybeDeferred(self._control_port.stopListening)
        log.info("stopped")


def _identity(state_dir: Path, *, ephemeral: bool = False):
    """The node's identity; ``ephemeral`` (a client): a fresh one in memory, nothing written."""
    from meshd.mesh.identity import ephemeral as fresh
    from meshd.mesh.identity import load_or_create
    from meshd.statedir import StateDir

    state = StateDir(state_dir)
    return (fresh() if ephemeral else load_or_create(state)), state


def _reason(e: BaseException) -> str:
    text = str(e) or e.__class__.__name__
    return text.splitlines()[0]


def _gb(n: int) -> str:
    from meshd.placement.snapshot import gb

    return gb(n)


def run(config: Config, *, reactor=None) -> int:
    """Run the daemon until it stops; returns the process exit status."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = MeshdService(config, reactor=reactor)
    from meshd.daemon.sdnotify import WatchdogService

    WatchdogService(top.notifier, clock=reactor).setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.callWhenRunning(_handle_signals, reactor, top)
    reactor.run(installSignalHandlers=True)
    return top.exit_code


def _handle_signals(reactor, top: MeshdService) -> None:
    """SIGTERM/SIGINT: clean stop (Twisted's default).  SIGHUP: reload."""

    def on_hup(signum, frame):
        reactor.callFromThread(_reload, top)

    signal.signal(signal.SIGHUP, on_hup)


def _reload(top: MeshdService) -> None:
    log.info("SIGHUP: reloading")
    if top.node is not None and hasattr(top.node, "reload"):
        top.node.reload()
