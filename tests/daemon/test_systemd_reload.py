"""``systemctl reload meshd`` under a real systemd, while a stream runs through the daemon.

The Debian package is installed into the project's booted Debian root (the same
harness, overlay and packages as ``test_systemd_real.py``: ``tests/harness/systemd_machine.py``).  The
node serves a real model file through a fake llama-server (``tests/harness/fakebackend.py``,
copied into the root; it needs only the root's python3) that streams slowly, so a
chat stream from this test through the daemon's API on loopback is open across
every reload: it must arrive whole, and keep arriving after the last reload.  The
reloads change the log level, add a drop-in policy plugin with settings, and change
a key that needs a restart; then a broken plugin file must change nothing, and
``systemctl reload`` must fail saying why.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from pathlib import Path

import pytest
import toml

from tests.harness import systemd_root
from tests.harness.localhub import gguf_bytes
from tests.harness.systemd_machine import (
    PROJECT,
    Machine,
    booted_machine,
    build_packages,
    free_port,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

MODEL = "/srv/meshd-test/tiny.gguf"
FAKE = "/opt/fakellama"
# the stream: CHUNKS chunks CHUNK_MS apart (30 s), longer than every reload below takes
CHUNKS = 300
CHUNK_MS = 100
PLUGIN = """\
import pluggy

hookimpl = pluggy.HookimplMarker("meshd")


@hookimpl
def meshd_elect_host(model, group, mesh, settings):
    return None  # {name}: asked, never deciding
"""


def _config(api_port: int, mesh_port: int, **changes) -> str:
    doc = {
        "node": {"vram_gb": 1},
        "mesh": {"listen": f"127.0.0.1:{mesh_port}"},
        "api": {"listen": f"127.0.0.1:{api_port}", "drain_s": 2},
        "console": {"enabled": False},
        "models": {"serve": [MODEL]},
        "llama": {"bin_dir": f"{FAKE}/bin"},
        "log": {"level": "info"},
    }
    for section, values in changes.items():
        doc.setdefault(section, {}).update(values)
    return "# written by tests/daemon/test_systemd_reload.py\n" + toml.dumps(doc)


class Node(Machine):
    """The booted root with meshd installed and configured, as this test drives it."""

    def __init__(
        self, booted: systemd_root.BootedSystemd, root: Path, api_port: int, mesh_port: int
    ):
        super().__init__(booted, f"127.0.0.1:{api_port}")
        self.root = root
        self.api_port = api_port
        self.mesh_port = mesh_port

    def configure(self, **changes) -> None:
        (self.root / "etc" / "meshd.toml").write_text(
            _config(self.api_port, self.mesh_port, **changes)
        )

    def plugin(self, name: str, text: str | None) -> None:
        path = self.root / "etc" / "meshd" / "plugins.d" / f"{name}.py"
        if text is None:
            path.unlink()
        else:
            path.write_text(text)

    def wait_journal(self, text: str, since: int, timeout_s: float = 30) -> str:
        """The journal from offset ``since`` once it holds ``text``; bounded."""
        deadline = time.monotonic() + timeout_s
        while True:
            journal = self.journal()
            if text in journal[since:]:
                return journal[since:]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} not in the journal within {timeout_s:.0f} s:\n"
                    + journal[since:][-3000:]
                )
            time.sleep(0.2)

    def wait_running(self, timeout_s: float = 30) -> dict[str, str]:
        """``active``/``running`` again (not stuck in ``reloading``); bounded."""
        deadline = time.monotonic() + timeout_s
        while True:
            props = self.show("ActiveState", "SubState", "MainPID", "StatusText")
            if (props["ActiveState"], props["SubState"]) == ("active", "running"):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"meshd did not return to active/running: {props}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def node(tmp_path_factory, llama_bin_dir):
    try:
        systemd_root.ensure_rootfs()
    except systemd_root.Unavailable as e:
        pytest.skip(f"no real systemd here: {e}")
    tmp = tmp_path_factory.mktemp("systemd-reload")
    debs = build_packages(tmp_path_factory.getbasetemp() / "debs", llama_bin_dir)
    api_port, mesh_port = free_port(), free_port()
    with booted_machine(tmp, debs, api=f"127.0.0.1:{api_port}") as m:
        merged = m.merged
        assert merged is not None
        # the fake llama-server ([llama] bin_dir): a slow stream the reloads must not cut
        fake = merged / FAKE.lstrip("/")
        (fake / "bin").mkdir(parents=True)
        shutil.copy(PROJECT / "tests" / "harness" / "fakebackend.py", fake / "fakebackend.py")
        script = fake / "bin" / "llama-server"
        script.write_text(
            f"#!/bin/sh\nexec /usr/bin/python3 {FAKE}/fakebackend.py "
            f'--chunk-delay-ms {CHUNK_MS} "$@"\n'
        )
        script.chmod(0o755)
        model = merged / MODEL.lstrip("/")
        model.parent.mkdir(parents=True)
        model.write_bytes(gguf_bytes(name="tiny"))
        model.chmod(0o644)
        n = Node(m.booted, merged, api_port, mesh_port)
        n.ok("mkdir", "-p", "/etc/meshd/plugins.d")
        n.plugin("first", PLUGIN.format(name="first"))
        n.configure()
        n.ok("chown", "root:meshd", "/etc/meshd.toml")
        n.ok("chmod", "0640", "/etc/meshd.toml")
        n.ok("systemctl", "start", "meshd.service", timeout_s=120)
        yield n


class Stream:
    """A chat stream through the daemon's API, read chunk by chunk from this process."""

    def __init__(self, port: int, chunks: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {
            "model": "tiny",
            "stream": True,
            "max_tokens": chunks,
            "messages": [{"role": "user", "content": "hi"}],
        }
        self.conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()[:500]
        self.chunks = 0
        self.done = False

    def read(self, count: int | None = None) -> int:
        """Read ``count`` more chunks (None: to the end); returns how many were read."""
        read = 0
        while not self.done and (count is None or read < count):
            line = self.response.readline()
            if not line:
                raise AssertionError(f"the stream ended after {self.chunks} chunks, no [DONE]")
            if line.startswith(b"data: [DONE]"):
                self.done = True
            elif line.startswith(b"data: {"):
                self.chunks += 1
                read += 1
        return read

    def close(self) -> None:
        self.conn.close()


def test_reload_applies_log_level_and_plugins_refuses_a_broken_file_and_keeps_the_stream(node):
    props = node.wait_running()
    pid = props["MainPID"]
    llama = node.ok("pgrep", "-f", "fakebackend.py").split()
    started = time.monotonic()
    stream = Stream(node.api_port, CHUNKS)
    try:
        assert stream.read(3) == 3

        # a new log level, a new drop-in plugin with settings, a key that needs a restart
        since = len(node.journal())
        node.plugin("second", PLUGIN.format(name="second"))
        node.configure(
            log={"level": "debug"}, mesh={"heartbeat_s": 3.0}, policy={"second": {"answer": "none"}}
        )
        node.ok("systemctl", "reload", "meshd.service")
        journal = node.wait_journal("reloaded /etc/meshd.toml", since)
        assert "reload: [log] level 'info' -> 'debug': applied" in journal
        # a DEBUG line written after the reload: the new level is live
        assert "DEBUG meshd.daemon.reload: reload: logging at debug now" in journal
        order = next(
            line
            for line in journal.splitlines()
            if "reload: policy plugins, asked in this order:" in line
        )
        assert [p.split(" (")[0] for p in order.split("order: ", 1)[1].split("; ")] == [
            "first",
            "second",
            "default",
        ], order
        assert (
            "reload: [mesh] heartbeat_s 2.0 -> 3.0: needs a restart (systemctl restart meshd)"
        ) in journal
        assert node.wait_running()["MainPID"] == pid

        # a broken plugin file: nothing changes, and systemctl reload fails saying why
        since = len(node.journal())
        node.plugin("broken", "def meshd_elect_host(:\n")
        node.configure(
            log={"level": "error"}, mesh={"heartbeat_s": 3.0}, policy={"second": {"answer": "none"}}
        )
        failed = node.sh("systemctl", "reload", "meshd.service")
        assert failed.returncode != 0, failed.stdout + failed.stderr
        journal = node.wait_journal("/etc/meshd.toml not reloaded, nothing changed", since)
        assert (
            "reload refused, nothing changed: /etc/meshd/plugins.d/broken.py:1: plugin "
            "broken: syntax error"
        ) in journal
        props = node.wait_running()
        assert props["MainPID"] == pid
        assert "last reload refused" in props["StatusText"]

        # the file as it was before the broken one: nothing to apply, so nothing had changed
        node.plugin("broken", None)
        node.configure(
            log={"level": "debug"}, mesh={"heartbeat_s": 3.0}, policy={"second": {"answer": "none"}}
        )
        answer = json.loads(node.ok("meshctl", "--json", "reload"))
        assert answer["applied"] == []
        assert answer["restart_needed"] == [{"key": "[mesh] heartbeat_s", "change": "2.0 -> 3.0"}]
        assert [p.split(" (")[0] for p in answer["plugins"]] == ["first", "second", "default"]

        # SIGHUP, as `kill -HUP` does: RELOADING=1 then READY=1 bring systemd back to running
        since = len(node.journal())
        node.ok("systemctl", "kill", "--kill-who=main", "--signal=HUP", "meshd.service")
        node.wait_journal("SIGHUP: reloading", since)
        node.wait_journal("reloaded /etc/meshd.toml", since)
        assert node.wait_running()["MainPID"] == pid

        # the stream ran on through all of it, to the end, from the same llama-server; the
        # fake cannot have sent its last chunk yet, so some came after every reload
        assert time.monotonic() - started < CHUNKS * CHUNK_MS / 1000, (
            "the reloads took longer than the stream: make it longer"
        )
        assert not stream.done
        stream.read()
        assert stream.done and stream.chunks == CHUNKS, stream.chunks
        assert node.ok("pgrep", "-f", "fakebackend.py").split() == llama
    finally:
        stream.close()


def test_the_journal_has_no_traceback(node):
    assert "Traceback" not in node.journal()
