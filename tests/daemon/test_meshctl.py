"""meshctl: finding the socket, exit codes, human and JSON output, against the real control API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from meshd.cli import meshctl
from meshd.daemon.control import listen_control
from meshd.errors import Refused
from tests.conftest import ROOT

STATUS = {
    "node_id": "a1b2c3d4e5f6a7b8c9d0",
    "mesh_id": "mesh-42",
    "role": "host",
    "serving": "gemma-3-270m-q4_k_m",
    "state": "ready",
    "api": "127.0.0.1:9337",
    "uptime_s": 3723.4,
    "peers": [
        {
            "node_id": "ffee00112233445566",
            "addr": "10.0.0.2:7842",
            "role": "standby",
            "serving": None,
            "vram_bytes": 24 * 2**30,
            "rtt_ms": 0.42,
            "state": "alive",
        }
    ],
    "passive": {"clients": 2, "standby": 1},
    "models": [
        {
            "name": "gemma-3-270m-q4_k_m",
            "state": "warm",
            "hosts": ["a1b2c3d4e5f6a7b8c9d0"],
            "size_bytes": 253 * 2**20,
            "split": None,
        }
    ],
    "downloads": [
        {
            "name": "qwen",
            "bytes": 500 * 2**20,
            "total_bytes": 1000 * 2**20,
            "rate_bps": 5e7,
            "eta_s": 10,
        }
    ],
}


class FakeNode:
    def __init__(self):
        self.calls = []

    def status(self):
        return STATUS

    def peers(self):
        return STATUS["peers"]

    def model_table(self, catalog):
        self.calls.append(("models", catalog))
        return {"models": STATUS["models"]}

    def make_token(self, ttl_s, once):
        self.calls.append(("make_token", ttl_s, once))
        return {"id": "tok1", "token": "meshd1.SECRET", "expires_at": 4102444800}

    def revoke_token(self, token_id):
        self.calls.append(("revoke_token", token_id))

    def drop(self, model):
        raise Refused(f"{model} is not served anywhere in the mesh")

    def serve_model(self, model):
        self.calls.append(("serve_model", model))
        if model == "unknown":
            raise Refused(f"model {model!r} is not dropped, served, on any node's disk or in "
                          "the catalog: nothing to serve")
        return {"serving": model, "was_dropped": True, "told_peers": 2, "version": 2}

    def leave(self):
        self.calls.append(("leave",))
        return defer.succeed({"leaving": True})

    def join(self, token):
        self.calls.append(("join", token))
        return {"mesh_id": "mesh-42", "via": "10.0.0.2:7842"}


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path):
    """The real control API on a UNIX socket, with a fake node behind it."""
    from twisted.internet import reactor

    node = FakeNode()
    path = str(tmp_path / "control.sock")
    port = await listen_control(path, node, reactor=reactor)
    yield path, node
    await port.stopListening()


def run(*argv):
    """meshctl's main() in a thread, so the reactor keeps serving the socket."""
    return deferToThread(meshctl.main, list(argv))


@pytest_twisted.ensureDeferred
async def test_status_human_output_names_node_role_serving_api_uptime(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "status") == 0
    out = capsys.readouterr().out
    assert "a1b2c3d4e5f6a7b8c9d0" in out
    assert "host" in out
    assert "gemma-3-270m-q4_k_m (warm)" in out
    assert "127.0.0.1:9337" in out
    assert "1h 02m 03s" in out
    assert "2 clients, 1 standby" in out


@pytest_twisted.ensureDeferred
async def test_status_human_output_has_peer_model_and_download_tables(daemon, capsys):
    path, _ = daemon
    await run("--socket", path, "status")
    out = capsys.readouterr().out
    assert "PEERS" in out and "10.0.0.2:7842" in out and "24.0 GiB" in out and "0.4 ms" in out
    assert "MODELS" in out and "253.0 MiB" in out
    assert "DOWNLOADS" in out and "500.0 MiB (50%)" in out


@pytest_twisted.ensureDeferred
async def test_status_json_is_the_daemons_answer(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == STATUS


@pytest_twisted.ensureDeferred
async def test_json_flag_before_the_command_works_too(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "--json", "peers") == 0
    assert json.loads(capsys.readouterr().out) == STATUS["peers"]


@pytest_twisted.ensureDeferred
async def test_token_prints_the_token_as_last_line(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "token", "--ttl", "30m", "--once") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "meshd1.SECRET"
    assert "tok1" in lines[0]
    assert node.calls == [("make_token", 1800.0, True)]


@pytest_twisted.ensureDeferred
async def test_token_without_ttl_leaves_the_default_to_the_daemon(daemon):
    path, node = daemon
    await run("--socket", path, "token")
    assert node.calls == [("make_token", 86400.0, False)]


@pytest_twisted.ensureDeferred
async def test_token_revoke_sends_the_id(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "token", "--revoke", "tok1") == 0
    assert node.calls == [("revoke_token", "tok1")]
    assert "revoked token tok1" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
async def test_token_revoke_with_ttl_is_bad_usage(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "token", "--revoke", "tok1", "--ttl", "1h") == 2
    assert node.calls == []


@pytest_twisted.ensureDeferred
async def test_refusal_prints_reason_and_exits_3(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "drop", "llama") == 3
    err = capsys.readouterr().err
    assert err == "meshctl: refused: llama is not served anywhere in the mesh\n"


@pytest_twisted.ensureDeferred
async def test_command_the_daemon_lacks_exits_3_saying_unsupported(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "gpus") == 3
    assert "does not support gpus" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_models_catalog_flag_reaches_the_node(daemon):
    path, node = daemon
    await run("--socket", path, "models", "--catalog")
    assert node.calls == [("models", True)]


@pytest_twisted.ensureDeferred
async def test_leave_exits_0(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "leave") == 0
    assert node.calls == [("leave",)]
    assert "left the mesh" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
async def test_join_passes_the_token(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "join", "meshd1.abc") == 0
    assert node.calls == [("join", "meshd1.abc")]
    assert "mesh-42" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
async def test_socket_taken_from_config_file(daemon, tmp_path, capsys):
    path, _ = daemon
    cfg = tmp_path / "meshd.toml"
    cfg.write_text(f'[node]\ncontrol_socket = "{path}"\n')
    assert await run("--config", str(cfg), "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == STATUS["node_id"]


# -- finding the socket, without a daemon ----------------------------------------


def test_find_socket_prefers_socket_flag(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\ncontrol_socket = "/from/config"\n')
    assert meshctl.find_socket("/flag", str(cfg), env={}) == "/flag"


def test_find_socket_uses_config_flag_before_environment(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[node]\ncontrol_socket = "/a.sock"\n')
    b.write_text('[node]\ncontrol_socket = "/b.sock"\n')
    assert meshctl.find_socket(None, str(a), env={"MESHD_CONFIG": str(b)}) == "/a.sock"
    assert meshctl.find_socket(None, None, env={"MESHD_CONFIG": str(b)}) == "/b.sock"


def test_find_socket_config_without_the_key_means_default(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[api]\nlisten = '127.0.0.1:1'\n")
    assert meshctl.find_socket(None, str(cfg), env={}) == meshctl.DEFAULT_SOCKET


def test_missing_config_file_is_bad_usage(tmp_path, capsys):
    assert meshctl.main(["--config", str(tmp_path / "none.toml"), "status"]) == 2
    assert "none.toml: no such file" in capsys.readouterr().err


def test_broken_config_file_is_bad_usage(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node\n")
    assert meshctl.main(["--config", str(cfg), "status"]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_missing_socket_exits_1_naming_the_path(tmp_path, capsys):
    path = str(tmp_path / "control.sock")
    assert meshctl.main(["--socket", path, "status"]) == 1
    err = capsys.readouterr().err
    assert err == f"meshctl: cannot reach meshd at {path}: no such file (is meshd running?)\n"


def test_dead_socket_exits_1_saying_stale(tmp_path, capsys):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert meshctl.main(["--socket", path, "status"]) == 1
    err = capsys.readouterr().err
    assert path in err and "stale" in err


def test_socket_that_never_answers_exits_1(tmp_path, capsys):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    try:
        assert meshctl.main(["--socket", path, "--timeout", "0.2", "status"]) == 1
    finally:
        s.close()
    assert "no answer in time" in capsys.readouterr().err


def test_unknown_command_is_bad_usage():
    with pytest.raises(SystemExit) as e:
        meshctl.main(["frobnicate"])
    assert e.value.code == 2


def test_bad_ttl_is_bad_usage(capsys):
    with pytest.raises(SystemExit) as e:
        meshctl.main(["token", "--ttl", "soon"])
    assert e.value.code == 2
    assert "not a duration" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("3600", 3600),
        ("90s", 90),
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        ("1h30m", 5400),
        ("1.5h", 5400),
    ],
)
def test_parse_duration_accepts(text, seconds):
    assert meshctl.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "-5", "0", "1h30", "1 h"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        meshctl.parse_duration(text)


def test_status_without_peers_or_models_says_none():
    lines = meshctl.format_status(
        {"node_id": "n", "role": "idle", "serving": None, "peers": [], "models": []}
    )
    text = "\n".join(lines)
    assert "serving  nothing" in text
    assert text.count("(none)") == 2


def test_status_says_why_a_download_was_refused_or_failed():
    lines = meshctl.format_status({
        "node_id": "n", "role": "idle", "serving": None, "peers": [], "models": [],
        "downloads_refused": [{"name": "big", "reason": "model big (47.0 GiB) needs 51.7 GiB, "
                               "node has 24.0 GiB: not downloading"}],
        "downloads_failed": [{"name": "gone", "error": "404 from the hub"}],
    })
    text = "\n".join(lines)
    assert "download refused: model big (47.0 GiB) needs 51.7 GiB" in text
    assert "download failed: gone: 404 from the hub" in text


def test_cli_process_unreachable_prints_one_line_no_traceback(tmp_path):
    path = str(tmp_path / "nope.sock")
    env = dict(os.environ, MESHD_CONFIG="")
    r = subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", path, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_cli_does_not_import_twisted():
    code = "import sys; from meshd.cli import meshctl; print('twisted' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "False"


def test_a_size_reads_the_same_in_meshctl_logs_and_the_console():
    """One unit everywhere: binary GiB, labelled "GiB" (the console's page does the same math)."""
    from meshd.units import gib

    assert gib(8 * 2**30) == "8.0 GiB"
    assert meshctl.human_bytes(8 * 2**30) == "8.0 GiB"
    page = (ROOT / "meshd" / "console" / "index.html").read_text()
    assert "const GIB = 1024 ** 3;" in page and '" GiB"' in page and '" GB"' not in page


def test_status_says_why_a_node_is_not_in_a_mesh():
    lines = meshctl.format_status({
        "node_id": "n", "mesh_id": None, "role": "idle", "serving": None, "peers": [],
        "models": [], "join": {"state": "waiting",
                               "reason": "the token was refused: it expired (token-expired)"},
    })
    mesh = next(line for line in lines if line.startswith("mesh"))
    assert "waiting: the token was refused: it expired" in mesh
    # in a mesh: the mesh id, no join line
    lines = meshctl.format_status({"node_id": "n", "mesh_id": "m1", "join": None, "peers": [],
                                   "models": []})
    assert next(line for line in lines if line.startswith("mesh")).split() == ["mesh", "m1"]


@pytest_twisted.ensureDeferred
async def test_serve_lifts_a_drop_and_says_so(daemon, capsys):
    path, node = daemon
    assert await run("--socket", path, "serve", "gemma") == 0
    assert node.calls == [("serve_model", "gemma")]
    out = capsys.readouterr().out
    assert out == ("serving gemma mesh-wide again: the drop is lifted; told 2 peer(s) "
                   "(decision version 2)\n")


@pytest_twisted.ensureDeferred
async def test_serve_of_an_unknown_model_is_refused_with_exit_3(daemon, capsys):
    path, _ = daemon
    assert await run("--socket", path, "serve", "unknown") == 3
    assert "nothing to serve" in capsys.readouterr().err


def test_status_lists_the_models_dropped_mesh_wide():
    lines = meshctl.format_status({
        "node_id": "n", "role": "idle", "serving": None, "peers": [], "models": [],
        "desired": [{"model": "big", "state": "dropped", "version": 3, "by": "node-b", "at": 1.0},
                    {"model": "back", "state": "serve", "version": 2, "by": "node-c", "at": 1.0}],
    })
    text = "\n".join(lines)
    assert "dropped mesh-wide: big (by node-b, version 3; meshctl serve big lifts it)" in text
    assert "back" not in text  # served again: nothing to say
