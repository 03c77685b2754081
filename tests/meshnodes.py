"""Start N mesh nodes as real processes, each with its own state dir and port; wait for
conditions with bounded polling; stop them by PID.

Nodes run ``python -m meshd.mesh`` (the mesh alone, no models or API) and report
through a status file rewritten on every membership change and a UNIX control
socket (one JSON command per line).  Every process started here is stopped by
its own PID in ``Cluster.stop_all`` (and its state kept for the test to read).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class NodeError(Exception):
    pass


@dataclass
class Node:
    name: str
    dir: Path
    listen: str
    heartbeat_s: float
    heartbeat_timeout_s: float
    rejoin_s: float
    verify_timeout_s: float
    proc: subprocess.Popen | None = None
    netns: str | None = None
    extra_mesh: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def config_path(self) -> Path:
        return self.dir / "meshd.toml"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def control_path(self) -> Path:
        return self.dir / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "node.log"

    def write_config(self, join: list[str] | None = None) -> None:
        mesh = {
            "listen": self.listen,
            "heartbeat_s": self.heartbeat_s,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "rejoin_s": self.rejoin_s,
            "verify_timeout_s": self.verify_timeout_s,
            "join": join or [],
            **self.extra_mesh,
        }
        lines = ["[node]", f'state_dir = "{self.dir / "state"}"', "", "[mesh]"]
        for k, v in mesh.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines += ["", "[log]", 'level = "info"', ""]
        self.config_path.write_text("\n".join(lines))

    def start(self, join: list[str] | None = None) -> None:
        self.write_config(join)
        self.status_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "meshd.mesh", "--config", str(self.config_path),
               "--status-file", str(self.status_path), "--control", str(self.control_path)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        self.started_at = time.monotonic()
        print(f"started {self.name} pid {self.proc.pid} ({self.dir})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def node_id(self) -> str:
        st = self.status()
        if not st:
            raise NodeError(f"{self.name} has written no status yet")
        return st["node_id"]

    def peer_ids(self) -> set[str]:
        st = self.status()
        return {p["node_id"] for p in st["peers"]} if st else set()

    def command(self, cmd: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(self.control_path))
            s.sendall(json.dumps(cmd).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def token(self, **kw: Any) -> str:
        answer = self.command({"cmd": "token", **kw})
        if "ok" not in answer:
            raise NodeError(f"{self.name}: token refused: {answer}")
        return answer["ok"]["token"]

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Cluster:
    """N nodes under one temporary directory."""

    def __init__(self, base: Path, *, heartbeat_s: float = 0.5, heartbeat_timeout_s: float = 1.5,
                 rejoin_s: float = 5.0, verify_timeout_s: float = 0.5):
        self.base = base
        self.nodes: list[Node] = []
        self.timing = dict(heartbeat_s=heartbeat_s, heartbeat_timeout_s=heartbeat_timeout_s,
                           rejoin_s=rejoin_s, verify_timeout_s=verify_timeout_s)

    def add(self, name: str, *, listen: str = "127.0.0.1:0", netns: str | None = None,
            **mesh: Any) -> Node:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        node = Node(name, d, listen, netns=netns, extra_mesh=mesh, **self.timing)
        self.nodes.append(node)
        return node

    def start_chain(self, n: int, *, token_from: Callable[[list[Node]], Node] | None = None,
                    timeout_s: float = 20.0) -> list[Node]:
        """Start ``n`` nodes: the first founds the mesh, each next joins with a token from
        ``token_from(started)`` (default: the previous node)."""
        nodes = []
        for i in range(n):
            node = self.add(f"n{i}")
            if i == 0:
                node.start()
                wait_for(lambda node=node: node.status() is not None, timeout_s, f"{node.name} up")
            else:
                issuer = (token_from or (lambda ns: ns[-1]))(nodes)
                node.start(join=[issuer.token()])
                wait_for(lambda node=node: (node.status() or {}).get("mesh_id") is not None,
                         timeout_s, f"{node.name} joined")
            nodes.append(node)
        return nodes

    def stop_all(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except ProcessLookupError:
                pass


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Poll ``cond`` until truthy, at most ``timeout_s`` (and at most timeout/interval tries)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 1):
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def full_mesh(nodes: list[Node]) -> bool:
    try:
        ids = {n.node_id for n in nodes}
    except NodeError:
        return False
    return all(n.peer_ids() == ids - {n.node_id} for n in nodes)
