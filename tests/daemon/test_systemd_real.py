"""meshd under a real systemd: the Debian packages installed into a booted Debian root.

The root, its overlay and both packages come from ``tests/harness/systemd_machine.py``
(shared with the other real-systemd tests); ``dpkg -i`` inside the booted root runs the
postinst (meshd user, venv, daemon-reload) exactly as on a real machine.  This root
shares the host's network, so the daemon listens on free loopback ports and serves no
model (``test_systemd_package.py`` serves one, in a network namespace of its own).
"""

from __future__ import annotations

import json

import pytest

from tests.harness import systemd_root
from tests.harness.systemd_machine import SOCKET, Machine, booted_machine, build_packages, free_port

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

__all__ = ["Machine", "free_port"]  # where they lived before tests/harness/systemd_machine.py


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
def machine(tmp_path_factory, llama_bin_dir):
    try:
        systemd_root.ensure_rootfs()
    except systemd_root.Unavailable as e:
        pytest.skip(f"no real systemd here: {e}")
    tmp = tmp_path_factory.mktemp("systemd-real")
    debs = build_packages(tmp_path_factory.getbasetemp() / "debs", llama_bin_dir)
    api = f"127.0.0.1:{free_port()}"
    with booted_machine(tmp, debs, api=api) as m:
        assert m.merged is not None
        config = m.merged / "etc" / "meshd.toml"
        config.write_text(_config(int(api.rsplit(":", 1)[1]), free_port()))
        m.ok("chown", "root:meshd", "/etc/meshd.toml")
        m.ok("chmod", "0640", "/etc/meshd.toml")
        yield m


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
