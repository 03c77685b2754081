"""A Debian root with a real systemd for the systemd integration test, made once per machine.

The root is made with ``../shared/recipes/systemd-in-namespace.sh make`` (debootstrap,
about a minute) and cached outside the checkout, so later runs only boot it (seconds).
A lock keeps two test runs from building it at once; the root is built under a
temporary name and renamed into place, so a half-made root is never mistaken for a
finished one.  Run ``python3 tests/harness/systemd_root.py`` to make it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
RECIPE = PROJECT.parent / "shared" / "recipes" / "systemd-in-namespace.sh"
CACHE = Path(os.environ.get("MESHD_TEST_CACHE", "/var/cache/meshd-test"))
ROOTFS = CACHE / "rootfs-bookworm"
# written last by make_rootfs: its presence means the root is complete
MARKER = ".meshd-test-complete"
# what the recipe's root lacks and the package needs (procps: /bin/kill for ExecReload)
EXTRA_PACKAGES = ("procps",)
CLEAN_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


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
    if _complete(ROOTFS):
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(ROOTFS):
            return ROOTFS
        if (ROOTFS / MARKER).exists():
            # made by an older version of this helper: add what is missing
            _install_extras(ROOTFS)
            _mark(ROOTFS)
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
        _install_extras(building)
        _mark(building)
        building.rename(ROOTFS)
        log(f"made {ROOTFS} in {time.monotonic() - started:.0f} s")
    return ROOTFS


def _complete(root: Path) -> bool:
    try:
        text = (root / MARKER).read_text()
    except OSError:
        return False
    return f"extras: {' '.join(EXTRA_PACKAGES)}" in text


def _mark(root: Path) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    (root / MARKER).write_text(f"made: {stamp}\nextras: {' '.join(EXTRA_PACKAGES)}\n")


def _install_extras(root: Path) -> None:
    """apt-get install EXTRA_PACKAGES in a chroot, from the lists debootstrap left."""
    env = ["env", "-i", *CLEAN_ENV, "DEBIAN_FRONTEND=noninteractive"]
    cmd = ["chroot", str(root), *env, "apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    result = subprocess.run([*cmd, *EXTRA_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["chroot", str(root), *env, "apt-get", "update", "-qq"], capture_output=True)
        result = subprocess.run([*cmd, *EXTRA_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-10:])
        raise RuntimeError(f"installing {', '.join(EXTRA_PACKAGES)} into {root} failed:\n{tail}")


class BootedSystemd:
    """A systemd booted as PID 1 of its own namespaces in ``root``; stop() kills it by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.pid: int | None = None

    def boot(self, timeout_s: float = 60.0) -> int:
        # a namespace has no consoles: without this mask boot waits 90 s for /dev/ttyS0
        mask = self.root / "etc" / "systemd" / "system" / "getty.target"
        if not mask.is_symlink():
            mask.symlink_to("/dev/null")
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
        # a clean environment: the host's PATH, PYTHONPATH or MESHD_CONFIG mean nothing inside
        return subprocess.run(
            ["bash", str(RECIPE), "run", str(self.pid), "env", "-i", *CLEAN_ENV, *cmd],
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
