"""The daemon as a tree of Twisted services, built by one factory and started and
stopped by the tree in a declared order.

:func:`create_daemon` (after Tahoe-LAFS's ``create_client_from_config``; the
``_``-prefixed arguments are test seams) does what needs no reactor -- state
directory, identity, GPUs, plugins, the model scan, the first model -- and
builds the tree.  Its children, in start order (``TREE``)::

    sd-watchdog   WATCHDOG=1 at half systemd's timeout
    control       the control socket (meshctl)
    backends      this node's llama-servers
    roles         the role group: active (tunnels, election, route server, mesh)
                  or passive (the passive node); ``meshd.daemon.roles``
    downloads     cancelled on stop
    drain         on stop: in-flight API and tunnel requests, within [api] drain_s
    api           the API listener
    console       the web console (when enabled)
    presence      into the mesh / checking in; on stop: leave (LEAVING)
    ready         the first model served and warm, then READY=1

Stop runs them in reverse: STOPPING=1, leave the mesh, close the console, stop
accepting API connections, drain, cancel downloads, stop the election and close
tunnels, stop llama-servers, remove the control socket, exit 0.  A child whose
stop fails is logged; the others still stop.

SIGHUP and ``meshctl reload`` reach :mod:`meshd.daemon.reload` (built here with the
parts a reload changes: the API's key, the console, this node's llama-servers).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints
from twisted.internet.error import ReactorNotRunning
from twisted.python.failure import Failure

from meshd import config as configmod
from meshd import gctune
from meshd.config import Config
from meshd.daemon.backends import LocalBackends
from meshd.daemon.node import Node, RoleParts
from meshd.daemon.roles import RoleGroup, RoleService, SwitchableRouter
from meshd.daemon.sdnotify import Notifier
from meshd.daemon.tree import CallbackService, ListenerService, OrderedMultiService
from meshd.errors import ServiceStopErrors, StartupError
from meshd.states import NodeState
from meshd.units import gib

if TYPE_CHECKING:
    from meshd.daemon.reload import Reloader
    from meshd.daemon.split import SplitRuntime
    from meshd.mesh.identity import Identity
    from meshd.metrics import Hop
    from meshd.models.download import Downloader
    from meshd.models.scan import Resolved
    from meshd.placement.plugins import PolicyManager
    from meshd.serving.api import ApiServer
    from meshd.serving.router import MeshRouter
    from meshd.serving.tunnel import TunnelServer
    from meshd.statedir import StateDir

log = logging.getLogger("meshd")


def preflight(config: Config, plugin_order: list[str] | None = None) -> list[str]:
    """Problems found before starting: models that cannot be resolved, plugins that do not load.

    ``plugin_order``, when given, receives one line per policy plugin that
    loaded, in the order they are asked (for ``meshd --check-config``).
    """
    problems = model_problems(config)
    if problems and problems[0].startswith("catalog: "):
        return problems
    from meshd.placement import plugins

    plugin_problems, order = plugins.report(config)
    problems += plugin_problems
    if plugin_order is not None:
        plugin_order.extend(order)
    return problems


def model_problems(config: Config) -> list[str]:
    """``[models] serve`` entries that cannot be resolved (at start, and before a reload)."""
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
    return problems


def join_token_problems(config: Config) -> list[str]:
    """``[mesh] join`` tokens that do not parse at all (garbage, cut short, edited).

    Such a token can never work, so the daemon refuses to start with them (exit
    status ``EXIT_BAD_TOKEN``, which the unit does not restart) instead of founding
    a mesh of its own; one that parses but is expired or refused by its issuer
    leaves the node waiting outside any mesh (``meshd.mesh.joining``)."""
    from meshd.mesh import tokens

    problems: list[str] = []
    for i, text in enumerate(config.mesh.join):
        try:
            tokens.decode(text)
        except tokens.TokenError as e:
            problems.append(f"[mesh] join (or --join) token {i + 1}: {e}; get a new one with "
                            "meshctl token on a member of the mesh")
    return problems


def model_dirs(config: Config) -> list[str]:
    return [config.node.models_dir, *config.models.extra_dirs]


TREE = ("sd-watchdog", "control", "backends", "roles", "downloads", "drain", "api", "console",
        "presence", "ready")


class MeshdService(OrderedMultiService):
    """The whole daemon: the tree's root.  ``exit_code`` is what the process should exit with.

    Built by :func:`create_daemon`; the root only says that the daemon starts,
    stops, or could not start (STOPPING=1 and the node's state are the root's: they
    hold for the whole tree).
    """

    def __init__(self, config: Config, *, reactor: Any, notifier: Notifier):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.notifier = notifier
        self.exit_code = 0
        self.node: Node | None = None
        self.reloader: Reloader | None = None
        self._stopping: defer.Deferred[None] | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        d = super().startService()
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure: Failure) -> None:
        if self._stopping is not None:
            # asked to stop while starting (Ctrl-C during the model load): the
            # interrupted start is the stop's doing, not a failure
            log.info("stopped before start-up finished (%s)", failure.getErrorMessage())
            return
        _log_cannot_start(failure)
        self.exit_code = 1
        self.shutdown()

    def shutdown(self) -> None:
        """Ask the reactor to stop; stopService does the orderly part."""
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already stopping
            pass

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        self.notifier.stopping()
        if self.node is not None:
            self.node.state = NodeState.STOPPING
        log.info("stopping")
        try:
            await super().stopService()
        except ServiceStopErrors as e:
            for name, failure in e.errors:
                log.error("stopping %s failed: %s", name, failure.getErrorMessage())
        log.info("stopped")


def _log_cannot_start(failure: Failure) -> None:
    if failure.check(StartupError):
        log.error("cannot start: %s", failure.value)
    else:
        log.error("cannot start: %s", failure.getErrorMessage(), exc_info=failure.value)


# -- the factory -----------------------------------------------------------------------------


def create_daemon(
    config: Config,
    *,
    reactor: Any,
    _notifier: Notifier | None = None,
    _identity: Callable[[Path, bool], tuple[Identity, StateDir]] | None = None,
    _detect_gpus: Callable[[Any], Any] | None = None,
    _groups: Callable[..., Groups] | None = None,
    reread: Callable[[], Config] | None = None,
) -> MeshdService:
    """The daemon's service tree for ``config``, not started.

    ``reread()`` reads the configuration again for a reload (default: the file
    ``config`` came from; ``meshd`` puts its command-line flags on top).
    Raises ``StartupError`` (or a bug's exception) for what is wrong before anything
    listens: directories, plugins, the models to serve.
    """
    from meshd.models import gpu

    cfg = config
    notifier = _notifier if _notifier is not None else Notifier()
    notifier.status("starting")
    state_dir = Path(cfg.node.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        Path(cfg.node.models_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"[node] state_dir/models_dir: {e}") from None
    identity, state = (_identity or _load_identity)(state_dir, cfg.node.client)
    report = (_detect_gpus or gpu.detect)(cfg.node)
    vram_bytes = 0 if cfg.node.client else report.vram_bytes

    top = MeshdService(cfg, reactor=reactor, notifier=notifier)
    node = top.node = Node(cfg, reactor=reactor, node_id=identity.node_id, vram_bytes=vram_bytes,
                           gpu_report=report, shutdown=top.shutdown)
    log.info("node %s starting: %s of VRAM (%s)", identity.node_id, gib(vram_bytes), report.source)
    if not cfg.node.client:  # a client keeps nothing; it routes by the table it is given
        node.state_dir = state
        node.desired.merge(state.load_desired())  # a broken desired.json: one line, no start
    node.policy = _load_policy(cfg)
    node.rescan()
    for problem in node.scan.problems if node.scan is not None else ():
        log.warning("models: %s", problem)
    downloader = node.downloader = _downloader(cfg, reactor, node)
    node.split = _split_runtime(cfg, reactor, node)
    first = None if node.roles.passive else _resolve_models(cfg, node)

    from meshd.daemon.control import ControlService
    from meshd.daemon.sdnotify import WatchdogService
    from meshd.metrics import NodeMetrics
    from meshd.serving.api import ApiServer

    metrics = node.metrics = NodeMetrics()
    metrics.watch_downloads(downloader.downloads)
    router = SwitchableRouter()
    api = ApiServer(router, cfg.api, reactor=reactor, metrics=metrics.api)
    backends = LocalBackends(node, cfg, reactor=reactor, notifier=notifier)
    if node.split is not None:
        node.split.on_broken = backends.split_broken
    if first is not None:
        node.serve_again = _serve_again_with(node, backends, notifier, first)
    groups = (_groups or Groups)(cfg, node, identity, state, reactor=reactor, backends=backends,
                                 notifier=notifier)
    roles = RoleService(node, router, groups, reactor=reactor, serve=backends.serve,
                        status=notifier.status)
    metrics.watch(node, apis=lambda: _apis(api, roles), tunnels=lambda: roles.tunnels)
    listen = cfg.api.listen
    children = [
        WatchdogService(notifier, clock=reactor),
        ControlService(cfg.node.control_socket, node, reactor=reactor),
        backends,
        roles,
        CallbackService("downloads", on_stop=downloader.cancel_all),
        CallbackService("drain", on_stop=lambda: _drain(api, roles, cfg.api.drain_s)),
        ListenerService("api", lambda: endpoints.serverFromString(
                            reactor, configmod.tcp_endpoint(listen)),
                        api.site, what=f"[api] listen {listen}", announce=f"API on http://{listen}"),
    ]
    key_holders: list[Any] = [api]
    if cfg.console.enabled:
        from meshd.console.server import Console

        console = Console(node, cfg, reactor=reactor)
        children.append(console)
        key_holders.append(console)
    children += [
        CallbackService("presence", on_start=roles.enter, on_stop=roles.leave),
        CallbackService("ready", on_start=lambda: defer.ensureDeferred(
            _ready(node, backends, notifier, first))),
    ]
    for child in children:
        child.setServiceParent(top)
    top.reloader = _reloader(top, node, backends, notifier, first, key_holders, reread)
    return top


def _reloader(top: MeshdService, node: Node, backends: LocalBackends, notifier: Notifier,
              first: Resolved | None, key_holders: list[Any],
              reread: Callable[[], Config] | None) -> Reloader:
    """The daemon's reload (``meshd.daemon.reload``), reached by SIGHUP and ``meshctl reload``."""
    from meshd.daemon.reload import Reloader

    path = top.config.path

    def not_now() -> str | None:
        if top.stopping or node.state == NodeState.STOPPING:
            return "meshd is stopping"
        if not notifier.was_ready:
            return "meshd is still starting: reload once it is running (meshctl status)"
        return None

    def fetch(resolved: Resolved) -> None:
        """A reload's new first model, not on disk: downloaded as at start, then served."""
        defer.ensureDeferred(_download_later(node, backends, notifier, resolved))

    def applied(config: Config) -> None:
        top.config = config

    reloader = Reloader(
        top.config, node=node, notifier=notifier,
        reread=reread or (lambda: configmod.load(path)),
        key_holders=key_holders, backends=backends,
        first=first.name if first is not None else None, fetch=fetch, not_now=not_now,
        on_applied=applied)
    node.reloader = reloader.reload
    return reloader


async def _ready(node: Node, backends: LocalBackends, notifier: Notifier,
                 first: Resolved | None) -> None:
    """The last step of the start: the first model served and warm, then READY=1."""
    listen = node.config.api.listen
    node.state = NodeState.RUNNING
    if node.roles.passive:
        line = f"{node.role} (passive), API on {listen}"
        notifier.ready(line)
        log.info("ready: %s", line)
        return
    if first is not None and node.mesh is not None:
        # joining, or back after being away: the mesh may have dropped the model meanwhile
        await node.mesh.learn_decisions(node.config.mesh.connect_timeout_s)
    if first is not None and first.name in node.dropped:
        decision = node.desired.get(first.name)
        who = decision.by if decision is not None else "?"
        log.warning("not serving %s ([models] serve): it was dropped mesh-wide (by node %s; "
                    "meshctl serve %s lifts the drop)", first.name, who, first.name)
        node.held_back.add(first.name)  # served once `meshctl serve` lifts the drop
        first = None
    if first is not None and first.path is None:
        # not on disk yet: the API answers 503 for it until the download is done
        notifier.ready(f"downloading {first.name}; API on {listen}")
        log.info("model %s is not on disk: downloading it", first.name)
        if not await _download_first(node, backends, notifier, first):
            return
    elif first is not None:
        backends.serve(first.name, str(first.path), first.size_bytes or 0)
        notifier.status(f"loading {first.name}; API on {listen}")
        await backends.when_serving(first.name)
    notifier.ready(node.status_line())
    log.info("ready: %s", node.status_line())


async def _download_first(node: Node, backends: LocalBackends, notifier: Notifier,
                          first: Resolved) -> bool:
    """Download the first ``[models] serve`` entry and serve it; False when refused.

    A refusal of the gate (too big for this node, no split peers to share it) is
    not the last word: peers that a split would use may join later (a node
    started with ``--join`` asks before its join is done), so the download is
    tried again once such peers hold the size it refused.
    """
    from meshd.models.download import DownloadRefused

    listen = node.config.api.listen
    downloader = node.downloader
    assert downloader is not None
    try:
        model = await downloader.download(first.entry)
    except DownloadRefused as e:
        # not a failed start: the node serves the mesh's other models and says
        # why it runs none of its own (status: downloads_refused)
        notifier.status(f"idle: not downloading {first.name}: {e}; API on {listen}")
        log.warning("serving nothing of its own: %s was not downloaded: %s", first.name, e)
        if e.size_bytes is not None:
            _retry_when_the_mesh_holds_it(node, backends, notifier, first, e.size_bytes)
        return False
    node.rescan()
    backends.serve(first.name, str(model.path), model.size_bytes)
    await backends.when_serving(first.name)
    return True


def _serve_again_with(node: Node, backends: LocalBackends, notifier: Notifier,
                      first: Resolved) -> Callable[[str], None]:
    """``Node.serve_again``: when ``meshctl serve`` lifts a drop of the first ``[models]
    serve`` entry, serve it again as the start would (downloading it first if it is gone)."""

    def serve_again(name: str) -> None:
        if name != first.name or not backends.running or name in node.served:
            return
        scanned = node.scan.models.get(name) if node.scan is not None else None
        if first.path is not None and Path(first.path).exists():
            path, size = str(first.path), first.size_bytes or 0
        elif scanned is not None:
            path, size = str(scanned.path), scanned.size_bytes
        else:
            log.info("serving %s again ([models] serve): not on disk, downloading it", name)
            defer.ensureDeferred(_download_later(node, backends, notifier, first))
            return
        log.info("serving %s again ([models] serve)", name)
        backends.serve(name, path, size)

    return serve_again


def _retry_when_the_mesh_holds_it(node: Node, backends: LocalBackends, notifier: Notifier,
                                  first: Resolved, size_bytes: int) -> None:
    from meshd.placement import default as default_policy

    def peers_hold_it() -> bool:
        return default_policy.split_peers_available(size_bytes, node.node_view(), node.mesh_view())

    # asked again when split peers appear, not at every event (the gate logs its answer,
    # and a plugin's own refusal would only be said again)
    had = peers_hold_it()

    def changed(_: Any) -> None:
        nonlocal had
        now, was = peers_hold_it(), had
        had = now
        if not now or was or not backends.running:
            return
        node.remove_membership_listener(changed)  # one retry; its refusal arms another
        log.info("the mesh can hold %s now: downloading it", first.name)
        notifier.status(f"downloading {first.name}; API on {node.config.api.listen}")
        defer.ensureDeferred(_download_later(node, backends, notifier, first))

    node.add_membership_listener(changed)


async def _download_later(node: Node, backends: LocalBackends, notifier: Notifier,
                          first: Resolved) -> None:
    """A first model downloaded after start (a retry, a reload's new one): its failure is
    said and the node stays up; a stop cancels it quietly."""
    from meshd.models.download import DownloadCancelled

    try:
        if await _download_first(node, backends, notifier, first):
            notifier.status(node.status_line())
    except DownloadCancelled:  # the daemon stops
        pass
    except Exception as e:  # noqa: BLE001 - the hub or the disk: said, the node stays up
        log.error("downloading %s failed: %s", first.name, e)


def _apis(api: ApiServer, roles: RoleService) -> list[tuple[Hop, Any]]:
    """The APIs whose in-flight requests ``/metrics`` shows: the client API, and the
    tunnel API of the active role (requests peers sent through tunnels)."""
    from meshd.metrics import Hop

    tunnels = roles.tunnels
    out: list[tuple[Hop, Any]] = [(Hop.SERVED, api)]
    if tunnels is not None:
        out.append((Hop.RELAYED, tunnels.api))
    return out


async def _drain(api: ApiServer, roles: RoleService, drain_s: float) -> None:
    """Let the requests in flight finish, here and those peers sent through tunnels."""
    tunnels = roles.tunnels
    in_flight = api.in_flight + (tunnels.api.in_flight if tunnels is not None else 0)
    if in_flight:
        log.info("waiting up to %.0f s for %d in-flight request(s)", drain_s, in_flight)
    drains = [api.drain(drain_s)]
    if tunnels is not None:  # requests peers sent us through tunnels
        drains.append(tunnels.drain(drain_s))
    await defer.DeferredList(drains, consumeErrors=True)


class Groups:
    """The daemon's role groups (``meshd.daemon.roles.GroupBuilder``).

    The mesh-wide router is made with the first active group and kept: a node that
    stood by and promotes again routes with the same one.
    """

    def __init__(self, config: Config, node: Node, identity: Identity, state: StateDir, *,
                 reactor: Any, backends: LocalBackends, notifier: Notifier):
        self.config = config
        self.node = node
        self.identity = identity
        self.state = state
        self.reactor = reactor
        self.backends = backends
        self.notifier = notifier
        self.mesh_router: MeshRouter | None = None

    def _router(self) -> MeshRouter:
        if self.mesh_router is None:
            from meshd.serving.router import MeshRouter

            self.mesh_router = MeshRouter(self.node, reactor=self.reactor)
            self.node.add_status_listener(self.mesh_router.invalidate)
        return self.mesh_router

    def active(self, roles: RoleService) -> RoleGroup:
        """Tunnels in from peers, the election, the route server, the mesh (started last)."""
        from meshd.mesh.gossip import MeshService
        from meshd.passive.server import RouteServer
        from meshd.placement.election import Rebalancer
        from meshd.serving.api import ApiServer
        from meshd.serving.router import LocalOnlyRouter
        from meshd.serving.tunnel import TunnelServer

        cfg, node, reactor = self.config, self.node, self.reactor
        router = self._router()
        mesh = MeshService(cfg, self.state, self.identity, reactor=reactor,
                           local_info=node.local_info, desired=node.desired,
                           metrics=node.metrics)
        route_server = RouteServer(mesh, node, clock=reactor, refresh_s=cfg.mesh.refresh_s)
        split = node.split
        rebalancer = Rebalancer(node, reactor=reactor, start=self.backends.spawn,
                                stop=self.backends.stop_split_or_solo,
                                start_split=self.backends.spawn_split,
                                lend=split.lend if split is not None else None,
                                unlend=split.unlend if split is not None else None,
                                changed=self._placement_changed,
                                settle_s=cfg.models.assign_settle_s, unassigned=roles.unassigned,
                                recheck_s=cfg.mesh.heartbeat_s)
        local = LocalOnlyRouter(router)
        # mTLS authenticated the peer: the tunnel API asks no API key
        tunnel_api = ApiServer(local, dataclasses.replace(cfg.api, api_key=""), reactor=reactor,
                               relay=True,
                               metrics=node.metrics.api if node.metrics is not None else None)
        tunnels = TunnelServer(local.check, tunnel_api)
        tunnels.attach(mesh)
        if split is not None:
            split.attach(mesh)
        mesh.add_listener(router.invalidate)
        mesh.add_listener(rebalancer.on_event)
        mesh.add_desired_listener(node.desired_heard)  # drops and serves, DROP frames too
        mesh.add_listener(node.membership_changed)
        return RoleGroup(
            "active",
            [CallbackService("tunnels", on_stop=lambda: _close_tunnels(tunnels, split, self.reactor)),
             CallbackService("election", on_stop=rebalancer.stop),
             route_server, mesh],
            router=router, tunnels=tunnels, facing=("route-server", "mesh"),
            parts=RoleParts(mesh=mesh, route_server=route_server, rebalancer=rebalancer,
                            router=router),
            listen=f"[mesh] listen {cfg.mesh.listen}")

    def passive(self, roles: RoleService, reason: str | None) -> RoleGroup:
        """The passive node: checks in on the routing table; a standby may promote."""
        from meshd.passive.node import PassiveNode

        cfg, node = self.config, self.node
        client = cfg.node.client
        passive = PassiveNode(cfg, node, self.identity, None if client else self.state,
                              reactor=self.reactor, policy=node.policy,
                              on_promote=None if client else roles.promote)
        passive.reason = reason
        return RoleGroup("passive", [passive], router=passive.router, facing=("passive",),
                         parts=RoleParts(passive=passive))

    def _placement_changed(self) -> None:
        node = self.node
        self._router().invalidate()
        if node.mesh is not None:
            node.mesh.local_changed()
        node.status_changed()
        self.notifier.status(node.status_line())


def _close_tunnels(tunnels: TunnelServer, split: SplitRuntime | None,
                   reactor: Any) -> defer.Deferred[Any]:
    if split is not None:
        split.tunnel_host.close_all()
    return tunnels.finish_all(reactor)


def _split_runtime(config: Config, reactor: Any, node: Node) -> SplitRuntime:
    """This node's split parts: rpc-servers on demand, built with the node's llama.cpp."""
    from meshd.backends import supervisor as backend
    from meshd.daemon.split import SplitRuntime

    def make_rpc(name: str, cache_dir: Path | None) -> backend.RpcServer:
        try:
            bin_dir = backend.find_bin_dir(config.llama, binary="ggml-rpc-server")
        except backend.BackendError as e:
            raise StartupError(str(e)) from None
        visible = node.gpu_report.cuda_visible_devices() if node.gpu_report is not None else None
        return backend.RpcServer(name=name, llama=config.llama, bin_dir=bin_dir, reactor=reactor,
                                 cache_dir=cache_dir,
                                 extra_env={"CUDA_VISIBLE_DEVICES": visible} if visible else None)

    def llama_pid(model: str) -> int | None:
        served = node.served.get(model)
        return served.backend.pid if served is not None else None

    gpus = node.gpu_report.used_gpus() if node.gpu_report is not None else []
    return SplitRuntime(config, reactor=reactor, node_id=node.node_id, make_rpc=make_rpc,
                        mesh=lambda: node.mesh, llama_pid=llama_pid, has_gpus=bool(gpus),
                        gpu_weights=[float(g.total_bytes) for g in gpus])


def _load_policy(config: Config) -> PolicyManager:
    from meshd.placement import plugins

    try:
        return plugins.load(config)
    except plugins.PluginError as e:
        raise StartupError("; ".join(e.problems)) from None


def _downloader(config: Config, reactor: Any, node: Node) -> Downloader:
    from meshd.models.download import Downloader
    from meshd.placement import default as default_policy
    from meshd.placement import rules as placement

    def gate(model: str, size_bytes: int, split_peers_available: bool) -> Any:
        me, view = node.node_view(), node.mesh_view()
        # a model that fits the group the planner would use, though not this node,
        # may come down: it will be split
        if not split_peers_available:
            split_peers_available = default_policy.split_peers_available(size_bytes, me, view)
        return placement.allow_download(
            model,
            size_bytes,
            me,
            view,
            split_peers_available=split_peers_available,
            policy=node.policy,
        )

    return Downloader(config, reactor=reactor, gate=gate)


def _resolve_models(config: Config, node: Node) -> Resolved | None:
    """The first ``[models] serve`` entry resolved (maybe still to download); the rest are wanted."""
    from meshd.models import scan as modelsmod
    from meshd.models.catalog import load_catalog

    entries = config.models.serve
    if not entries or config.node.client:
        return None
    catalog = load_catalog()
    scan = node.scan if node.scan is not None else modelsmod.ScanResult()
    try:
        resolved = [modelsmod.resolve(e, scan, catalog) for e in entries]
    except modelsmod.ModelError as e:
        raise StartupError(f"[models] serve: {e}") from None
    node.wanted = [r.name for r in resolved[1:]]
    return resolved[0]


def _load_identity(state_dir: Path, ephemeral: bool = False) -> tuple[Identity, StateDir]:
    """The node's identity; ``ephemeral`` (a client): a fresh one in memory, nothing written."""
    from meshd.mesh.identity import ephemeral as fresh
    from meshd.mesh.identity import load_or_create
    from meshd.statedir import StateDir

    state = StateDir(state_dir)
    return (fresh() if ephemeral else load_or_create(state)), state


def run(config: Config, *, reactor: Any = None, reread: Callable[[], Config] | None = None) -> int:
    """Run the daemon until it stops; returns the process exit status.  ``reread``: how a
    reload reads the configuration again (see :func:`create_daemon`)."""
    own_process = reactor is None  # not a test's reactor: the process is the daemon's
    if reactor is None:
        from meshd import reactor as meshd_reactor

        meshd_reactor.install()
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        top = create_daemon(config, reactor=reactor, reread=reread)
    except Exception:  # noqa: BLE001 - one line for the operator, a traceback only for a bug
        _log_cannot_start(Failure())
        return 1
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.callWhenRunning(_handle_signals, reactor, top)
    if own_process:
        gctune.tune()
    reactor.run(installSignalHandlers=True)
    return top.exit_code


def _handle_signals(reactor: Any, top: MeshdService) -> None:
    """SIGTERM/SIGINT: clean stop (Twisted's default).  SIGHUP: reload."""

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(_reload, top)

    signal.signal(signal.SIGHUP, on_hup)


def _reload(top: MeshdService) -> None:
    """SIGHUP: the reload ``meshctl reload`` asks for; a refusal is in the log already."""
    from meshd.errors import Refused

    log.info("SIGHUP: reloading")
    if top.node is None:
        return
    try:
        top.node.reload()
    except Refused:
        pass
    except Exception:  # a bug: said, and the daemon runs on with what it had
        log.exception("reload failed")
