"""The API layer in front of a real llama-server and the real Gemma model.

One llama-server (started here on a free loopback port, killed by PID at the
end) and the API (``python -m meshd.serving.api`` with a static route, also a child
process) serve the whole module; the clients are the official ``openai`` SDK
and curl, as an operator's would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import DEFAULT_MODEL_NAME, ROOT, free_port

pytestmark = pytest.mark.e2e

MODEL = DEFAULT_MODEL_NAME


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def api_url(llama_bin_dir, gemma_model_path):
    llama_port, api_port = free_port(), free_port()
    llama = subprocess.Popen(
        [f"{llama_bin_dir}/llama-server", "-m", gemma_model_path, "--host", "127.0.0.1",
         "--port", str(llama_port), "--ctx-size", "2048", "--alias", MODEL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"started llama-server pid {llama.pid} on 127.0.0.1:{llama_port}")
    api = None
    try:
        _wait_http(f"http://127.0.0.1:{llama_port}/health", 180, llama)
        api = subprocess.Popen(
            [sys.executable, "-m", "meshd.cli.static_api", "--static", f"{MODEL}=127.0.0.1:{llama_port}",
             "--listen", f"127.0.0.1:{api_port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"started meshd.serving.api pid {api.pid} on 127.0.0.1:{api_port}")
        _wait_http(f"http://127.0.0.1:{api_port}/health", 30, api)
        yield f"http://127.0.0.1:{api_port}"
    finally:
        if api is not None:
            _stop(api)
        _stop(llama)


@pytest.fixture
def client(api_url):
    import openai

    return openai.OpenAI(base_url=api_url + "/v1", api_key="unused", timeout=120, max_retries=0)


MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_openai_sdk_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_sdk_gets_a_non_streamed_chat_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                           temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_openai_sdk_streams_chunks_that_arrive_one_by_one(client):
    start = time.monotonic()
    arrivals = []
    text = []
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert len(text) > 1
    total = arrivals[-1]
    # the first chunk was in our hands long before the last one was generated
    assert arrivals[0] < total / 2, (arrivals[0], total)
    assert len({round(t, 3) for t in arrivals}) > len(arrivals) / 2  # spread out, not one burst


def test_curl_gets_a_completion(api_url):
    body = json.dumps({"model": MODEL, "prompt": "The sky is", "max_tokens": 8})
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "120", "-H", "Content-Type: application/json",
         "-d", body, api_url + "/v1/completions", "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=150, check=True)
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "200"
    assert json.loads(payload)["choices"][0]["text"]


def test_curl_sees_an_unknown_model_as_404_listing_the_served_one(api_url):
    body = json.dumps({"model": "nope", "prompt": "x"})
    out = subprocess.run(
        ["curl", "-sS", "-H", "Content-Type: application/json", "-d", body,
         api_url + "/v1/completions", "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=30, check=True)
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "404"
    assert MODEL in json.loads(payload)["error"]["message"]
