"""This node's own llama-servers, as one service of the tree: started when the node is
to serve a model (``[models] serve``, an assignment, a promotion, the election), all
stopped together when the daemon stops, after the requests were drained."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer

from meshd.config import Config
from meshd.errors import StartupError
from meshd.states import BackendState

if TYPE_CHECKING:
    from meshd.daemon.node import Node
    from meshd.daemon.sdnotify import Notifier

log = logging.getLogger("meshd.daemon.backends")


class LocalBackends(service.Service):
    """Starts a llama-server per model this node runs, and stops every one on stop."""

    name = "backends"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, node: Node, config: Config, *, reactor: Any, notifier: Notifier):
        self.node = node
        self.config = config
        self.reactor = reactor
        self.notifier = notifier
        self.files: dict[str, tuple[str, int]] = {}  # model -> (path, size_bytes)
        # a split host's start waits for the previous run's stop (stop order), and a start
        # overtaken by a newer decision gives up: generation per model
        self._stopping: dict[str, defer.Deferred[None]] = {}
        self._generation: dict[str, int] = {}

    def serve(self, name: str, path: str, size_bytes: int) -> None:
        """This node is to serve ``name``: the election decides whether its llama-server runs
        now (solo, or elected split host) or the node waits (short of VRAM, a worker).
        A model dropped mesh-wide (``meshctl drop``) is not served until ``meshctl serve``."""
        if name in self.node.dropped:
            log.info("not serving %s: it is dropped mesh-wide (meshctl serve %s lifts it)",
                     name, name)
            return
        self.files[name] = (path, size_bytes)
        rebalancer = self.node.rebalancer
        if rebalancer is None:
            self.spawn(name)
        else:
            rebalancer.serve(name, size_bytes or None)

    async def when_serving(self, name: str) -> None:
        """Wait for ``name``'s llama-server, if the election started one.

        A re-plan may stop it before it is ready (a peer joined, and the model runs as
        a split now): then the run that replaced it is waited for, if there is one yet.
        """
        from meshd.backends.supervisor import BackendStopped

        while (served := self.node.served.get(name)) is not None:
            try:
                await served.backend.when_ready()
                return
            except BackendStopped:
                if self.node.served.get(name) is served:
                    raise

    def spawn(self, name: str) -> None:
        """Start a llama-server for ``name`` (solo) and publish it as served."""
        self._spawn(name)

    def spawn_split(self, name: str, shares: tuple[tuple[str, float], ...]) -> None:
        """Run ``name`` as a split host over ``shares``: once the workers answer (and the
        previous run of it is gone), llama-server with ``--rpc`` and ``--tensor-split``."""
        split = self.node.split
        if split is None:
            log.error("cannot host a split of %s: this node has no split runtime", name)
            return
        previous = self._stopping.get(name)
        self._generation[name] = generation = self._generation.get(name, 0) + 1

        def prepare(_: Any) -> Any:
            if self._generation.get(name) != generation:  # overtaken while the old run stopped
                raise defer.CancelledError(f"the split of {name} was re-planned")
            return split.prepare(name, shares)

        def start(planned: tuple[list[str], list[float]]) -> None:
            if self._generation.get(name) != generation or not self.running:
                split.release(name)
                return
            rpc, weights = planned
            self._spawn(name, rpc=rpc, tensor_split=weights)

        def failed(f: Any) -> None:
            if not f.check(defer.CancelledError):
                log.error("cannot host the split of %s: %s", name, f.getErrorMessage())

        d = _after(previous) if previous is not None else defer.succeed(None)
        d.addCallback(prepare)
        d.addCallbacks(start, failed)

    def split_broken(self, name: str, why: str) -> None:
        """A part of ``name``'s split went away under its llama-server (llama.cpp cannot
        go on without it and has no recovery): the same split again, from the stop.  Its
        prepare waits until every worker answers; a re-plan meanwhile overtakes it."""
        split = self.node.split
        hosted = split.hosting.get(name) if split is not None else None
        if hosted is None or hosted.cancelled or not self.running:
            return
        log.warning("split of %s: starting it over (llama-server, then its RPC parts): %s",
                    name, why)
        # SIGKILL: llama.cpp cannot go on without the part (it aborts, or waits for ever
        # on a stopped one), and a graceful stop only costs the re-plan its time
        self.stop_split_or_solo(name, kill=True)
        self.spawn_split(name, hosted.shares)

    def stop_split_or_solo(self, name: str, *, kill: bool = False) -> defer.Deferred[None]:
        """Stop ``name``'s llama-server, then (stop order) its split's rpc-servers and entries."""
        self._generation[name] = self._generation.get(name, 0) + 1
        split = self.node.split
        pending = self._stopping.get(name)
        d = self.node.stop_serving(name, kill=kill)
        if pending is not None:  # a re-plan while the last stop runs: that llama-server too
            d = defer.DeferredList([_after(pending), d], consumeErrors=True)
            d.addCallback(lambda _: None)
        if split is not None:
            if name in split.hosting:
                split.hosting[name].cancelled = True  # a prepare still probing gives up
            d.addBoth(lambda _: split.release(name))
        self._stopping[name] = d

        def stopped(result: Any) -> Any:
            if self._stopping.get(name) is d:
                del self._stopping[name]
            return result

        d.addBoth(stopped)
        return d

    def _spawn(self, name: str, *, rpc: list[str] | None = None,
               tensor_split: list[float] | None = None) -> None:
        from meshd.backends import supervisor as backend
        from meshd.daemon.node import ServedModel
        from meshd.models.scan import fallback_chat_template

        node = self.node
        files = self.files.get(name)
        if files is None:  # assigned by the election: from this node's disk
            local = node.scan.models.get(name) if node.scan is not None else None
            if local is None:
                log.error("cannot start llama-server for %s: not on this node's disk", name)
                return
            files = self.files[name] = (str(local.path), local.size_bytes)
        path, size_bytes = files
        try:
            bin_dir = backend.find_bin_dir(self.config.llama)
        except backend.BackendError as e:
            raise StartupError(str(e)) from None
        visible = node.gpu_report.cuda_visible_devices() if node.gpu_report is not None else None
        server = backend.LlamaServer(
            name=name,
            model_path=path,
            llama=self.config.llama,
            bin_dir=bin_dir,
            reactor=self.reactor,
            extra_env={"CUDA_VISIBLE_DEVICES": visible} if visible is not None else None,
            chat_template=fallback_chat_template(path),
            rpc_workers=rpc or (),
            tensor_split=tensor_split or (),
        )
        node.add_served(ServedModel(name, path, size_bytes, server))

        def changed(state: str) -> None:
            self._backend_state(name, state)

        server.add_listener(changed)
        server.start()

    def _backend_state(self, name: str, state: str) -> None:
        if state == BackendState.READY:
            self.notifier.status(self.node.status_line())
        elif state in (BackendState.RESTARTING, BackendState.FAILED):
            self.notifier.status(f"{name}: llama-server {state}")

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        return defer.ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        served = list(self.node.served.values())
        results = await defer.DeferredList(
            [defer.maybeDeferred(m.backend.stop) for m in served], consumeErrors=True)
        for m, (ok, result) in zip(served, results, strict=True):
            if not ok:
                log.error("stopping llama-server for %s failed: %s", m.name,
                          result.getErrorMessage())
        if self.node.split is not None:  # after the llama-servers: the rpc-servers
            await self.node.split.stop()


def _after(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A fresh Deferred that fires once ``d`` has, leaving ``d``'s own result alone (a chain
    added to ``d`` itself would hold up everyone else waiting on it)."""
    waiter: defer.Deferred[None] = defer.Deferred()

    def fire(result: Any) -> Any:
        waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter
