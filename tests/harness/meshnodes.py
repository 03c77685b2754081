"""Start N real ``meshd`` daemons as mesh nodes, each with its own config, state dir,
ports and control socket; wait for conditions with bounded polling; stop them by PID.

A node is ``tests.harness.daemon.Meshd`` with no model to serve (``[models] serve = []``),
no console, a fixed ``[node] vram_gb`` (no GPU detection), and the mesh timing the
test asks for.  State is read from the daemon's control socket -- the
``meshctl status --json`` answer, asked in-process (``Node.status_now``) so that
tests can poll it every few milliseconds; ``Node.status()`` runs the real
``meshctl``.  Every process started here is stopped by its own PID in
``Cluster.stop_all``, which also prints the tail of each daemon's log (pytest
shows it when a test fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.daemon import Meshd

TEST_TIMING = dict(heartbeat_s=0.5, heartbeat_timeout_s=1.5, rejoin_s=5.0, verify_timeout_s=0.5)


class NodeError(Exception):
    pass


class Node(Meshd):
    """One meshd that only meshes: ``start(join=[token, ...])`` passes ``--join`` flags."""

    def __init__(self, directory: Path, name: str, *, mesh: dict[str, Any],
                 listen: str | None = None, netns: str | None = None):
        mesh = dict(mesh)
        if listen is not None:
            mesh["listen"] = listen
        super().__init__(directory, {
            "node": {"vram_gb": 8.0},
            "models": {"serve": []},
            "console": {"enabled": False},
            "mesh": mesh,
            "log": {"level": "info"},
        }, name=name, netns=netns)
        self.started_at = 0.0
        self._node_id: str | None = None

    def start(self, *args: str, join: list[str] | None = None, **kw: Any) -> Node:
        flags = [a for token in join or [] for a in ("--join", token)]
        super().start(*flags, *args, **kw)
        self.started_at = time.monotonic()
        return self

    @property
    def listen(self) -> str:
        return self.config["mesh"]["listen"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status_now(self) -> dict[str, Any] | None:
        """The daemon's status (what ``meshctl status --json`` prints), or None when its
        control socket does not answer (not up yet, stopped, frozen)."""
        from meshd.cli.meshctl import Fail

        try:
            return self.control("GET", "/status", timeout=2)
        except Fail:
            return None

    @property
    def node_id(self) -> str:
        if self._node_id is None:
            st = self.status_now()
            if not st:
                raise NodeError(f"{self.name} does not answer on its control socket yet")
            self._node_id = st["node_id"]
        return self._node_id

    def mesh_id(self) -> str | None:
        return (self.status_now() or {}).get("mesh_id")

    def peer_ids(self) -> set[str]:
        st = self.status_now()
        return {p["node_id"] for p in st["peers"]} if st else set()

    def token(self, **body: Any) -> str:
        """An invite token (``ttl_s``, ``once``) from the control socket."""
        from meshd.cli.meshctl import Fail

        try:
            return self.control("POST", "/token", body)["token"]
        except Fail as e:
            raise NodeError(f"{self.name}: no token: {e}") from None

    def log_text(self) -> str:
        return self.log()


class Cluster:
    """Nodes under one temporary directory, all with the same mesh timing."""

    def __init__(self, base: Path, **timing: float):
        self.base = Path(base)
        self.nodes: list[Node] = []
        self.timing = {**TEST_TIMING, **timing}

    def add(self, name: str, *, listen: str | None = None, netns: str | None = None,
            **mesh: Any) -> Node:
        node = Node(self.base / name, name, mesh={**self.timing, **mesh}, listen=listen,
                    netns=netns)
        self.nodes.append(node)
        return node

    def start_chain(self, n: int, *, token_from: Callable[[list[Node]], Node] | None = None,
                    timeout_s: float = 30.0) -> list[Node]:
        """Start ``n`` nodes: the first founds the mesh, each next joins with a token from
        ``token_from(started)`` (default: the previous node, so a chain)."""
        nodes: list[Node] = []
        for i in range(n):
            node = self.add(f"n{len(self.nodes)}")
            if i == 0:
                node.start()
            else:
                issuer = (token_from or (lambda ns: ns[-1]))(nodes)
                node.start(join=[issuer.token()])
            wait_for(lambda node=node: node.mesh_id(), timeout_s, f"{node.name} in a mesh",
                     nodes=[node])
            nodes.append(node)
        return nodes

    def stop_all(self, log_lines: int = 15) -> None:
        for node in self.nodes:
            try:
                node.stop(timeout=10)
            except ProcessLookupError:
                pass
        for node in self.nodes if log_lines > 0 else ():
            tail = node.log_text().splitlines()[-log_lines:]
            print(f"--- {node.name} ({node.dir}), last {len(tail)} log lines")
            print("\n".join(tail))


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02,
             nodes: list[Node] | None = None) -> Any:
    """Poll ``cond`` until truthy, at most ``timeout_s`` (and at most timeout/interval tries).
    Fails at once when one of ``nodes`` has exited."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 1):
        value = cond()
        if value:
            return value
        for node in nodes or ():
            if not node.alive():
                raise NodeError(f"{node.name} exited ({node.proc.returncode if node.proc else '?'})"
                                f" while waiting for {what}:\n{node.log_text()[-3000:]}")
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def full_mesh(nodes: list[Node]) -> bool:
    """Every node lists every other, and only them."""
    try:
        ids = {n.node_id for n in nodes}
    except NodeError:
        return False
    return all(n.peer_ids() == ids - {n.node_id} for n in nodes)


# -- network namespaces (root only) ------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_netns(ns: str, *cmd: str) -> None:
    """Run ``cmd`` inside namespace ``ns`` (e.g. ``iptables ...``); raise when it fails."""
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"in {ns}: {' '.join(cmd)}: {r.stderr.strip() or r.returncode}")


def can_netns() -> str | None:
    """None when this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    probe = f"mt{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', e)}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def have_iptables() -> bool:
    return shutil.which("iptables") is not None


class Namespaces:
    """Network namespaces and veth links created here, and always removed by ``close()``
    (deleting a namespace deletes the veth ends inside it).  Stop the processes running
    in them first."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.names: list[str] = []
        self._links = 0

    def add(self, short: str) -> str:
        name = f"mesh{self.tag}{short}"
        ip("netns", "add", name)
        self.names.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, left: str, left_cidr: str, right: str, right_cidr: str) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed and up; (left dev, right dev)."""
        self._links += 1
        ldev, rdev = f"v{self.tag}{self._links}l", f"v{self.tag}{self._links}r"
        ip("link", "add", ldev, "netns", left, "type", "veth", "peer", "name", rdev,
           "netns", right)
        for ns, dev, cidr in ((left, ldev, left_cidr), (right, rdev, right_cidr)):
            ip("-n", ns, "addr", "add", cidr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        return ldev, rdev

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names.clear()
