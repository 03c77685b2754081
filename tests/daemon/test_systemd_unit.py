"""systemd/meshd.service: systemd-analyze accepts it, and it says what DESIGN.md promises.

``systemd-analyze verify`` checks that ExecStart exists, so the unit is verified in
a small root (``--root``) holding the host's unit directory and the ExecStart and
ExecReload binaries where the package puts them.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meshd.config import ApiConfig, LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "meshd.service"
BUILD_DEB = ROOT / "packaging" / "build-deb.sh"
HOST_UNITS = Path("/usr/lib/systemd/system")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(UNIT)
    return parser


def service() -> configparser.SectionProxy:
    return unit()["Service"]


def exec_paths() -> list[str]:
    return [service()[key].split()[0].lstrip("-@:+!") for key in ("ExecStart", "ExecReload")]


def _need_systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], capture_output=True)
        tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return tool


def _verify(tmp_path: Path, unit_text: str) -> subprocess.CompletedProcess:
    tool = _need_systemd_analyze()
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "bin").mkdir()
    shutil.copytree(HOST_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for path in exec_paths():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text("#!/bin/sh\n")
            target.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "etc" / "systemd" / "system" / "meshd.service").write_text(unit_text)
    return subprocess.run(
        [tool, "verify", f"--root={root}", "meshd.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(tmp_path):
    result = _verify(tmp_path, UNIT.read_text())
    assert result.returncode == 0, result.stderr
    # unknown keys and bad values are only warnings (exit 0): none allowed either
    assert "meshd.service" not in result.stderr, result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a value is reported."""
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy")
    result = _verify(tmp_path, broken)
    assert "Type" in result.stderr or "type" in result.stderr


def test_unit_is_type_notify_with_watchdog():
    s = service()
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0


def test_unit_runs_as_meshd_with_its_directories():
    s = service()
    assert (s["User"], s["Group"]) == ("meshd", "meshd")
    for key in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert s[key] == "meshd"


def test_runtime_directory_holds_the_default_control_socket():
    from meshd.config import NodeConfig

    assert Path(NodeConfig().control_socket).parent == Path("/run") / service()["RuntimeDirectory"]


def test_state_directory_holds_the_default_state_and_models():
    from meshd.config import NodeConfig

    state = Path("/var/lib") / service()["StateDirectory"]
    assert Path(NodeConfig().state_dir) == state
    assert state in Path(NodeConfig().models_dir).parents


def test_a_join_token_that_does_not_parse_is_not_restarted_in_a_loop():
    from meshd.cli.meshd import EXIT_BAD_TOKEN

    s = service()
    assert s["Restart"] == "on-failure"
    assert str(EXIT_BAD_TOKEN) in s["RestartPreventExitStatus"].split()


def test_reload_is_a_synchronous_meshctl_reload():
    # not `kill -HUP`: systemctl reload must return once the reload is applied (and fail
    # when the file is broken); systemd 252 has no Type=notify-reload to wait for it
    assert service()["ExecReload"] == "/usr/bin/meshctl reload"
    assert service()["Type"] == "notify"


def test_stop_timeout_covers_drain_and_llama_stop():
    s = service()
    assert s["KillMode"] == "mixed"
    assert float(s["TimeoutStopSec"]) > ApiConfig().drain_s + LlamaConfig().stop_timeout_s


def test_unit_is_hardened_but_keeps_gpu_devices_reachable():
    s = service()
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "LockPersonality",
    ):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict"
    assert set(s["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert s.get("PrivateDevices", "no") == "no"
    assert "DevicePolicy" not in s and "DeviceAllow" not in s


def test_exec_start_is_where_the_package_puts_meshd():
    text = BUILD_DEB.read_text()
    assert service()["ExecStart"].split()[0] == "/usr/bin/meshd"
    assert '"$pkg/usr/bin/meshd"' in text
    assert '"$pkg/lib/systemd/system/meshd.service"' in text
