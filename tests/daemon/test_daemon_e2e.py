"""One real meshd serving the real Gemma model through the real llama-server.

The daemon is started once for the module (loading the model takes seconds);
the tests that end it (SIGTERM with an open stream, kill -9, leave) start their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest

from tests.conftest import DEFAULT_MODEL_NAME as MODEL
from tests.harness.daemon import Meshd, pid_alive

pytestmark = pytest.mark.e2e


def serving_node(tmp_path, llama_bin_dir, gemma_model_path, name="node", **extra) -> Meshd:
    config = {
        "models": {"serve": [gemma_model_path]},
        "llama": {"bin_dir": llama_bin_dir, "ctx_size": 2048, "restart_min_s": 1.0},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return Meshd(tmp_path / name, config, name=name)


@pytest.fixture(scope="module")
def node(tmp_path_factory, llama_bin_dir, gemma_model_path):
    n = serving_node(tmp_path_factory.mktemp("e2e"), llama_bin_dir, gemma_model_path)
    n.start()
    try:
        n.wait_model_warm(MODEL)
        yield n
    finally:
        n.stop()


def client(node: Meshd, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def test_openai_sdk_lists_the_served_model(node):
    ids = [m.id for m in client(node).models.list()]
    assert ids == [MODEL]


def test_openai_sdk_gets_a_chat_completion(node):
    r = client(node).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0


def test_openai_sdk_streams_chunks_as_they_are_produced(node):
    arrivals = []
    start = time.monotonic()
    stream = client(node).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        max_tokens=48,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) > 1
    # chunk by chunk: the first token arrived well before the last one was produced
    assert arrivals[0] < arrivals[-1]
    assert arrivals[-1] - arrivals[0] > 0.5 * (arrivals[-1] / len(arrivals))


def test_curl_gets_a_completion(node):
    body = json.dumps({"model": MODEL, "prompt": "The sky is", "max_tokens": 8})
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/json",
         "-d", body, f"{node.api}/v1/completions"],
        capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["choices"][0]["text"] is not None


def test_unknown_model_is_404_listing_served_models(node):
    with pytest.raises(openai.NotFoundError) as e:
        client(node).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert MODEL in e.value.body["message"]
    assert e.value.body["code"] == "model_not_found"


def test_20_mib_body_is_413_and_the_daemon_keeps_serving(node):
    with socket.create_connection(("127.0.0.1", node.api_port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {20 * 1024 * 1024}\r\n\r\n".encode()
            + b"{" * 65536
        )
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"error"' in reply
    assert [m.id for m in client(node).models.list()] == [MODEL]


def test_status_shows_the_node_and_its_warm_model(node):
    s = node.status()
    assert s["role"] == "host" and s["serving"] == MODEL and s["state"] == "running"
    assert s["api"] == f"127.0.0.1:{node.api_port}"
    assert s["peers"] == []
    (m,) = s["models"]
    assert m["name"] == MODEL and m["state"] == "warm" and m["size_bytes"] > 200_000_000
    human = node.ctl("status").stdout
    assert MODEL in human and s["node_id"] in human


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_llama_server_answers_only_meshd_a_direct_request_is_401(node):
    backend = node.status()["models"][0]["backend"]
    direct = f"http://127.0.0.1:{backend['port']}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    code, answer = _post(f"{direct}/v1/chat/completions", body)
    assert code == 401 and answer["error"]["type"] == "authentication_error"
    # a web page in a local browser, or a guess at the key, fares no better
    assert _post(f"{direct}/v1/chat/completions", body,
                 {"Origin": "http://evil.example", "Authorization": "Bearer guess"})[0] == 401
    code, answer = _post(f"{node.api}/v1/chat/completions", body)
    assert code == 200 and answer["choices"]
    # the log and the command line never show the key; /health stays public (the probe)
    with open(f"/proc/{backend['pid']}/cmdline", "rb") as f:
        assert b"api-key" not in f.read()
    assert "LLAMA_API_KEY" not in node.log()
    import urllib.request

    with urllib.request.urlopen(f"{direct}/health", timeout=10) as r:
        assert r.status == 200


def _wait_for_status(api: str, want: int, timeout: float) -> int:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 1}).encode()
    code = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{api}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
            if code == 503:
                assert e.headers["Retry-After"]
                assert json.loads(e.read())["error"]["code"]
        except OSError:
            code = None
        if code == want:
            return code
        time.sleep(0.05)
    raise AssertionError(f"no {want} within {timeout} s (last {code})")


def test_killed_llama_server_is_restarted_with_503_meanwhile(tmp_path, llama_bin_dir, gemma_model_path):
    # a slower restart back-off makes the outage window long enough to observe
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path, llama={"restart_min_s": 3.0})
    n.start()
    try:
        before = n.wait_model_warm(MODEL)["models"][0]["backend"]["pid"]
        os.kill(before, signal.SIGKILL)
        assert _wait_for_status(n.api, 503, timeout=5) == 503
        after = n.wait_model_warm(MODEL)["models"][0]["backend"]
        assert after["pid"] != before and after["restarts"] >= 1
        assert _wait_for_status(n.api, 200, timeout=60) == 200
        assert "restart" in n.log()
    finally:
        n.stop()


def test_a_stopped_llama_server_is_found_hung_and_restarted(tmp_path, llama_bin_dir, gemma_model_path):
    # issue 12: kill -STOP llama-server; the node must notice, say so, and serve again
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path,
                     llama={"live_interval_s": 1.0, "live_misses": 3, "health_timeout_s": 1.0,
                            "stop_timeout_s": 2.0})
    n.start()
    stopped = None
    try:
        stopped = n.wait_model_warm(MODEL)["models"][0]["backend"]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        # a request sent to the stopped process gets a clean error once it is
        # found hung (its connection is cut by the restart), not silence for ever
        held: dict[str, object] = {}

        def ask() -> None:
            import urllib.error
            import urllib.request
            body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 1}).encode()
            req = urllib.request.Request(f"{n.api}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    held["code"] = r.status
            except urllib.error.HTTPError as e:
                held["code"], held["body"] = e.code, json.loads(e.read())
            except OSError as e:
                held["error"] = e

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # found within live_interval_s + live_misses x health_timeout_s (4 s) and a margin
        n.wait_for(lambda m: m.status()["models"][0]["state"] != "warm",
                   "the model not warm while its llama-server is stopped", timeout=30)
        n.wait_for(lambda m: f"pid {stopped} did not answer /health 3 times" in m.log()
                   and "hung; restarting" in m.log(), "a log line naming the hang", timeout=10)
        after = n.wait_model_warm(MODEL, timeout=120)["models"][0]["backend"]
        assert after["pid"] != stopped and after["restarts"] >= 1
        assert not pid_alive(stopped)  # SIGCONT and SIGTERM, or SIGKILL: gone
        asker.join(timeout=60)
        assert not asker.is_alive() and "error" not in held, held
        # 502 when it reached the stopped one, 503 when it came after the state left ready
        assert held["code"] in (502, 503), held
        assert set(held["body"]) == {"error"}  # type: ignore[arg-type]
        r = client(n).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert r.choices[0].message.content is not None
    finally:
        if stopped is not None and pid_alive(stopped):
            try:
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        n.stop()


def test_sigterm_with_an_open_stream_finishes_it_and_leaves_no_orphan(tmp_path, llama_bin_dir, gemma_model_path):
    # a generous drain: on a loaded 2-core machine 64 tokens can take many seconds
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path, api={"drain_s": 120.0})
    n.start()
    try:
        backend_pid = n.wait_model_warm(MODEL)["models"][0]["backend"]["pid"]
        got: list[str] = []
        errors: list[BaseException] = []
        first = threading.Event()

        def read_stream():
            try:
                stream = client(n).chat.completions.create(
                    model=MODEL, stream=True, max_tokens=64,
                    messages=[{"role": "user", "content": "Tell me a long story."}],
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(chunk.choices[0].delta.content)
                        first.set()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                first.set()

        t = threading.Thread(target=read_stream)
        t.start()
        assert first.wait(60)
        n.signal(signal.SIGTERM)
        t.join(150)
        assert not errors, errors
        assert len(got) > 1
        assert n.wait_exit(150) == 0
        assert not pid_alive(backend_pid)
    finally:
        n.stop()


def test_kill_9_of_meshd_takes_llama_server_with_it(tmp_path, llama_bin_dir, gemma_model_path):
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path)
    n.start()
    try:
        backend_pid = n.wait_model_warm(MODEL)["models"][0]["backend"]["pid"]
        n.kill()
        deadline = time.monotonic() + 10
        while pid_alive(backend_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(backend_pid)
    finally:
        n.stop()


def test_meshctl_leave_stops_the_daemon_cleanly(tmp_path, llama_bin_dir, gemma_model_path):
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path)
    n.start()
    try:
        backend_pid = n.wait_model_warm(MODEL)["models"][0]["backend"]["pid"]
        r = n.ctl("leave")
        assert r.returncode == 0
        assert n.wait_exit(60) == 0
        assert not pid_alive(backend_pid)
        r = n.ctl("status", check=False)
        assert r.returncode == 1 and n.socket in r.stderr
    finally:
        n.stop()


def test_notify_protocol_ready_after_model_loaded_and_stopping(tmp_path, llama_bin_dir, gemma_model_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(120)
    n = serving_node(tmp_path, llama_bin_dir, gemma_model_path)
    n.start(env={"NOTIFY_SOCKET": sock_path})
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        # READY=1 only once the model answers
        assert any(m["state"] == "warm" for m in n.status()["models"])
        assert any(m.startswith("STATUS=") for m in messages)
        n.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert n.wait_exit(60) == 0
    finally:
        n.stop()
        sock.close()


def test_stop_while_the_model_is_still_loading_exits_0(tmp_path, gemma_model_path):
    """Ctrl-C or SIGTERM during start-up is a clean stop, not a failed start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    never_ready = bin_dir / "llama-server"
    never_ready.write_text("#!/bin/sh\nexec sleep 300\n")  # never answers /health
    never_ready.chmod(0o755)
    n = Meshd(tmp_path / "node", {"models": {"serve": [gemma_model_path]},
                                  "llama": {"bin_dir": str(bin_dir)}}, name="node")
    n.start()
    try:
        status = n.wait_for(
            lambda m: (s := m.status())["models"] and s["models"][0].get("backend", {}).get("pid")
            and s, "llama-server started", timeout=60)
        child = status["models"][0]["backend"]["pid"]
        assert status["models"][0]["state"] == "loading"
        n.signal(signal.SIGINT)
        assert n.wait_exit(60) == 0
        assert "cannot start" not in n.log() and "Traceback" not in n.log()
        assert not pid_alive(child)
    finally:
        n.stop()
