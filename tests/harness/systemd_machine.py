"""A booted Debian root with meshd's packages installed, as the real-systemd tests see it.

Shared by the tests under a real systemd (``tests/daemon/test_systemd_*.py``). The root
(``systemd_root``, cached in /var/cache/meshd-test) is never changed: each machine mounts
an overlay on it, so the packages, the config and the journal land in a temporary upper
directory that is thrown away afterwards. ``packaging/build-deb.sh`` and
``packaging/build-llama-deb.sh`` build the two .debs once per test run (dependency
wheels cached beside the root; llama.cpp from scripts/build-llama.sh's cache, never
compiled again when it is there); ``dpkg -i`` inside the booted root runs their
maintainer scripts exactly as on a real machine.

``booted_machine(tmp, net=True)`` gives the root a network namespace of its own, so the
shipped config's fixed ports (API 127.0.0.1:9337, console 3131, mesh 7842) cannot collide
with anything on the host; :func:`in_netns` runs test code (the ``openai`` SDK) on a
thread that has entered it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tests.harness import systemd_root

PROJECT = Path(__file__).resolve().parents[2]
SOCKET = "/run/meshd/control.sock"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """The booted root, as the tests see it."""

    def __init__(self, booted: systemd_root.BootedSystemd, api: str, merged: Path | None = None):
        self.booted = booted
        self.api = api
        # the root's files as the host sees them (the overlay's merged directory)
        self.merged = merged

    def sh(self, *cmd: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return self.booted.run(*cmd, timeout_s=timeout_s)

    def ok(self, *cmd: str, timeout_s: float = 120) -> str:
        r = self.sh(*cmd, timeout_s=timeout_s)
        assert r.returncode == 0, f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        return r.stdout

    def show(self, *props: str) -> dict[str, str]:
        args = [arg for p in props for arg in ("-p", p)]
        out = self.ok("systemctl", "show", *args, "meshd.service")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_state(self, wanted: str, timeout_s: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            props = self.show("ActiveState", "SubState", "Result", "ExecMainStatus", "MainPID")
            if props["ActiveState"] == wanted or time.monotonic() > deadline:
                return props
            time.sleep(0.3)

    def ensure_started(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.ok("systemctl", "start", "meshd.service", timeout_s=120)

    def journal(self) -> str:
        return self.ok("journalctl", "-u", "meshd.service", "--no-pager", "-o", "cat")

    def in_netns(self, fn: Callable[[], T], timeout_s: float = 120) -> T:
        """``fn()`` on a thread inside the root's network namespace (see :func:`in_netns`)."""
        assert self.booted.pid is not None, "not booted"
        return in_netns(self.booted.pid, fn, timeout_s=timeout_s)


def in_netns(pid: int, fn: Callable[[], T], timeout_s: float = 120) -> T:
    """Run ``fn()`` on a new thread that entered ``pid``'s network namespace; its result.

    setns(2) moves only the calling thread, so the test process stays where it is while
    the sockets ``fn`` opens (an ``openai`` client's) live in the namespace, where
    127.0.0.1 is the root's loopback. Bounded: a ``fn`` still running after ``timeout_s``
    fails the test (the thread is a daemon thread and dies with the process).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into PID {pid}'s network namespace")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    thread = threading.Thread(target=enter_and_run, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"code in PID {pid}'s network namespace still running after {timeout_s} s")
    if error:
        raise error[0]
    return result[0]


def _mount_overlay(lower: Path, tmp: Path) -> Path:
    upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    return merged


def _unmount(merged: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(merged)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", str(merged)], capture_output=True)


# built once per test run: both packages, then reused by every module that boots a root
_built: dict[str, Path] = {}


def build_packages(dist: Path, llama_bin_dir: str) -> dict[str, Path]:
    """``{"meshd": .deb, "llama": .deb}``: the meshd package and its llama.cpp companion.

    ``llama_bin_dir`` is scripts/build-llama.sh's portable CPU build (the suite's
    ``llama_bin_dir`` fixture), packaged as it is: no second compile.
    """
    if _built and all(p.exists() for p in _built.values()):
        return dict(_built)
    dist.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WHEELHOUSE=str(systemd_root.CACHE / "wheelhouse"))
    for key, script, extra in (
        ("meshd", "build-deb.sh", {}),
        ("llama", "build-llama-deb.sh", {"LLAMA_BIN_DIR": llama_bin_dir, "LLAMA_VARIANT": "cpu"}),
    ):
        build = subprocess.run(
            ["bash", str(PROJECT / "packaging" / script), str(dist)],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=600,
        )
        assert build.returncode == 0, f"{script} failed:\n{build.stderr[-3000:]}"
        _built[key] = Path(build.stdout.strip().splitlines()[-1])
    return dict(_built)


@contextlib.contextmanager
def booted_machine(
    tmp: Path, debs: dict[str, Path], *, api: str, net: bool = False
) -> Iterator[Machine]:
    """A fresh overlay on the cached root, systemd booted in it, both .debs installed.

    ``net``: a network namespace of the root's own (only its loopback); without it the
    root shares the host's network and the config must use free ports.
    """
    rootfs = systemd_root.ensure_rootfs()
    merged = _mount_overlay(rootfs, tmp)
    booted = systemd_root.BootedSystemd(merged)
    try:
        for key, deb in debs.items():
            shutil.copy(deb, merged / "var" / "tmp" / f"{key}.deb")
        print(f"booting systemd in {merged}")
        pid = booted.boot(net=net)
        print(f"systemd is PID {pid} (outside)")
        booted.wait_running()
        m = Machine(booted, api, merged)
        # both in one dpkg run, as `apt install ./meshd-llama-cpp_*.deb ./meshd_*.deb` does
        m.ok("dpkg", "-i", *(f"/var/tmp/{key}.deb" for key in debs), timeout_s=300)
        yield m
    finally:
        if booted.pid is not None:
            print(f"stopping systemd PID {booted.pid}")
        booted.stop()
        _unmount(merged)
