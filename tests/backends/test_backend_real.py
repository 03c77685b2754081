"""The supervisor with the real llama-server, the real Gemma model and real signals.

Every process here is started by the test and stopped by its PID; the bounded
waits give up with a message instead of hanging.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from meshd.backends import supervisor as backend
from meshd.backends.supervisor import LlamaServer, RpcServer
from meshd.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "gemma-3-270m-q4_k_m"
LLAMA = LlamaConfig(
    ctx_size=512, threads=1, load_timeout_s=120.0, stop_timeout_s=10.0,
    restart_min_s=0.2, restart_max_s=2.0,
)
READY_WITHIN_S = 120.0

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for a reaper counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def kill_if_alive(pid: int | None) -> None:
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)


def until_state(server: backend.Supervised, wanted: set[str], within_s: float) -> Deferred:
    """Fires when ``server`` enters one of ``wanted`` (at once if it is in one)."""
    from twisted.internet import reactor

    d: Deferred = Deferred()
    if server.state in wanted:
        d.callback(server.state)
        return d

    def seen(state: str) -> None:
        if state in wanted and not d.called:
            server.remove_listener(seen)
            d.callback(state)

    server.add_listener(seen)
    d.addTimeout(within_s, reactor)
    return d


def make_llama(bin_dir: str, model: str) -> LlamaServer:
    from twisted.internet import reactor

    return LlamaServer(name=MODEL_NAME, model_path=model, llama=LLAMA, bin_dir=bin_dir,
                       reactor=reactor)


@pytest_twisted.inlineCallbacks
def test_llama_server_becomes_ready_and_its_health_answers_200(llama_bin_dir, gemma_model_path):
    server = make_llama(llama_bin_dir, gemma_model_path)
    server.start()
    try:
        yield until_state(server, {"ready", "failed"}, READY_WITHIN_S)
        assert server.state == "ready", server.last_exit
        response = yield treq.get(f"http://127.0.0.1:{server.port}/health")
        assert response.code == 200
        yield response.content()
        print(f"llama-server pid {server.pid} ready on port {server.port}")
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
        assert argv0.endswith(b"llama-server")  # the wrapper exec'd it: same pid
        assert os.getpgid(server.pid) == server.pid  # its own process group
    finally:
        pid = server.pid
        yield server.stop()
        kill_if_alive(pid)


@pytest_twisted.inlineCallbacks
def test_kill_9_of_llama_server_restarts_it_with_a_new_pid(llama_bin_dir, gemma_model_path):
    server = make_llama(llama_bin_dir, gemma_model_path)
    states: list[str] = []
    server.add_listener(states.append)
    server.start()
    pids = []
    try:
        yield until_state(server, {"ready"}, READY_WITHIN_S)
        first = server.pid
        pids.append(first)
        print(f"killing llama-server pid {first} with SIGKILL")
        os.kill(first, signal.SIGKILL)
        yield until_state(server, {"restarting"}, 10)
        assert "killed by signal 9" in server.last_exit
        yield until_state(server, {"ready"}, READY_WITHIN_S)
        pids.append(server.pid)
        assert server.pid != first
        assert server.restarts == 1
        assert not alive(first)
        assert states[states.index("ready") + 1] == "restarting"
    finally:
        pid = server.pid
        yield server.stop()
        for p in [*pids, pid]:
            kill_if_alive(p)


@pytest_twisted.inlineCallbacks
def test_stop_leaves_no_llama_server_process(llama_bin_dir, gemma_model_path):
    server = make_llama(llama_bin_dir, gemma_model_path)
    server.start()
    yield until_state(server, {"ready"}, READY_WITHIN_S)
    pid = server.pid
    try:
        yield server.stop()
        assert server.state == "stopped"
        assert not alive(pid), f"llama-server pid {pid} survived stop()"
    finally:
        kill_if_alive(pid)


@pytest_twisted.inlineCallbacks
def test_rpc_server_is_ready_when_its_loopback_port_accepts(llama_bin_dir):
    from twisted.internet import reactor

    server = RpcServer(name="worker", llama=LLAMA, bin_dir=llama_bin_dir, reactor=reactor)
    server.start()
    pid = None
    try:
        yield until_state(server, {"ready", "failed"}, 30)
        assert server.state == "ready", server.last_exit
        pid = server.pid
        yield server.stop()
        assert not alive(pid)
    finally:
        kill_if_alive(pid or server.pid)


@pytest_twisted.inlineCallbacks
def test_llama_server_splits_onto_a_supervised_rpc_server(llama_bin_dir, gemma_model_path,
                                                         caplog):
    """--rpc/--tensor-split reach llama-server, and the readiness probe leaves rpc-server usable."""
    from twisted.internet import reactor

    caplog.set_level(logging.DEBUG, logger="meshd.backends.supervisor.output")
    rpc = RpcServer(name="worker", llama=LLAMA, bin_dir=llama_bin_dir, reactor=reactor)
    rpc.start()
    pids = []
    server = None
    try:
        yield until_state(rpc, {"ready"}, 30)
        pids.append(rpc.pid)
        server = LlamaServer(name=MODEL_NAME, model_path=gemma_model_path, llama=LLAMA,
                             bin_dir=llama_bin_dir, reactor=reactor,
                             rpc_workers=[f"127.0.0.1:{rpc.port}"], tensor_split=[0.5, 0.5])
        server.start()
        yield until_state(server, {"ready"}, READY_WITHIN_S)
        pids.append(server.pid)
        response = yield treq.post(
            f"http://127.0.0.1:{server.port}/v1/completions",
            json={"prompt": "Hello", "max_tokens": 4}, timeout=60,
            headers={"Authorization": f"Bearer {server.api_key}"},  # what meshd's proxy adds
        )
        assert response.code == 200
        body = yield response.json()
        assert body["choices"][0]["text"]
        accepted = [r for r in caplog.records
                    if r.getMessage() == "rpc-server[worker]: Accepted client connection"]
        assert len(accepted) >= 2  # the probe's, then llama-server's
    finally:
        if server is not None:
            yield server.stop()
        yield rpc.stop()
        for pid in pids:
            kill_if_alive(pid)


# -- no orphans: the pdeathsig wrapper ------------------------------------------


def start_parent(code: str) -> tuple[subprocess.Popen, int]:
    """A throwaway parent python that prints its child's pid on its first line."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
    )
    line = parent.stdout.readline()
    if not line.strip().isdigit():
        parent.kill()
        parent.wait(10)
        pytest.fail(f"parent printed {line!r} instead of a child pid")
    return parent, int(line)


def test_child_of_the_wrapper_dies_when_its_parent_is_sigkilled():
    parent, child = start_parent(f"""
        import os, subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-I", "-S", {backend.WRAPPER!r},
                              str(os.getpid()), "/bin/sleep", "300"])
        print(p.pid, flush=True)
        time.sleep(300)
    """)
    try:
        print(f"parent pid {parent.pid}, sleep pid {child}")
        deadline = time.monotonic() + 10
        # until the wrapper has exec'd sleep (argv[0]; before that, sleep is an argument)
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"/bin/sleep":
            assert time.monotonic() < deadline, "the wrapper never exec'd sleep"
            time.sleep(0.02)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_dead(child, 5), f"sleep pid {child} outlived its SIGKILLed parent"
    finally:
        kill_if_alive(child)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_wrapper_refuses_to_start_when_its_parent_is_already_gone():
    result = subprocess.run(
        [sys.executable, "-I", "-S", backend.WRAPPER, "999999999", "/bin/true"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "already gone" in result.stderr


def test_no_orphan_llama_server_after_its_supervisor_is_sigkilled(llama_bin_dir,
                                                                  gemma_model_path):
    """meshd's kill -9 case: a supervising process dies; its llama-server goes with it."""
    parent, child = start_parent(f"""
        from twisted.internet import reactor
        from meshd.backends.supervisor import LlamaServer
        from meshd.config import LlamaConfig

        server = LlamaServer(name="m", model_path={gemma_model_path!r}, bin_dir={llama_bin_dir!r},
                             llama=LlamaConfig(ctx_size=512, threads=1), reactor=reactor)
        server.when_ready().addCallback(lambda s: print(s.pid, flush=True))
        server.start()
        reactor.callLater({READY_WITHIN_S}, reactor.stop)
        reactor.run()
    """)
    try:
        print(f"supervisor pid {parent.pid}, llama-server pid {child}")
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_dead(child, 5), f"llama-server pid {child} is an orphan"
    finally:
        kill_if_alive(child)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
