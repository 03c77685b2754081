"""meshd under a real systemd: the Debian package installed into a booted Debian root.

The root (``tests/harness/systemd_root.py``, cached in /var/cache/meshd-test) is never
changed: each run mounts an overlay on it, so the package, the config and the
journal land in a temporary upper directory that is thrown away afterwards.
``packaging/build-deb.sh`` builds the .deb (dependency wheels cached beside the
root); ``dpkg -i`` inside the booted root runs its postinst (meshd user, venv,
daemon-reload) exactly as on a real machine.  The booted systemd shares the host's
network, so the daemon listens on free loopback ports and serves no model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import systemd_root

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

PROJECT = Path(__file__).resolve().parents[2]
SOCKET = "/run/meshd/control.sock"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """The booted root, as the tests see it."""

    def __init__(self, booted: systemd_root.BootedSystemd, api: str):
        self.booted = booted
        self.api = api

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


def _mount_overlay(lower: Path, tmp: Path) -> Path:
    upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    return merged


def _config(api_port: int, mesh_port: int) -> str:
    return f"""\
# written by tests/daemon/test_systemd_real.py: no model, free loopback ports
[node]
vram_gb = 1
[mesh]
listen = "127.0.0.1:{mesh_port}"
[api]
listen = "127.0.0.1:{api_port}"
drain_s = 2
[console]
enabled = false
[models]
serve = []
"""


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    try:
        rootfs = systemd_root.ensure_rootfs()
    except systemd_root.Unavailable as e:
        pytest.skip(f"no real systemd here: {e}")
    tmp = tmp_path_factory.mktemp("systemd-real")
    env = dict(os.environ, WHEELHOUSE=str(systemd_root.CACHE / "wheelhouse"))
    build = subprocess.run(
        ["bash", str(PROJECT / "packaging" / "build-deb.sh"), str(tmp / "dist")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert build.returncode == 0, f"build-deb.sh failed:\n{build.stderr[-3000:]}"
    deb = Path(build.stdout.strip().splitlines()[-1])

    merged = _mount_overlay(rootfs, tmp)
    booted = systemd_root.BootedSystemd(merged)
    try:
        shutil.copy(deb, merged / "var" / "tmp" / "meshd.deb")
        print(f"booting systemd in {merged}")
        pid = booted.boot()
        print(f"systemd is PID {pid} (outside)")
        booted.wait_running()
        api = f"127.0.0.1:{free_port()}"
        m = Machine(booted, api)
        m.ok("dpkg", "-i", "/var/tmp/meshd.deb", timeout_s=300)
        config = merged / "etc" / "meshd.toml"
        config.write_text(_config(int(api.rsplit(":", 1)[1]), free_port()))
        m.ok("chown", "root:meshd", "/etc/meshd.toml")
        m.ok("chmod", "0640", "/etc/meshd.toml")
        yield m
    finally:
        if booted.pid is not None:
            print(f"stopping systemd PID {booted.pid}")
        booted.stop()
        for _ in range(50):
            if subprocess.run(["umount", str(merged)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True)


def test_package_creates_the_meshd_user_and_installs_meshctl(machine):
    assert machine.ok("id", "-un", "meshd").strip() == "meshd"
    assert "--socket PATH" in machine.ok("meshctl", "--help")
    assert "Type=notify" in machine.ok("systemctl", "cat", "meshd.service")


def test_systemctl_start_reaches_active_running(machine):
    machine.ok("systemctl", "start", "meshd.service", timeout_s=120)
    props = machine.wait_state("active")
    # Type=notify: start returns, and the unit is running, only after READY=1
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props


def test_status_text_comes_from_sd_notify(machine):
    machine.ensure_started()
    assert machine.show("StatusText")["StatusText"].strip()


def test_daemon_runs_as_the_meshd_user(machine):
    machine.ensure_started()
    pid = machine.show("MainPID")["MainPID"]
    status = machine.ok("cat", f"/proc/{pid}/status")
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid == machine.ok("id", "-u", "meshd").strip()


def test_meshctl_status_json_shows_the_node(machine):
    machine.ensure_started()
    status = json.loads(machine.ok("meshctl", "status", "--json"))
    assert status["node_id"]
    assert status["role"] == "idle"
    assert status["serving"] is None
    assert status["api"] == machine.api
    assert status["peers"] == []


def test_control_socket_is_0660_group_meshd(machine):
    machine.ensure_started()
    assert machine.ok("stat", "-c", "%a %G", SOCKET).split() == ["660", "meshd"]


def test_systemctl_reload_keeps_the_same_process_running(machine):
    machine.ensure_started()
    before = machine.show("MainPID")["MainPID"]
    machine.ok("systemctl", "reload", "meshd.service")
    props = machine.wait_state("active")
    assert props["ActiveState"] == "active"
    assert props["MainPID"] == before


def test_systemctl_stop_exits_cleanly_and_removes_the_socket(machine):
    machine.ensure_started()
    machine.ok("systemctl", "stop", "meshd.service", timeout_s=120)
    props = machine.wait_state("inactive")
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    assert machine.sh("test", "-e", SOCKET).returncode != 0


def test_meshctl_leave_stops_the_service_cleanly(machine):
    machine.ensure_started()
    out = machine.ok("meshctl", "leave")
    assert "left the mesh" in out
    props = machine.wait_state("inactive")
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == (
        "inactive",
        "success",
        "0",
    ), props


def test_meshctl_without_daemon_names_the_socket_and_exits_1(machine):
    machine.ok("systemctl", "stop", "meshd.service", timeout_s=120)
    r = machine.sh("meshctl", "status")
    assert r.returncode == 1
    assert SOCKET in r.stderr


def test_journal_has_the_daemons_lines(machine):
    journal = machine.journal()
    assert SOCKET in journal, journal[-2000:]
    assert "Traceback" not in journal, journal[-4000:]
