"""Split plumbing on one node, with fakes and a Clock: the rpc cache (``cache_root``,
``evict``), ``SplitRuntime`` as a worker (lend, refusal, unlend) and as a host
(prepare's ``--rpc`` / ``--tensor-split``, probing, release, stop), ``LocalBackends``'
stop order (llama-server first, then the split's rpc-servers and entries), and the
Rebalancer restarting llama-server only when ``split_key`` changes.

rpc-servers are ``FakeRpc``; the workers' probes are replaced by ``Probes`` (the real
probe is tested in ``tests/serving/test_rpctunnel.py``); entry ports listen on a memory
reactor that hands out distinct ports.  The Rebalancer tests reuse the fakes of
``tests/placement/test_rebalance.py`` and add only what those do not cover (shares).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from meshd.backends.supervisor import BackendStopped
from meshd.config import Config
from meshd.daemon.backends import LocalBackends
from meshd.daemon.node import ServedModel
from meshd.daemon.split import SplitRuntime, cache_root, evict
from meshd.mesh.desired import Want
from meshd.mesh.membership import PeerChanged, PeerLeft, PeerUp
from meshd.placement.election import RUN, WAIT, WORKER, Decision, Rebalancer
from meshd.placement.snapshot import GB
from meshd.serving import rpctunnel
from meshd.serving.rpctunnel import TunnelState
from meshd.serving.tunnel import TunnelRefused
from meshd.states import BackendState
from tests.harness.meshfakes import FakeBackend, make_node, peer
from tests.placement.test_rebalance import Actions, rebalancer
from tests.serving.test_tunnel import FakeMesh, FakePeer, frames, tunnel_frame

# -- the cache ---------------------------------------------------------------------------------


def test_cache_root_is_the_configured_directory_first():
    cfg = Config().replace("llama", rpc_cache_dir="/srv/rpc-cache")
    assert cache_root(cfg, {"CACHE_DIRECTORY": "/var/cache/meshd"}) == Path("/srv/rpc-cache")


def test_cache_root_is_the_units_first_cache_directory_next():
    cfg = Config().replace("node", state_dir="/var/lib/meshd")
    env = {"CACHE_DIRECTORY": "/var/cache/meshd:/var/cache/other"}
    assert cache_root(cfg, env) == Path("/var/cache/meshd")


@pytest.mark.parametrize("env", [{}, {"CACHE_DIRECTORY": ""}])
def test_cache_root_is_beside_the_state_otherwise(env):
    cfg = Config().replace("node", state_dir="/var/lib/meshd-x")
    assert cache_root(cfg, env) == Path("/var/lib/meshd-x/cache")


def cached(directory: Path, name: str, size: int, used: float, *, read: float | None = None
           ) -> Path:
    """A cache file of ``size`` bytes last written at ``used`` (and read at ``read``)."""
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / name
    p.write_bytes(b"t" * size)
    os.utime(p, (read if read is not None else used, used))
    return p


def test_evict_removes_the_least_recently_used_files_down_to_the_limit(tmp_path):
    old = cached(tmp_path, "old", 100, 1000)
    mid = cached(tmp_path, "mid", 100, 2000)
    new = cached(tmp_path, "new", 100, 3000)
    assert evict(tmp_path, 150) == [old, mid]
    assert not old.exists() and not mid.exists() and new.exists()


def test_evict_leaves_a_directory_at_or_under_its_limit_alone(tmp_path):
    a = cached(tmp_path, "a", 100, 1000)
    b = cached(tmp_path, "b", 100, 2000)
    assert evict(tmp_path, 200) == []
    assert a.exists() and b.exists()


def test_evict_counts_a_recent_read_as_use(tmp_path):
    read_lately = cached(tmp_path, "read", 100, 1000, read=4000)
    written = cached(tmp_path, "written", 100, 2000)
    assert evict(tmp_path, 150) == [written]
    assert read_lately.exists()


def test_evict_neither_counts_nor_removes_subdirectories(tmp_path):
    sub = tmp_path / "sub"
    inside = cached(sub, "big", 1000, 500)
    only = cached(tmp_path, "only", 100, 1000)
    assert evict(tmp_path, 100) == []
    assert inside.exists() and only.exists()


def test_evict_of_a_missing_directory_removes_nothing(tmp_path):
    assert evict(tmp_path / "absent", 0) == []


# -- fakes --------------------------------------------------------------------------------------


class FakeRpc:
    """An ``RpcServer`` stand-in: started, ready when the test says (or at once), stopped."""

    def __init__(self, name: str, cache_dir: Path | None, port: int, *, ready_at_start: bool):
        self.name = name
        self.cache_dir = cache_dir
        self.port = port
        self.ready_at_start = ready_at_start
        self.state = BackendState.STOPPED
        self.started = 0
        self.stopped = 0
        self.listeners: list[Any] = []
        self._waiters: list[defer.Deferred[Any]] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def start(self) -> None:
        self.started += 1
        self.state = BackendState.STARTING
        if self.ready_at_start:
            self.ready()

    def ready(self) -> None:
        self.state = BackendState.READY
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    def when_ready(self) -> defer.Deferred[Any]:
        if self.state == BackendState.READY:
            return defer.succeed(self)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(d)
        return d

    def stop(self, *, kill: bool = False) -> defer.Deferred[None]:
        self.stopped += 1
        self.state = BackendState.STOPPED
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(Failure(BackendStopped(f"{self.name} was stopped")))
        return defer.succeed(None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "port": self.port}


class FakeListener:
    def __init__(self, port: int):
        self.port = port
        self.stopped = 0

    def getHost(self) -> IPv4Address:  # noqa: N802 - Twisted's name
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:  # noqa: N802
        self.stopped += 1


class PortsReactor(MemoryReactorClock):
    """A memory reactor whose listeners get distinct ports (41001, 41002, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[FakeListener] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):  # noqa: N802
        self.tcpServers.append((port, factory, backlog, interface))
        listener = FakeListener(41001 + len(self.listeners))
        self.listeners.append(listener)
        return listener


class Probes:
    """``rpctunnel.probe`` replaced: each worker answers from its script (a refusal reason,
    ``"pending"`` to hold the answer, or None for yes), then yes."""

    def __init__(self) -> None:
        self.script: dict[str, list[str | None]] = {}
        self.calls: list[tuple[str, str]] = []
        self.pending: list[defer.Deferred[Any]] = []

    def __call__(self, mesh: Any, worker: str, model: str) -> defer.Deferred[Any]:
        self.calls.append((worker, model))
        steps = self.script.get(worker) or [None]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step == "pending":
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        if step is None:
            return defer.succeed(None)
        return defer.fail(TunnelRefused(f"node {worker} refused a tunnel for {model}: {step}"))


class Rig:
    """A ``SplitRuntime`` of node ``node_id`` with fake rpc-servers, probes and ports."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                 node_id: str = "node-h", has_gpus: bool = True,
                 gpu_weights: tuple[float, ...] = (), rpc_ready_at_start: bool = True,
                 **llama: Any):
        self.reactor = PortsReactor()
        self.probes = Probes()
        monkeypatch.setattr(rpctunnel, "probe", self.probes)
        llama.setdefault("rpc_cache_dir", str(tmp_path / "cache"))
        self.config = Config().replace("llama", **llama)
        self.rpcs: list[FakeRpc] = []
        self.rpc_ready_at_start = rpc_ready_at_start
        self.mesh: Any = FakeMesh()
        self.pids: dict[str, int] = {}
        self.runtime = SplitRuntime(
            self.config, reactor=self.reactor, node_id=node_id, make_rpc=self.make_rpc,
            mesh=lambda: self.mesh, llama_pid=self.pids.get, has_gpus=has_gpus,
            gpu_weights=gpu_weights)

    def make_rpc(self, name: str, cache_dir: Path | None) -> Any:
        rpc = FakeRpc(name, cache_dir, 7000 + len(self.rpcs),
                      ready_at_start=self.rpc_ready_at_start)
        self.rpcs.append(rpc)
        return rpc

    def prepare(self, shares: tuple[tuple[str, float], ...], model: str = "m") -> list[Any]:
        results: list[Any] = []
        self.runtime.prepare(model, shares).addBoth(results.append)
        return results


def tunnel_from(runtime: SplitRuntime, who: str, model: str = "m") -> tuple[FakePeer, dict]:
    """A host's ``"rpc"`` tunnel to this worker: its peer and the worker's answer."""
    p: Any = FakePeer(who)
    runtime.tunnel_host.handle(p)
    p.feed(tunnel_frame({"model": model}))
    (frame,) = frames(p.sent())
    return p, frame.json()


# -- SplitRuntime as a worker --------------------------------------------------------------------


def test_lend_starts_one_rpc_server_with_its_cache_after_evicting_the_oldest_files(
        tmp_path, monkeypatch):
    root = tmp_path / "cache"
    old = cached(root / "rpc", "old", 60, 1000)
    new = cached(root / "rpc", "new", 60, 2000)
    rig = Rig(tmp_path, monkeypatch, rpc_cache_max_gb=100 / 2**30)  # 100 bytes
    rig.runtime.lend("m", "node-h")
    (rpc,) = rig.rpcs
    assert rpc.cache_dir == root  # LLAMA_CACHE; rpc-server adds /rpc itself
    assert rpc.started == 1 and rpc.name == "m worker"
    assert not old.exists() and new.exists()
    rig.runtime.lend("m", "node-h")  # every election re-decides: still one rpc-server
    assert len(rig.rpcs) == 1 and rpc.started == 1


def test_without_the_rpc_cache_the_rpc_server_gets_no_cache_directory(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, rpc_cache=False)
    rig.runtime.lend("m", "node-h")
    assert rig.rpcs[0].cache_dir is None
    assert not (tmp_path / "cache").exists()


def test_an_unusable_cache_directory_runs_the_rpc_server_without_the_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rig = Rig(tmp_path, monkeypatch, rpc_cache_dir=str(blocker))
    rig.runtime.lend("m", "node-h")
    assert rig.rpcs[0].cache_dir is None and rig.rpcs[0].started == 1


@pytest.mark.parametrize("model, who, reason", [
    ("m", "node-h", ""),
    ("other", "node-h", "this node lends its rpc-server for m, not other"),
    ("m", "node-x", "this node's rpc-server is lent to host node-h, not node-x"),
])
def test_a_worker_opens_tunnels_only_for_its_elected_host_and_the_model_lent(
        tmp_path, monkeypatch, model, who, reason):
    rig = Rig(tmp_path, monkeypatch, node_id="node-w")
    rig.runtime.lend("m", "node-h")
    assert rig.runtime.refusal(model, who) == reason
    _, answer = tunnel_from(rig.runtime, who, model)  # what the tunnel host answers
    assert answer == ({"ok": True} if not reason else {"error": reason})


def test_a_worker_refuses_until_its_rpc_server_is_ready(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, node_id="node-w", rpc_ready_at_start=False)
    assert rig.runtime.refusal("m", "node-h") == "this node is no split worker now"
    rig.runtime.lend("m", "node-h")
    assert rig.runtime.refusal("m", "node-h") == "this node's rpc-server is starting"
    assert rig.runtime.worker_port() is None
    rig.rpcs[0].ready()
    assert rig.runtime.refusal("m", "node-h") == ""
    assert rig.runtime.worker_port() == 7000


def test_unlend_refuses_new_tunnels_closes_open_ones_and_stops_the_rpc_server(
        tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, node_id="node-w")
    rig.runtime.lend("m", "node-h")
    p, answer = tunnel_from(rig.runtime, "node-h")
    assert answer == {"ok": True}
    fired: list[Any] = []
    rig.runtime.unlend().addBoth(fired.append)
    assert fired == [None]
    assert p.transport.disconnected  # aborted
    assert rig.rpcs[0].stopped == 1 and rig.runtime.worker_rpc is None
    assert rig.runtime.refusal("m", "node-h") == "this node is no split worker now"
    assert rig.runtime.to_dict()["lending"] is None


def test_lending_to_a_new_host_closes_the_old_hosts_tunnels_and_keeps_the_rpc_server(
        tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, node_id="node-w")
    rig.runtime.lend("m", "node-h")
    old, _ = tunnel_from(rig.runtime, "node-h")
    rig.runtime.lend("m", "node-h2")
    assert old.transport.disconnected
    assert len(rig.rpcs) == 1 and rig.rpcs[0].stopped == 0
    assert rig.runtime.refusal("m", "node-h") != ""
    assert rig.runtime.refusal("m", "node-h2") == ""
    assert rig.runtime.to_dict()["lending"] == {"model": "m", "host": "node-h2"}


# -- SplitRuntime as a host -----------------------------------------------------------------------


def test_prepare_on_gpus_lists_the_rpc_devices_first_then_the_local_gpus(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, has_gpus=True, gpu_weights=(3.0, 1.0))
    (result,) = rig.prepare((("node-h", 0.5), ("node-b", 0.3), ("node-c", 0.2)))
    rpc, weights = result
    assert rpc == ["127.0.0.1:41001", "127.0.0.1:41002"]
    assert weights == pytest.approx([0.3, 0.2, 0.375, 0.125])
    assert rig.rpcs == []  # the host's share is on its GPUs
    assert sorted(rig.probes.calls) == [("node-b", "m"), ("node-c", "m")]
    assert [i for _, _, _, i in rig.reactor.tcpServers] == ["127.0.0.1", "127.0.0.1"]
    assert rig.runtime.tunnels("m") == [
        {"node_id": "node-b", "state": "listening", "local_port": 41001, "connections": 0},
        {"node_id": "node-c", "state": "listening", "local_port": 41002, "connections": 0}]


def test_an_entry_port_lets_in_the_pid_of_this_nodes_llama_server_for_the_model(
        tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch)
    rig.prepare((("node-h", 0.5), ("node-b", 0.5)))
    entry = rig.runtime.hosting["m"].entries["node-b"]
    assert entry.allowed_pid() is None  # no llama-server yet: nobody
    rig.pids["m"] = 4242
    assert entry.allowed_pid() == 4242
    assert (entry.worker, entry.model) == ("node-b", "m")


def test_prepare_without_gpus_runs_the_hosts_share_in_a_local_rpc_server_first(
        tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, has_gpus=False, rpc_ready_at_start=False)
    results = rig.prepare((("node-h", 0.6), ("node-b", 0.4)))
    (local,) = rig.rpcs
    assert local.name == "m host" and local.started == 1
    assert results == []  # until the local rpc-server is ready
    local.ready()
    ((rpc, weights),) = results
    assert rpc == ["127.0.0.1:7000", "127.0.0.1:41001"]
    assert weights == pytest.approx([0.6, 0.4])


def test_prepare_waits_for_every_worker_asking_again_with_backoff(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch)
    rig.probes.script["node-b"] = ["this node's rpc-server is starting",
                                   "this node's rpc-server is starting", None]
    results = rig.prepare((("node-h", 0.5), ("node-b", 0.25), ("node-c", 0.25)))
    assert results == [] and rig.runtime.hosting["m"].waiting_for == {"node-b"}
    assert rig.runtime.to_dict()["hosting"]["m"]["waiting_for"] == ["node-b"]
    rig.reactor.advance(0.25)
    assert results == [] and rig.probes.calls.count(("node-b", "m")) == 2
    rig.reactor.advance(0.49)  # the second wait doubles
    assert rig.probes.calls.count(("node-b", "m")) == 2
    rig.reactor.advance(0.01)
    assert rig.probes.calls.count(("node-b", "m")) == 3
    assert len(results) == 1 and rig.runtime.hosting["m"].waiting_for == set()


def test_release_closes_the_entries_and_stops_the_local_rpc_server(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, has_gpus=False)
    rig.prepare((("node-h", 0.5), ("node-b", 0.5)))
    entry = rig.runtime.hosting["m"].entries["node-b"]
    fired: list[Any] = []
    rig.runtime.release("m").addBoth(fired.append)
    assert fired == [None]
    assert entry.state == TunnelState.CLOSED and rig.reactor.listeners[0].stopped == 1
    assert rig.rpcs[0].stopped == 1
    assert rig.runtime.tunnels("m") is None and rig.runtime.hosting == {}
    assert rig.runtime.release("m").called  # twice is harmless


def test_release_while_workers_are_probed_cancels_the_prepare(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch)
    rig.probes.script["node-b"] = ["this node is no split worker now"]
    results = rig.prepare((("node-h", 0.5), ("node-b", 0.5)))
    rig.runtime.release("m")
    rig.reactor.advance(0.25)
    (failure,) = results
    assert failure.check(defer.CancelledError)
    calls = len(rig.probes.calls)
    rig.reactor.advance(60)
    assert len(rig.probes.calls) == calls  # asking stopped


def test_a_broken_part_of_a_hosted_split_is_reported_until_it_is_released(
        tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch)
    broken: list[tuple[str, str]] = []
    rig.runtime.on_broken = lambda model, why: broken.append((model, why))
    rig.prepare((("node-h", 0.5), ("node-b", 0.5)))
    entry = rig.runtime.hosting["m"].entries["node-b"]
    assert entry.on_broken is not None
    entry.on_broken("the worker closed its RPC tunnel (worker node-b)")
    assert broken == [("m", "the worker closed its RPC tunnel (worker node-b)")]
    rig.runtime.release("m")
    entry.on_broken("late")
    assert len(broken) == 1


def test_a_local_rpc_server_that_leaves_ready_breaks_the_split(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, has_gpus=False)
    broken: list[tuple[str, str]] = []
    rig.runtime.on_broken = lambda model, why: broken.append((model, why))
    rig.prepare((("node-h", 0.5), ("node-b", 0.5)))
    (listener,) = rig.rpcs[0].listeners
    listener(BackendState.READY)
    assert broken == []
    listener(BackendState.RESTARTING)  # it comes back on another port
    assert broken == [("m", "its local rpc-server is restarting")]


def test_stop_releases_every_split_and_stops_lending(tmp_path, monkeypatch):
    rig = Rig(tmp_path, monkeypatch, has_gpus=False)
    rig.prepare((("node-h", 0.5), ("node-b", 0.5)), model="m1")
    rig.runtime.lend("m2", "node-x")
    fired: list[Any] = []
    rig.runtime.stop().addBoth(fired.append)
    assert fired == [None]
    assert rig.runtime.hosting == {} and rig.runtime.lending is None
    assert [r.stopped for r in rig.rpcs] == [1, 1]  # the host's local one and the worker's


# -- LocalBackends: the stop order ------------------------------------------------------------------


class Llama(FakeBackend):
    """A llama-server whose stop takes as long as the test says (``exit``)."""

    def __init__(self, log: list[Any]):
        super().__init__()
        self.log = log
        self.stopping: defer.Deferred[None] | None = None

    def stop(self, *, kill: bool = False) -> defer.Deferred[None]:
        self.stopped += 1
        self.log.append("llama-server killed" if kill else "llama-server stopping")
        self.stopping = defer.Deferred()
        return self.stopping

    def exit(self) -> None:
        assert self.stopping is not None
        self.log.append("llama-server gone")
        self.stopping.callback(None)


class Notifier:
    def status(self, line: str) -> None:
        pass


class BackendsRig:
    """``LocalBackends`` of a host with a real ``SplitRuntime``; llama-servers are ``Llama``s,
    and what happens is in ``log`` in order."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.split = Rig(tmp_path, monkeypatch, node_id="node-h")
        self.node = make_node("node-h")
        self.node.split = self.split.runtime
        self.log: list[Any] = []
        self.llamas: list[Llama] = []
        self.backends = LocalBackends(self.node, self.node.config, reactor=self.node.reactor,
                                      notifier=Notifier())  # type: ignore[arg-type]
        self.backends.startService()
        runtime = self.split.runtime
        prepare, release = runtime.prepare, runtime.release

        def logged_prepare(name, shares):
            self.log.append(("prepare", tuple(n for n, _ in shares)))
            return prepare(name, shares)

        def logged_release(name):
            self.log.append(("release", name))
            return release(name)

        monkeypatch.setattr(runtime, "prepare", logged_prepare)
        monkeypatch.setattr(runtime, "release", logged_release)
        monkeypatch.setattr(self.backends, "_spawn", self.spawn)

    def spawn(self, name: str, *, rpc: list[str] | None = None,
              tensor_split: list[float] | None = None) -> None:
        self.log.append(("spawn", tuple(rpc or ())))
        llama: Any = Llama(self.log)
        self.llamas.append(llama)
        self.node.add_served(ServedModel(name, f"/models/{name}.gguf", 20 * GB, llama))


S1 = (("node-h", 0.5), ("node-b", 0.5))
S2 = (("node-h", 0.4), ("node-b", 0.3), ("node-c", 0.3))
S3 = (("node-h", 0.5), ("node-c", 0.5))


def test_a_split_host_stops_llama_server_before_its_rpc_servers_and_entries(tmp_path, monkeypatch):
    rig = BackendsRig(tmp_path, monkeypatch)
    rig.backends.spawn_split("m", S1)
    assert rig.log == [("prepare", ("node-h", "node-b")), ("spawn", ("127.0.0.1:41001",))]
    entry = rig.split.runtime.hosting["m"].entries["node-b"]
    rig.log.clear()
    rig.backends.stop_split_or_solo("m")
    assert rig.log == ["llama-server stopping"]
    assert entry.state != TunnelState.CLOSED  # llama-server still uses it
    rig.llamas[0].exit()
    assert rig.log == ["llama-server stopping", "llama-server gone", ("release", "m")]
    assert entry.state == TunnelState.CLOSED


def test_a_split_start_waits_for_the_previous_runs_stop(tmp_path, monkeypatch):
    rig = BackendsRig(tmp_path, monkeypatch)
    rig.backends.spawn_split("m", S1)
    rig.log.clear()
    rig.backends.stop_split_or_solo("m")
    rig.backends.spawn_split("m", S2)
    assert rig.log == ["llama-server stopping"]
    rig.llamas[0].exit()
    assert rig.log == ["llama-server stopping", "llama-server gone", ("release", "m"),
                       ("prepare", ("node-h", "node-b", "node-c")),
                       ("spawn", ("127.0.0.1:41002", "127.0.0.1:41003"))]
    assert rig.split.runtime.hosting["m"].shares == S2


def test_a_stop_while_the_workers_are_probed_gives_the_start_up_quietly(
        tmp_path, monkeypatch, caplog):
    rig = BackendsRig(tmp_path, monkeypatch)
    rig.split.probes.script["node-b"] = ["this node's rpc-server is starting"]
    rig.backends.spawn_split("m", S1)
    rig.backends.stop_split_or_solo("m")  # nothing runs yet: released at once
    with caplog.at_level(logging.ERROR, logger="meshd.daemon.backends"):
        rig.split.reactor.advance(10)
    assert [e for e in rig.log if e[0] == "spawn"] == []
    assert rig.split.runtime.hosting == {}
    assert caplog.records == []


def test_a_broken_split_starts_over_with_its_shares_once_llama_server_stopped(
        tmp_path, monkeypatch):
    rig = BackendsRig(tmp_path, monkeypatch)
    rig.split.runtime.on_broken = rig.backends.split_broken
    rig.backends.spawn_split("m", S1)
    entry = rig.split.runtime.hosting["m"].entries["node-b"]
    rig.log.clear()
    entry.on_broken("the worker closed its RPC tunnel (worker node-b)")
    entry.on_broken("a second connection of the same llama-server")  # one start-over
    assert rig.log == ["llama-server killed"]  # it cannot recover: no graceful stop
    rig.llamas[0].exit()
    assert rig.log == ["llama-server killed", "llama-server gone", ("release", "m"),
                       ("prepare", ("node-h", "node-b")), ("spawn", ("127.0.0.1:41002",))]
    assert rig.split.runtime.hosting["m"].shares == S1


def two_quick_replans(rig: BackendsRig) -> None:
    """S1 runs; S2 is decided while its llama-server stops, then S3 before it is gone."""
    rig.backends.spawn_split("m", S1)
    rig.log.clear()
    rig.backends.stop_split_or_solo("m")
    rig.backends.spawn_split("m", S2)
    rig.backends.stop_split_or_solo("m")
    rig.backends.spawn_split("m", S3)


def test_two_quick_replans_still_wait_for_the_first_llama_server_to_stop(tmp_path, monkeypatch):
    rig = BackendsRig(tmp_path, monkeypatch)
    two_quick_replans(rig)
    assert rig.log == ["llama-server stopping"]


def test_after_two_quick_replans_the_last_plan_runs_with_its_entries_open(tmp_path, monkeypatch):
    rig = BackendsRig(tmp_path, monkeypatch)
    two_quick_replans(rig)
    rig.llamas[0].exit()
    hosted = rig.split.runtime.hosting.get("m")
    assert hosted is not None and hosted.shares == S3
    assert all(e.state != TunnelState.CLOSED for e in hosted.entries.values())
    spawns = [e for e in rig.log if e[0] == "spawn"]
    assert spawns == [("spawn", tuple(f"127.0.0.1:{e.port}" for e in hosted.entries.values()))]


# -- the Rebalancer: restarts only when split_key changes ------------------------------------------


class ShareActions(Actions):
    """``Actions`` of test_rebalance, with the shares recorded (rounded like ``split_key``)."""

    def start_split(self, model, shares):
        self.log.append(("split", model, tuple((n, round(s, 4)) for n, s in shares)))


def share_rebalancer(node) -> tuple[Rebalancer, ShareActions]:
    acts = ShareActions()
    r = Rebalancer(node, reactor=node.reactor, start=acts.start, stop=acts.stop,
                   start_split=acts.start_split)
    node.rebalancer = r
    return r, acts


def test_split_key_is_the_shares_rounded_to_four_places():
    d = Decision("m", RUN, "split", host="a", shares=(("a", 2 / 3), ("b", 1 / 3)))
    assert d.split_key == (("a", 0.6667), ("b", 0.3333))
    assert Decision("m", RUN, "solo").split_key == ()


def test_a_split_host_restarts_llama_server_when_the_shares_change_over_the_same_workers():
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    r, acts = share_rebalancer(node)
    r.serve("m")
    first = ("split", "m", (("a", 0.6667), ("b", 0.3333)))
    assert acts.log == [first]
    old = node.mesh.members["b"]
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=16)  # b freed VRAM
    r.on_event(PeerChanged(node.mesh.members["b"], old))
    assert acts.log == [first, ("stop", "m"), ("split", "m", (("a", 0.5), ("b", 0.5)))]
    assert r.running == (("a", 0.5), ("b", 0.5))


def test_a_skipped_peers_moving_rtt_is_the_same_plan_logged_once(caplog):
    # the re-check plans again every recheck_s; "c (302 ms > 80 ms)" then "(303 ms ...)"
    # is no news for the operator
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    node.mesh.members["c"] = dataclasses.replace(peer("c", waiting=["m"], vram_gb=8), rtt_ms=302.0)
    r, acts = share_rebalancer(node)
    with caplog.at_level(logging.INFO, logger="meshd.placement.election"):
        r.serve("m")
        node.mesh.members["c"] = dataclasses.replace(node.mesh.members["c"], rtt_ms=303.4)
        node.reactor.advance(r.recheck_s)
        assert r.decisions == 2 and "303 ms" in r.decision.reason
    plans = [rec.getMessage() for rec in caplog.records if "split host" in rec.getMessage()]
    assert plans == ["model m: split host, shares a 67%, b 33%: fits no single node: split over "
                     "2 nodes; skipped c (302 ms > 80 ms) (serving m)"]
    assert acts.log == [("split", "m", (("a", 0.6667), ("b", 0.3333)))]


def test_a_share_change_below_the_rounding_restarts_nothing():
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    r, acts = share_rebalancer(node)
    r.serve("m")
    before = r.decision
    old = node.mesh.members["b"]
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8 + 1000 / GB)  # 1000 bytes more
    r.on_event(PeerChanged(node.mesh.members["b"], old))
    assert r.decision.shares != before.shares  # the plan moved ...
    assert len(acts.log) == 1  # ... but not what llama-server runs with


def test_a_lost_worker_stops_the_split_host_and_its_return_starts_it_once():
    node = make_node("a", vram_gb=16, disk={"m": 20 * GB})
    node.mesh.members["b"] = peer("b", waiting=["m"], vram_gb=8)
    r, acts = rebalancer(node)
    r.serve("m")
    b = node.mesh.members.pop("b")
    r.on_event(PeerLeft("b"))
    assert r.decision.action == WAIT
    node.mesh.members["b"] = b
    r.on_event(PeerUp(b))
    r.on_event(PeerChanged(b, b))
    assert acts.log == [("split", "m", ("b",)), ("stop", "m"), ("split", "m", ("b",))]


class Lending:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def lend(self, model: str, host: str) -> None:
        self.log.append(("lend", model, host))

    def unlend(self) -> None:
        self.log.append(("unlend",))


def lending_rebalancer(node) -> tuple[Rebalancer, Actions, Lending]:
    acts, lending = Actions(), Lending()
    r = Rebalancer(node, reactor=node.reactor, start=acts.start, stop=acts.stop,
                   start_split=acts.start_split, lend=lending.lend, unlend=lending.unlend)
    node.rebalancer = r
    return r, acts, lending


def test_a_split_worker_lends_to_its_elected_host_and_unlends_when_no_longer_one():
    node = make_node("b", vram_gb=8, disk={"m": 20 * GB})
    node.mesh.members["a"] = peer("a", waiting=["m"], vram_gb=16)
    r, acts, lending = lending_rebalancer(node)
    r.serve("m")
    assert r.decision.action == WORKER and r.lent == ("m", "a")
    assert lending.log[-1] == ("lend", "m", "a") and acts.log == []
    node.mesh.members.pop("a")
    r.on_event(PeerLeft("a"))  # alone: too small, waits
    assert r.decision.action == WAIT and r.lent is None
    assert lending.log[-1] == ("unlend",)
    assert lending.log.count(("unlend",)) == 1


def test_a_worker_of_a_group_it_thinks_short_still_lends_to_the_host():
    # each node measures RTTs itself: b sees c far (a 'wait' from where b stands) while the
    # host a sees c near and splits; b lending anyway keeps a's tunnels from being refused
    node = make_node("b", vram_gb=8, disk={"m": 20 * GB})
    node.mesh.members["a"] = peer("a", waiting=["m"], vram_gb=12)
    node.mesh.members["c"] = dataclasses.replace(peer("c", waiting=["m"], vram_gb=8), rtt_ms=300.0)
    r, acts, lending = lending_rebalancer(node)
    r.serve("m")
    assert (r.decision.action, r.decision.mode, r.decision.host) == (WORKER, "wait", "a")
    assert r.lent == ("m", "a") and lending.log == [("lend", "m", "a")] and acts.log == []


def test_an_idle_node_with_the_file_of_a_waiting_group_joins_it_and_lends():
    # b got the big model by meshctl download; the assignment hook only hands out models
    # that fit a node alone, so b joins a's waiting group itself: the split can start
    node = make_node("b", vram_gb=8, disk={"m": 20 * GB, "small": GB})
    node.mesh.members["a"] = peer("a", waiting=["m"], vram_gb=16)
    r, acts, lending = lending_rebalancer(node)
    r.downloaded()  # what the node calls when a download ends: assignment after settle_s
    assert r.target is None
    node.reactor.advance(r.settle_s)
    assert r.target == "m" and (r.decision.action, r.decision.host) == (WORKER, "a")
    assert lending.log == [("lend", "m", "a")] and acts.log == []


def test_an_idle_node_leaves_a_running_or_dropped_model_to_the_assignment_hook():
    node = make_node("b", vram_gb=8, disk={"m": 20 * GB})
    node.mesh.members["a"] = peer("a", serving=["m"], vram_gb=16)
    node.mesh.members["c"] = peer("c", waiting=["m"], vram_gb=8)  # a worker of a's split
    r, _, lending = lending_rebalancer(node)
    assert r._waiting_group_to_join() is None  # noqa: SLF001 - the rule alone
    node.mesh.members["a"] = peer("a", waiting=["m"], vram_gb=16)
    node.desired.decide("m", Want.DROPPED, by="x")
    assert r._waiting_group_to_join() is None  # noqa: SLF001
    assert lending.log == []


def test_a_worker_whose_model_is_dropped_stops_lending():
    node = make_node("b", vram_gb=8, disk={"m": 20 * GB})
    node.mesh.members["a"] = peer("a", waiting=["m"], vram_gb=16)
    r, _, lending = lending_rebalancer(node)
    r.serve("m")
    assert r.lent == ("m", "a")
    r.forget("m")
    assert r.lent is None and lending.log[-1] == ("unlend",)
