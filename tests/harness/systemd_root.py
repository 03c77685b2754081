"""A Debian root with a real systemd for the systemd integration test, made once per machine.

The harness is the project's own: ``debootstrap`` makes a minimal Debian root (about a
minute, cached outside the checkout so later runs only boot it, in seconds); ``unshare``
gives systemd new PID, mount and UTS namespaces so it runs as PID 1 there without
touching the host's init; ``nsenter`` runs commands inside. Nothing outside the
repository is read.
A lock keeps two test runs from building it at once; the root is built under a
temporary name and renamed into place, so a half-made root is never mistaken for a
finished one.  Run ``python3 tests/harness/systemd_root.py`` to make it ahead of the tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("MESHD_TEST_CACHE", "/var/cache/meshd-test"))
ROOTFS = CACHE / "rootfs-bookworm"
# written last by make_rootfs: its presence means the root is complete
MARKER = ".meshd-test-complete"
SUITE = "bookworm"
# what debootstrap's minbase lacks and the unit and the package need
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
# installed after the root is made (procps: /bin/kill for ExecReload; libgomp1: the
# OpenMP runtime the meshd-llama-cpp package's llama-server links, which minbase lacks,
# so dpkg -i needs no mirror)
EXTRA_PACKAGES = ("procps", "libgomp1")
CLEAN_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


class Unavailable(Exception):
    """This machine cannot boot a systemd root (not root, no unshare/nsenter, no debootstrap)."""


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
        log(f"making Debian root {ROOTFS} with debootstrap (about a minute)")
        started = time.monotonic()
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(building),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
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


def debian_mirror() -> str:
    """The mirror this machine's apt uses (deb822 or one-line sources), so the root is
    made from wherever the host may reach."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[0] == "deb":
                return parts[1] if not parts[1].startswith("[") else parts[2]
    raise Unavailable("no Debian mirror configured in /etc/apt (debootstrap needs one)")


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
        self.net = False
        self._unshare: subprocess.Popen[bytes] | None = None

    def boot(self, timeout_s: float = 60.0, net: bool = False) -> int:
        """Start systemd as PID 1 of new PID, mount and UTS namespaces chrooted in the root.

        ``unshare --fork`` makes systemd its child: PID 1 inside, ``self.pid`` outside.
        The mounts live in the new mount namespace only, so they vanish with it.
        ``net``: a new network namespace too, holding only a loopback (systemd brings it
        up), so fixed ports inside cannot collide with the host's.
        """
        # a namespace has no consoles: without this mask boot waits 90 s for /dev/ttyS0
        mask = self.root / "etc" / "systemd" / "system" / "getty.target"
        if not mask.is_symlink():
            mask.symlink_to("/dev/null")
        root = str(self.root.resolve())
        inside = (
            f"mount --bind {root} {root} && mount -t proc proc {root}/proc"
            f" && mount --rbind /sys {root}/sys && mount -t tmpfs tmpfs {root}/run"
            f" && mount -t tmpfs tmpfs {root}/tmp && mount --rbind /dev {root}/dev"
            f" && exec chroot {root} /lib/systemd/systemd --system --log-target=null"
        )
        self.net = net
        namespaces = ["--pid", "--fork", "--mount", "--uts", *(["--net"] if net else [])]
        self._unshare = subprocess.Popen(
            ["unshare", *namespaces, "bash", "-c", inside],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                err = (
                    self._unshare.stderr.read().decode(errors="replace")
                    if self._unshare.stderr
                    else ""
                )
                raise RuntimeError(f"boot failed (exit {self._unshare.returncode}): {err.strip()}")
            child = _systemd_child(self._unshare.pid)
            if child is not None:
                self.pid = child
                return child
            time.sleep(0.1)
        self._kill_unshare()
        raise RuntimeError(f"systemd did not start within {timeout_s:.0f} s")

    def run(
        self, *cmd: str, timeout_s: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        assert self.pid is not None, "boot() first"
        # a clean environment: the host's PATH, PYTHONPATH or MESHD_CONFIG mean nothing inside
        enter = ["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", *(["-n"] if self.net else [])]
        return subprocess.run(
            [*enter, "env", "-i", *CLEAN_ENV, *cmd],
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
        """Kill the booted systemd (PID 1 of its namespace: everything inside goes with it)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        self._kill_unshare()

    def _kill_unshare(self) -> None:
        if self._unshare is None:
            return
        if self._unshare.poll() is None:
            self._unshare.kill()
        self._unshare.wait(timeout=30)
        if self._unshare.stderr:
            self._unshare.stderr.close()
        self._unshare = None


def _systemd_child(parent: int) -> int | None:
    """The child of ``unshare`` once it has exec'd systemd (before that it is bash)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the parent PID is the 2nd field after the parenthesised command name
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and os.readlink(entry / "exe").endswith("/systemd"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


if __name__ == "__main__":
    try:
        print(ensure_rootfs())
    except Unavailable as e:
        sys.exit(f"systemd_root: {e}")
