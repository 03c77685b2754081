"""A Debian root with a real systemd for the systemd integration test, made once per machine.

The root is made with ``../shared/recipes/systemd-in-namespace.sh make`` (debootstrap,
about a minute) and cached outside the checkout, so later runs only boot it (seconds).
A lock keeps two test runs from building it at once; the root is built under a
temporary name and renamed into place, so a half-made root is never mistaken for a
finished one.  Run ``python3 tests/systemd_root.py`` to make it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
RECIPE = PROJECT.parent / "shared" / "recipes" / "systemd-in-namespace.sh"
CACHE = Path(os.environ.get("MESHD_TEST_CACHE", "/var/cache/meshd-test"))
ROOTFS = CACHE / "rootfs-bookworm"
# written last by make_rootfs: its presence means the root is complete
MARKER = ".meshd-test-complete"


class Unavailable(Exception):
    """This machine cannot run the recipe (not root, no recipe, no debootstrap)."""


def _ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("debootstrap is missing and there is no apt-get to install it")
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "debootstrap"], check=True, capture_output=True
    )


def check_available() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (debootstrap, unshare, nsenter)")
    if not RECIPE.exists():
        raise Unavailable(f"recipe not found: {RECIPE}")
    for tool in ("unshare", "nsenter", "chroot"):
        if not shutil.which(tool):
            raise Unavailable(f"{tool} is missing (util-linux / coreutils)")


def ensure_rootfs(log=print) -> Path:
    """The cached root, made now when missing or incomplete."""
    check_available()
    if (ROOTFS / MARKER).exists():
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOTFS / MARKER).exists():
            return ROOTFS
        _ensure_debootstrap()
        building = CACHE / f"rootfs-bookworm.building-{os.getpid()}"
        for stale in CACHE.glob("rootfs-bookworm.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if ROOTFS.exists():
            shutil.rmtree(ROOTFS)
        log(f"making Debian root {ROOTFS} with {RECIPE.name} (about a minute)")
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(RECIPE), "make", str(building)], capture_output=True, text=True
        )
        if result.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise RuntimeError(f"making the root failed (exit {result.returncode}):\n{tail}")
        (building / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        building.rename(ROOTFS)
        log(f"made {ROOTFS} in {time.monotonic() - started:.0f} s")
    return ROOTFS


class BootedSystemd:
    """A systemd booted as PID 1 of its own namespaces in ``root``; stop() kills it by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.pid: int | None = None

    def boot(self, timeout_s: float = 60.0) -> int:
        out = subprocess.run(
            ["bash", str(RECIPE), "boot", str(self.root)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if out.returncode != 0:
            raise RuntimeError(f"boot failed: {out.stderr.strip()}")
        self.pid = int(out.stdout.strip().splitlines()[-1])
        return self.pid

    def run(
        self, *cmd: str, timeout_s: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        assert self.pid is not None, "boot() first"
        return subprocess.run(
            ["bash", str(RECIPE), "run", str(self.pid), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=check,
        )

    def wait_running(self, timeout_s: float = 60.0) -> str:
        """Wait until systemd finished booting (running or degraded); returns the state."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", timeout_s=10).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise RuntimeError(f"systemd did not finish booting: {state!r}")

    def stop(self) -> None:
        if self.pid is None:
            return
        subprocess.run(["bash", str(RECIPE), "stop", str(self.pid)], capture_output=True)
        self.pid = None


if __name__ == "__main__":
    try:
        print(ensure_rootfs())
    except Unavailable as e:
        sys.exit(f"systemd_root: {e}")
