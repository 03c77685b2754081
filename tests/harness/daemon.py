"""Run real ``meshd`` processes in tests: each with its own config, state dir and ports.

Every process is started by this module and ended by its PID; every wait is
bounded.  The log of each daemon is kept in its directory and printed when a
wait fails, so a red test says what the daemon said.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import toml

from tests.conftest import ROOT, free_port


class Meshd:
    def __init__(
        self,
        directory: Path,
        config: dict[str, Any] | None = None,
        *,
        name: str = "node",
        netns: str | None = None,
    ):
        """``netns``: run the daemon inside that network namespace (``ip netns exec``;
        the process keeps its PID).  Its control socket is a path, reachable from here."""
        self.dir = Path(directory)
        self.netns = netns
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.api_port = free_port()
        self.mesh_port = free_port()
        self.socket = str(self.dir / "control.sock")
        base: dict[str, Any] = {
            "node": {
                "name": name,  # log lines and status read "peer n1 (<id>)"
                "state_dir": str(self.dir / "state"),
                "models_dir": str(self.dir / "models"),
                "control_socket": self.socket,
                "vram_gb": 8.0,
            },
            "mesh": {"listen": f"127.0.0.1:{self.mesh_port}"},
            "api": {"listen": f"127.0.0.1:{self.api_port}", "drain_s": 10.0},
            "console": {"enabled": False},
            "log": {"level": "debug"},
        }
        for section, values in (config or {}).items():
            base.setdefault(section, {}).update(values)
        self.config = base
        self.config_path = self.dir / "meshd.toml"
        self.log_path = self.dir / "meshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, *args: str, env: dict[str, str] | None = None) -> Meshd:
        self.config_path.write_text(toml.dumps(self.config))
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        # MESHD_PROFILE_DIR=DIR: each daemon runs under cProfile, into DIR/NAME.prof
        prof = os.environ.get("MESHD_PROFILE_DIR")
        profile = ["-m", "cProfile", "-o", f"{prof}/{self.name}.prof"] if prof else []
        cmd = [sys.executable, *profile, "-m", "meshd.cli.meshd", "--config", str(self.config_path),
               *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=default_signal_handling,
        )
        where = f" in netns {self.netns}" if self.netns else ""
        print(f"started meshd {self.name} pid {self.proc.pid} api {self.api}{where}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctl(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [sys.executable, "-m", "meshd.cli.meshctl", "--socket", self.socket, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} -> {r.returncode}: {r.stderr}{r.stdout}")
        return r

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)

    def control(self, method: str, endpoint: str, body: dict | None = None, timeout: float = 10):
        """One control-socket request made in this process (meshctl's own client, without
        starting a meshctl process: cheap enough to poll); raises meshctl's ``Fail``."""
        from meshd.cli import meshctl

        return meshctl.request(self.socket, method, endpoint, body, timeout_s=timeout)

    def wait_for(self, predicate, what: str, timeout: float = 120.0, interval: float = 0.1):
        """Poll ``predicate(self)`` until it returns something truthy; bounded."""
        deadline = time.monotonic() + timeout
        last_exc = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"meshd {self.name} exited ({self.proc.returncode}) while waiting for {what}\n"
                    + self.log()[-4000:]
                )
            try:
                value = predicate(self)
                if value:
                    return value
            except Exception as e:  # not up yet
                last_exc = e
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc})\n"
            + self.log()[-4000:]
        )

    def wait_running(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for(
            lambda n: (s := n.status())["state"] == "running" and s, "control socket", timeout
        )

    def wait_model_warm(self, model: str, timeout: float = 180.0) -> dict[str, Any]:
        def warm(n):
            s = n.status()
            return any(m["name"] == model and m["state"] == "warm" for m in s["models"]) and s

        return self.wait_for(warm, f"model {model} warm", timeout)

    def wait_serving_warm(self, model: str, timeout: float = 180.0) -> dict[str, Any]:
        """``model`` warm on this node's own llama-server (``wait_model_warm`` is satisfied
        by any host of the mesh: a second node serving a model the first already serves
        would pass it before its own llama-server is up)."""

        def warm(n):
            s = n.status()
            return any(m["name"] == model and s["node_id"] in m["hosts"]
                       and (m.get("local") or m)["state"] == "warm" for m in s["models"]) and s

        return self.wait_for(warm, f"model {model} warm on {self.name}", timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit status once the daemon exits; on a timeout, fails with its log's tail
        (what it was still waiting for)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"meshd {self.name} did not exit within {timeout:.0f} s\n"
                                 + self.log()[-4000:]) from None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot take SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()


def default_signal_handling() -> None:
    """In the child before exec: SIGINT and SIGQUIT as a foreground program gets them.

    A test suite started in the background by a non-interactive shell (``cmd &``,
    ``nohup``) inherits SIGINT ignored, and Twisted, like Python, leaves an ignored
    SIGINT ignored: a test of Ctrl-C would then wait for a stop that never comes.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def fake_llama_bin_dir(base: Path, *flags: str) -> str:
    """A ``[llama] bin_dir`` whose ``llama-server`` is ``tests/harness/fakebackend.py`` with ``flags``.

    The fake accepts llama-server's own flags, so the daemon runs it unchanged:
    tests about routing, the mesh or downloads stay light.
    """
    d = Path(base) / "fakebin"
    d.mkdir(parents=True, exist_ok=True)
    script = d / "llama-server"
    extra = "".join(f" {shlex.quote(f)}" for f in flags)
    script.write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests/harness/fakebackend.py"}{extra} "$@"\n'
    )
    script.chmod(0o755)
    return str(d)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the processes whose parent is ``pid`` (a meshd's llama-servers and
    rpc-servers, say)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out.append((int(entry), comm))
    return out


def port_open(port: int, timeout_s: float) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
