"""A mesh of real ``meshd`` nodes with real llama-servers in network namespaces, for chaos runs.

Shared by the short form in CI (``tests/test_chaos.py``) and the long form
(``bench/chaos.py``).  The lab is a star: one hub namespace and one namespace per node,
each joined to the hub by a veth link (10.81.<i>.1 on the hub, 10.81.<i>.2 in the node).
Every mesh connection crosses ``bench/delay_relay.py`` in the hub (node ``i``
advertises the relay's ``10.81.<i>.1:7842``), so that a delay can be added and removed
for the whole mesh with a signal, while the kernel paths stay simple: a node only ever
talks to hub addresses.  Faults are made here:

- ``kill9`` / ``sigstop_node`` / ``sigstop_llama`` / ``sigcont``: by PID, meshd and the
  llama-server it started (``children_of``);
- ``cut(x, y)``: a silent cut of every connection between two nodes (``iptables -j
  DROP`` in the hub, both ways: no FIN, no RST), ``heal()`` removes every cut;
- ``loss(p)``: ``-m statistic --mode random`` drops on every node's link, both ways;
- ``delay(on)``: the relay's SIGUSR1/SIGUSR2.

A node's *view* is what its control socket says (``meshctl status --json``): the active
nodes it knows alive and, per model, the hosts it would route to.  ``converge`` waits,
bounded, until every node named agrees on the expected view and returns how long that
took.  Every process started here is ended by its own PID, and every namespace removed,
in ``close()`` -- also when a start fails half-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.harness.daemon import Meshd, children_of, pid_alive
from tests.harness.meshnodes import Namespaces, in_netns, ip

MESH_PORT = 7842

# mesh timing for the lab: quick detection, still well above the relay's added 2 x 200 ms
TIMING = dict(heartbeat_s=0.5, heartbeat_timeout_s=2.5, verify_timeout_s=1.0, rejoin_s=3.0,
              connect_timeout_s=3.0, refresh_s=5.0)
# the API's deadlines in the lab (the defaults are minutes: see docs/reliability.md)
API = dict(first_byte_timeout_s=20.0, stream_idle_timeout_s=10.0, connect_timeout_s=3.0)
LLAMA = dict(ctx_size=512, threads=1, restart_min_s=1.0, live_interval_s=1.0, live_misses=3,
             health_timeout_s=1.0, stop_timeout_s=3.0)


class LabError(Exception):
    pass


@dataclass(frozen=True)
class View:
    """What one node says about the mesh: the active nodes alive, each model's hosts."""

    members: frozenset[str]
    hosts: tuple[tuple[str, frozenset[str]], ...]

    @classmethod
    def of(cls, members: Iterable[str], hosts: Mapping[str, Iterable[str]]) -> View:
        return cls(frozenset(members),
                   tuple(sorted((m, frozenset(h)) for m, h in hosts.items() if h)))

    def show(self, names: dict[str, str]) -> str:
        n = lambda ids: ",".join(sorted(names.get(i, i[:6]) for i in ids))  # noqa: E731
        return f"members {{{n(self.members)}}} " + " ".join(
            f"{m}:{{{n(h)}}}" for m, h in self.hosts)


def view_of(status: dict[str, Any]) -> View:
    """A node's view from its status: an active node lists itself and its alive peers,
    a passive one the active nodes of its routing table; each model's hosts are the
    warm ones."""
    if status.get("route"):  # a passive node: the routing table it lives on
        members: set[str] = set(status["route"].get("active_nodes") or [])
    else:
        members = {status["node_id"]} | {p["node_id"] for p in status.get("peers", [])
                                          if p.get("state") == "alive"}
    hosts = {m["name"]: m.get("hosts") or [] for m in status.get("models", [])
             if m.get("state") == "warm"}
    return View.of(members, hosts)


@dataclass
class LabNode:
    name: str
    index: int
    netns: str
    daemon: Meshd
    model: str | None  # None: the passive client
    node_id: str = ""
    llama_pids: list[int] = field(default_factory=list)

    @property
    def link_addr(self) -> str:
        return f"10.81.{self.index}.2"

    @property
    def relay_addr(self) -> str:
        return f"10.81.{self.index}.1"

    @property
    def api_url(self) -> str:
        """Reachable only inside this node's namespace (the driver runs there)."""
        return f"http://127.0.0.1:{self.daemon.api_port}"

    def status(self) -> dict[str, Any] | None:
        from meshd.cli.meshctl import Fail

        try:
            return self.daemon.control("GET", "/status", timeout=2)
        except Fail:
            return None

    def alive(self) -> bool:
        p = self.daemon.proc
        return p is not None and p.poll() is None

    def llama_children(self) -> list[int]:
        if not self.alive():
            return []
        return [pid for pid, comm in children_of(self.daemon.pid) if comm.startswith("llama")]


class Lab:
    """``hosts``: node name -> model it serves (the same GGUF under each name); plus a
    passive client ``cl``.  Call ``close()`` (a finalizer) whatever happens."""

    def __init__(self, base: Path, *, hosts: dict[str, str], llama_bin_dir: str, gguf: str,
                 delay_ms: float = 200.0, timing: dict[str, float] | None = None,
                 api: dict[str, float] | None = None):
        self.base = Path(base)
        self.host_models = dict(hosts)
        self.llama_bin_dir = llama_bin_dir
        self.gguf = gguf
        self.delay_ms = delay_ms
        self.timing = {**TIMING, **(timing or {})}
        self.api = {**API, **(api or {})}
        self.spaces = Namespaces()
        self.hub = ""
        self.nodes: dict[str, LabNode] = {}
        self.relay: subprocess.Popen[str] | None = None
        self.cuts: list[list[str]] = []  # iptables rule specs in the hub, to delete on heal
        self.lossy = False
        self.started: list[Meshd] = []  # every daemon process started, for close()
        self.driver_proc: subprocess.Popen[str] | None = None
        self.outcomes_path: Path | None = None

    # -- building --------------------------------------------------------------------------

    def build(self) -> Lab:
        self.hub = self.spaces.add("hub")
        names = [*self.host_models, "cl"]
        for i, name in enumerate(names, 1):
            ns = self.spaces.add(name)
            self.spaces.link(self.hub, f"10.81.{i}.1/24", ns, f"10.81.{i}.2/24")
            ip("-n", ns, "route", "add", "default", "via", f"10.81.{i}.1")
            model = self.host_models.get(name)
            self.nodes[name] = LabNode(name, i, ns, self._daemon(name, ns, i, model), model)
        routes = [f"{n.relay_addr}:{MESH_PORT}={n.link_addr}:{MESH_PORT}"
                  for n in self.nodes.values() if n.model]
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", self.hub, sys.executable, str(ROOT / "bench/delay_relay.py"),
             "--delay-ms", str(self.delay_ms), "--start-off", *routes],
            stdout=subprocess.PIPE, text=True)
        assert self.relay.stdout is not None
        if self.relay.stdout.readline().strip() != "ready":
            raise LabError("the delaying relay did not start")
        return self

    def _daemon(self, name: str, ns: str, i: int, model: str | None) -> Meshd:
        base = self.base / name
        models = base / "models"
        models.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "node": {"models_dir": str(models), "vram_gb": 8.0},
            "mesh": {"listen": f"0.0.0.0:{MESH_PORT}", "advertise": [f"10.81.{i}.1:{MESH_PORT}"],
                     **self.timing},
            "api": {**self.api},
            "console": {"enabled": False},
            # debug: llama-server's own lines (one per finished task) land in the log
            "log": {"level": "debug" if model else "info"},
        }
        if model:
            os.symlink(self.gguf, models / f"{model}.gguf")
            config["models"] = {"serve": [model], "min_free_gb": 0.0}
            config["llama"] = {"bin_dir": self.llama_bin_dir, **LLAMA}
        else:
            config["node"]["client"] = True
            config["models"] = {"serve": []}
        return Meshd(base, config, name=name, netns=ns)

    def start(self, timeout_s: float = 240.0) -> None:
        """The first host founds the mesh, the others and the client join with its
        tokens; returns once every node's view is the full mesh with every model warm."""
        hosts = [n for n in self.nodes.values() if n.model]
        first = hosts[0]
        self._start(first)
        wait(lambda: (first.status() or {}).get("mesh_id"), 60, f"{first.name} in a mesh",
             [first])
        for n in hosts[1:]:
            self._start(n, join=[self.token(first)])
        for n in hosts:
            wait(lambda n=n: (n.status() or {}).get("node_id"), 60, f"{n.name} up", [n])
            n.node_id = n.status()["node_id"]  # type: ignore[index]
        self._start(self.nodes["cl"], join=[self.token(first)])
        wait(lambda: (self.nodes["cl"].status() or {}).get("node_id"), 60, "the client up",
             [self.nodes["cl"]])
        self.nodes["cl"].node_id = self.nodes["cl"].status()["node_id"]  # type: ignore[index]
        self.converge(self.full_view(), timeout_s, "the whole mesh warm")

    def _start(self, n: LabNode, join: list[str] | None = None) -> None:
        flags = [a for t in join or [] for a in ("--join", t)]
        n.daemon.start(*flags)
        self.started.append(n.daemon)

    def token(self, issuer: LabNode) -> str:
        return issuer.daemon.control("POST", "/token", {"ttl_s": 3600, "once": False})["token"]

    # -- views -------------------------------------------------------------------------------

    def full_view(self, without: Iterable[str] = (), cold: Iterable[str] = ()) -> View:
        """The view with every host alive and warm, but ``without`` (gone) and ``cold``
        (alive, its model not warm)."""
        gone, cold = set(without), set(cold)
        members = [n.node_id for n in self.nodes.values() if n.model and n.name not in gone]
        hosts: dict[str, list[str]] = {}
        for n in self.nodes.values():
            if n.model and n.name not in gone | cold:
                hosts.setdefault(n.model, []).append(n.node_id)
        return View.of(members, hosts)

    def names(self) -> dict[str, str]:
        return {n.node_id: n.name for n in self.nodes.values()}

    def views(self, who: Iterable[str]) -> dict[str, View | None]:
        out: dict[str, View | None] = {}
        for name in who:
            st = self.nodes[name].status()
            out[name] = view_of(st) if st else None
        return out

    def converge(self, expected: View | dict[str, View], timeout_s: float, what: str,
                 who: Iterable[str] | None = None, since: float | None = None) -> float:
        """Seconds (from ``since``, default now) until every node in ``who`` (default:
        every node whose daemon runs and is not stopped) has the expected view -- one for
        all, or one per node name.  Raises ``LabError`` with each view when the bound
        passes."""
        t0 = time.monotonic() if since is None else since
        names = list(who) if who is not None else [
            n.name for n in self.nodes.values() if n.alive()]
        want = expected if isinstance(expected, dict) else {n: expected for n in names}
        deadline = time.monotonic() + timeout_s
        last: dict[str, View | None] = {}
        while True:
            last = self.views(names)
            if all(last[n] == want[n] for n in names):
                return time.monotonic() - t0
            for n in names:
                if not self.nodes[n].alive():
                    raise LabError(f"{n} exited while waiting for {what}:\n"
                                   f"{self.nodes[n].daemon.log()[-3000:]}")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        nm = self.names()
        detail = "\n".join(f"  {n}: {v.show(nm) if v else 'no answer'} (want {want[n].show(nm)})"
                           for n, v in last.items())
        raise LabError(f"views did not converge on {what} within {timeout_s:g} s:\n{detail}")

    # -- faults -----------------------------------------------------------------------------

    def kill9(self, name: str) -> None:
        n = self.nodes[name]
        kids = n.llama_children()
        n.daemon.kill()  # SIGKILL by PID; its llama-server dies with it (PR_SET_PDEATHSIG)
        for pid in kids:
            wait(lambda pid=pid: not pid_alive(pid), 15, f"{name}'s llama-server {pid} gone")

    def sigstop_node(self, name: str) -> list[int]:
        """SIGSTOP meshd and every child it started; returns the PIDs stopped."""
        n = self.nodes[name]
        pids = [n.daemon.pid, *(pid for pid, _ in children_of(n.daemon.pid))]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def sigstop_llama(self, name: str) -> int:
        pids = self.nodes[name].llama_children()
        if len(pids) != 1:
            raise LabError(f"{name}: expected one llama-server child, found {pids}")
        os.kill(pids[0], signal.SIGSTOP)
        return pids[0]

    @staticmethod
    def sigcont(pids: Iterable[int]) -> None:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)

    def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Start a node again from its state (no token: it rejoins the nodes it knew)."""
        n = self.nodes[name]
        if n.alive():
            n.daemon.stop(timeout=20)
        self._start(n)
        wait(lambda: (n.status() or {}).get("node_id"), timeout_s, f"{name} up again", [n])

    def leave(self, name: str) -> int | None:
        """SIGTERM: the node says LEAVING to its peers and exits."""
        return self.nodes[name].daemon.stop(timeout=30)

    def cut(self, x: str, y: str) -> None:
        """Silently drop every packet between nodes ``x`` and ``y`` (both directions of
        both dialling directions), at the hub where the relay sits."""
        a, b = self.nodes[x], self.nodes[y]
        for src, dst in ((a, b), (b, a)):
            # src dialling dst's relay address, and the relay's answers
            self._rule(["INPUT", "-s", src.link_addr, "-d", dst.relay_addr, "-j", "DROP"])
            self._rule(["OUTPUT", "-s", dst.relay_addr, "-d", src.link_addr, "-j", "DROP"])

    def partition(self, left: Iterable[str], right: Iterable[str]) -> None:
        right = list(right)
        for x in left:
            for y in right:
                self.cut(x, y)

    def _rule(self, spec: list[str]) -> None:
        in_netns(self.hub, "iptables", "-A", *spec)
        self.cuts.append(spec)

    def heal(self) -> None:
        for spec in self.cuts:
            in_netns(self.hub, "iptables", "-D", *spec)
        self.cuts.clear()

    def loss(self, p: float | None) -> None:
        """Random loss ``p`` on every node's link (each way); None removes it."""
        for n in self.nodes.values():
            dev = self._dev(n)
            for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
                spec = [chain, flag, dev, "-m", "statistic", "--mode", "random"]
                if p is not None:
                    in_netns(n.netns, "iptables", "-A", *spec, "--probability", str(p), "-j",
                             "DROP")
                else:
                    in_netns(n.netns, "iptables", "-F", chain)
        self.lossy = p is not None

    def _dev(self, n: LabNode) -> str:
        out = subprocess.run(["ip", "-n", n.netns, "-o", "addr", "show", "to", n.link_addr],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[1].split("@")[0]

    def delay(self, on: bool) -> None:
        assert self.relay is not None
        self.relay.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)

    # -- the request driver -----------------------------------------------------------------

    def driver(self, out: Path, stop: Path, *, models: list[str], max_requests: int,
               max_s: float, concurrency: int = 2, request_timeout_s: float = 120.0,
               max_tokens: int = 8) -> subprocess.Popen[str]:
        """``tests/harness/chaosdriver.py`` in the client's namespace, against its API."""
        cl = self.nodes["cl"]
        cmd = ["ip", "netns", "exec", cl.netns, sys.executable, "-m", "tests.harness.chaosdriver",
               "--api", f"{cl.api_url}/v1", "--out", str(out), "--stop", str(stop),
               "--models", ",".join(models), "--max-requests", str(max_requests),
               "--max-s", str(max_s), "--concurrency", str(concurrency),
               "--timeout-s", str(request_timeout_s), "--max-tokens", str(max_tokens)]
        proc = subprocess.Popen(cmd, cwd=ROOT, text=True)
        self.driver_proc, self.outcomes_path = proc, out
        return proc

    # -- llama-server's own record of finished tasks ---------------------------------------

    def finished_tasks(self, name: str) -> int:
        """Tasks llama-server says it finished generating (its ``print_timing`` ... ``total
        time`` line, one per task that ran to its end; a cancelled task has none), in the
        node's log: whether a paused host finished a request after resuming."""
        return sum(1 for line in self.nodes[name].daemon.log().splitlines()
                   if "print_timing" in line and "total time" in line)

    # -- cleaning up ------------------------------------------------------------------------

    def close(self) -> None:
        proc = self.driver_proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for d in self.started:
            if d.proc is not None and d.proc.poll() is None:
                kids = [pid for pid, _ in children_of(d.proc.pid)]
                self.sigcont([d.proc.pid, *kids])
                try:
                    d.stop(timeout=15)
                except ProcessLookupError:
                    pass
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            self.relay.wait(10)
        self.spaces.close()


def wait(cond: Any, timeout_s: float, what: str, nodes: Iterable[LabNode] = (),
         interval_s: float = 0.05) -> Any:
    """Poll ``cond`` until truthy, at most ``timeout_s``; fails at once when one of
    ``nodes`` exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        for n in nodes:
            if not n.alive():
                raise LabError(f"{n.name} exited while waiting for {what}:\n"
                               f"{n.daemon.log()[-3000:]}")
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def read_outcomes(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


__all__ = ["Lab", "LabError", "LabNode", "View", "read_outcomes", "view_of", "wait"]
