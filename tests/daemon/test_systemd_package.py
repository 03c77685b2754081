"""The .debs as an operator meets them, under a real systemd: install, serve, upgrade, remove, purge.

meshd's package and its llama.cpp companion (``packaging/build-llama-deb.sh``, built
from scripts/build-llama.sh's cached portable build) are installed together into a
booted Debian root with a network namespace of its own. The Gemma GGUF goes into
/var/lib/meshd/models, the shipped /etc/meshd.toml gets one line (``[models] serve``: a
node alone in its mesh serves what it is told to, not whatever is on its disk),
``systemctl start meshd``, and the ``openai`` SDK, on a thread of this process that
entered the namespace, streams an answer through the default API address
127.0.0.1:9337. No [llama] bin_dir: meshd finds the companion's binaries where the
package put them.

The tests run in order, as one operator's day: the later ones upgrade, remove and purge
what the first installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.harness import systemd_root
from tests.harness.systemd_machine import Machine, booted_machine, build_packages

pytestmark = [pytest.mark.systemd, pytest.mark.e2e, pytest.mark.timeout(900)]

API = "127.0.0.1:9337"
MODELS = "/var/lib/meshd/models"
# the operator's one change to the shipped config, kept across upgrades
SERVE_LINE = f'serve = ["{DEFAULT_MODEL_NAME}"]'
SHIPPED_LINE = "# a line the next version of the package ships"


@pytest.fixture(scope="module")
def machine(tmp_path_factory, llama_bin_dir, gemma_model_path):
    try:
        systemd_root.ensure_rootfs()
    except systemd_root.Unavailable as e:
        pytest.skip(f"no real systemd here: {e}")
    tmp = tmp_path_factory.mktemp("systemd-package")
    debs = build_packages(tmp_path_factory.getbasetemp() / "debs", llama_bin_dir)
    with booted_machine(tmp, debs, api=API, net=True) as m:
        m.debs = debs  # type: ignore[attr-defined]
        m.tmp = tmp  # type: ignore[attr-defined]
        m.model_path = gemma_model_path  # type: ignore[attr-defined]
        yield m


def status(machine: Machine) -> dict:
    return json.loads(machine.ok("meshctl", "status", "--json"))


def wait_warm(machine: Machine, model: str, timeout_s: float = 240) -> dict:
    """The node's status once ``model`` is warm (loaded and answering)."""
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        r = machine.sh("meshctl", "status", "--json", timeout_s=30)
        if r.returncode == 0:
            last = json.loads(r.stdout)
            if any(m["name"] == model and m["state"] == "warm" for m in last["models"]):
                return last
        time.sleep(0.5)
    raise AssertionError(
        f"{model} not warm after {timeout_s:.0f} s: {json.dumps(last)[:2000]}\n"
        f"{machine.journal()[-4000:]}"
    )


def streamed_answer(machine: Machine, model: str) -> list[str]:
    """The content deltas of one streamed chat completion through :9337, from the SDK."""

    def ask() -> list[str]:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://{API}/v1", api_key="unused", timeout=120, max_retries=0)
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
            stream=True,
        )
        return [c.choices[0].delta.content or "" for c in stream if c.choices]

    return machine.in_netns(ask, timeout_s=180)


def next_version(deb: Path, out: Path) -> tuple[Path, str]:
    """The meshd package again as its next version: a higher version, a changed conffile."""
    tree = out / "next"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("Version:"))
    upgraded = f"{version}+next1"
    control.write_text(text.replace(f"Version: {version}\n", f"Version: {upgraded}\n"))
    with open(tree / "etc" / "meshd.toml", "a") as f:
        f.write(f"\n{SHIPPED_LINE}\n")
    built = out / f"meshd_{upgraded}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(built)],
        check=True,
        capture_output=True,
    )
    return built, upgraded


def test_both_packages_install_and_meshd_finds_llama_cpp_without_configuration(machine):
    out = machine.ok("dpkg-query", "-W", "-f", "${Package} ${Status}\\n", "meshd", "meshd-llama-cpp")
    assert out.splitlines() == [
        "meshd install ok installed",
        "meshd-llama-cpp install ok installed",
    ], out
    for exe in ("llama-server", "ggml-rpc-server"):
        machine.ok("test", "-x", f"/usr/lib/meshd/llama.cpp/bin/{exe}")
    # the shipped config sets no [llama] bin_dir
    assert "\nbin_dir" not in machine.ok("cat", "/etc/meshd.toml")
    # meshd's Depends names the companion
    assert "meshd-llama-cpp" in machine.ok("dpkg-query", "-W", "-f", "${Depends}", "meshd")


def test_systemctl_start_serves_the_model_in_the_models_directory(machine):
    machine.ok("install", "-d", "-o", "meshd", "-g", "meshd", "-m", "0750", "/var/lib/meshd", MODELS)
    target = machine.merged / MODELS.lstrip("/") / f"{DEFAULT_MODEL_NAME}.gguf"
    shutil.copyfile(machine.model_path, target)
    machine.ok("chown", "meshd:meshd", f"{MODELS}/{DEFAULT_MODEL_NAME}.gguf")
    config = machine.merged / "etc" / "meshd.toml"
    shipped = config.read_text()
    assert "\n#serve = []\n" in shipped
    config.write_text(shipped.replace("\n#serve = []\n", f"\n{SERVE_LINE}\n", 1))
    machine.ok("systemctl", "start", "meshd.service", timeout_s=120)
    s = wait_warm(machine, DEFAULT_MODEL_NAME)
    assert s["api"] == API
    backend = next(m for m in s["models"] if m["name"] == DEFAULT_MODEL_NAME)["backend"]
    # the companion's llama-server, running as meshd under the unit
    cmdline = machine.ok("cat", f"/proc/{backend['pid']}/cmdline").split("\0")
    assert "/usr/lib/meshd/llama.cpp/bin/llama-server" in cmdline[:3], cmdline


def test_the_openai_sdk_gets_a_streamed_answer_through_9337(machine):
    deltas = streamed_answer(machine, DEFAULT_MODEL_NAME)
    assert len([d for d in deltas if d]) >= 2, deltas
    assert "".join(deltas).strip()


def test_upgrade_keeps_the_changed_conffile_and_the_node(machine):
    before = status(machine)
    pid_before = machine.show("MainPID")["MainPID"]
    # the operator changed the conffile (SERVE_LINE), and the next version changes it too
    deb, version = next_version(machine.debs["meshd"], machine.tmp)
    shutil.copy(deb, machine.merged / "var" / "tmp" / "meshd-next.deb")
    # what `apt-get -o Dpkg::Options::=--force-confold upgrade` does: keep the operator's file
    machine.ok("dpkg", "-i", "--force-confold", "/var/tmp/meshd-next.deb", timeout_s=300)

    assert machine.ok("dpkg-query", "-W", "-f", "${Version}", "meshd") == version
    kept = machine.ok("cat", "/etc/meshd.toml")
    assert SERVE_LINE in kept and SHIPPED_LINE not in kept
    assert SHIPPED_LINE in machine.ok("cat", "/etc/meshd.toml.dpkg-dist")
    # postinst restarted the running daemon on the new venv: same node, serving again
    props = machine.wait_state("active")
    assert props["ActiveState"] == "active" and props["MainPID"] != pid_before, props
    after = wait_warm(machine, DEFAULT_MODEL_NAME)
    assert after["node_id"] == before["node_id"]
    assert "".join(streamed_answer(machine, DEFAULT_MODEL_NAME)).strip()


def test_remove_stops_meshd_and_keeps_its_state(machine):
    node_id = status(machine)["node_id"]
    machine.ok("dpkg", "-r", "meshd", timeout_s=180)
    assert machine.sh("test", "-e", "/usr/bin/meshd").returncode != 0
    assert machine.sh("test", "-e", "/opt/meshd/venv").returncode != 0
    assert machine.sh("systemctl", "is-active", "meshd.service").stdout.strip() != "active"
    assert machine.sh("pgrep", "-u", "meshd").returncode == 1, "a meshd process outlived remove"
    # state kept: the node's identity, its models, the operator's config, the user
    assert machine.ok("cat", "/var/lib/meshd/node_id").strip() == node_id
    machine.ok("test", "-f", f"{MODELS}/{DEFAULT_MODEL_NAME}.gguf")
    assert SERVE_LINE in machine.ok("cat", "/etc/meshd.toml")
    assert machine.ok("id", "-un", "meshd").strip() == "meshd"
    # the companion is a package of its own: still there until removed itself
    machine.ok("test", "-x", "/usr/lib/meshd/llama.cpp/bin/llama-server")
    machine.ok("dpkg", "-r", "meshd-llama-cpp", timeout_s=120)
    assert machine.sh("test", "-e", "/usr/lib/meshd/llama.cpp").returncode != 0


def test_purge_removes_the_state(machine):
    machine.ok("dpkg", "-P", "meshd", timeout_s=180)
    for gone in ("/var/lib/meshd", "/var/cache/meshd", "/etc/meshd.toml",
                 "/etc/meshd.toml.dpkg-dist", "/opt/meshd"):
        assert machine.sh("test", "-e", gone).returncode != 0, f"{gone} outlived purge"
    # dpkg forgets a purged package
    assert machine.sh("dpkg", "-s", "meshd").returncode == 1
