"""``/metrics`` of a real two-node mesh, read with prometheus_client's own parser, moving
with real traffic: a request served locally, one that fails over from the local
llama-server to the peer's, and one tunnelled while the local one restarts; then the
peer's death.

Both nodes serve ``m-x`` with the fake backend (``tests/harness/fakebackend.py``): A's
closes every request unanswered while a file exists (``--close-while``), so its
failure before any byte is the test's to switch on and off; killing A's fake makes A
route to B alone until its llama-server is back (``restart_min_s``).  The tunnelled
requests are counted twice, ``hop="served"`` at A and ``hop="relayed"`` at B, and a
mesh-wide sum of ``served`` counts each client request once.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir, pid_alive
from tests.harness.promtext import Scrape

pytestmark = pytest.mark.e2e

MODEL = "m-x"


def fake_node(tmp_path, name: str, gguf: str, *flags: str, join: str | None = None) -> Meshd:
    base = tmp_path / name
    models = base / "models"
    models.mkdir(parents=True)
    os.symlink(gguf, models / f"{MODEL}.gguf")
    config = {
        "node": {"models_dir": str(models)},
        "models": {"serve": [MODEL], "min_free_gb": 0.0},
        # a crash is restarted after 4 s: long enough to send a request meanwhile
        "llama": {
            "bin_dir": fake_llama_bin_dir(base, "--chunks", "5", *flags),
            "restart_min_s": 4.0,
        },
    }
    if join:
        config["mesh"] = {"join": [join]}
    return Meshd(base, config, name=name)


def scrape(n: Meshd) -> Scrape:
    with urllib.request.urlopen(f"{n.api}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(r.read().decode())


def chat(n: Meshd, *, stream: bool) -> bytes:
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    req = urllib.request.Request(
        f"{n.api}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return r.read()


def hosts(n: Meshd) -> list[str]:
    with urllib.request.urlopen(f"{n.api}/v1/models", timeout=10) as r:
        listed = {m["id"]: m for m in json.load(r)["data"]}
    return listed.get(MODEL, {}).get("meshd", {}).get("hosts", [])


def backend(n: Meshd) -> dict:
    (entry,) = [m for m in n.status()["models"] if m["name"] == MODEL]
    return entry["backend"]


def test_metrics_move_with_local_failover_and_tunnelled_requests(tmp_path, gemma_model_path):
    failing = tmp_path / "a-fails"
    a = fake_node(tmp_path, "a", gemma_model_path, "--close-while", str(failing))
    nodes = [a]
    try:
        a.start()
        a.wait_running()
        token = a.ctl("token").stdout.strip().splitlines()[-1]
        b = fake_node(tmp_path, "b", gemma_model_path, join=token)
        nodes.append(b)
        b.start()
        a.wait_for(lambda n: len(hosts(n)) == 2, f"{MODEL} listed with 2 hosts on A", 60)
        a.wait_for(lambda n: backend(n)["state"] == "ready", "A's llama-server ready", 60)

        # -- local: A's own llama-server answers a stream -------------------------------------
        assert b"data: " in chat(a, stream=True)

        # -- failover: A's closes before a byte, B answers through a tunnel ------------------
        failing.touch()
        assert chat(a, stream=False)
        failing.unlink()

        # -- tunnel: A's llama-server is down (restarting), B is the only host --------------
        pid = backend(a)["pid"]
        os.kill(pid, signal.SIGKILL)  # the fake A's daemon started, by its pid
        a.wait_for(
            lambda n: not pid_alive(pid) and backend(n)["state"] == "restarting",
            "A's llama-server restarting",
            30,
        )
        assert b"data: " in chat(a, stream=True)

        sa, sb = scrape(a), scrape(b)
        served = {"hop": "served", "model": MODEL, "status": "200"}
        for route in ("local", "failover", "tunnel"):
            assert sa.value("meshd_api_requests_total", route=route, **served) == 1, route
            assert sa.value("meshd_api_time_to_first_byte_seconds_count", route=route) == 1
            assert sa.value("meshd_api_request_duration_seconds_count", route=route) == 1
            assert sa.value("meshd_api_response_bytes_total", route=route) > 0
        assert sa.value("meshd_api_sse_events_total", route="local") >= 5
        assert sa.value("meshd_api_sse_events_total", route="tunnel") >= 5
        assert sa.value("meshd_api_failovers_total", model=MODEL) == 1
        assert sa.value("meshd_api_upstream_errors_total", upstream="local") == 1
        assert sa.value("meshd_api_in_flight", hop="served") == 0
        # B relayed the two that crossed the tunnel, and served none of its own
        assert sb.value("meshd_api_requests_total", hop="relayed", route="local", status="200") == 2
        assert sb.value("meshd_api_sse_events_total", hop="relayed") >= 5
        assert sb.value("meshd_api_requests_total", hop="served") == 0
        assert sb.value("meshd_tunnels_opened_total", purpose="http") >= 1
        # summed over the mesh, "served" counts each of the three client requests once
        assert (
            sum(s.value("meshd_api_requests_total", hop="served", status="200") for s in (sa, sb))
            == 3
        )
        for s in (sa, sb):
            assert s.value("meshd_peers", state="alive") == 1
            assert s.value("meshd_gossip_bytes_total", direction="in") > 0
            assert s.value("meshd_gossip_bytes_total", direction="out") > 0
            assert s.value("meshd_node_role", role="host") == 1
        assert sb.value("meshd_backend_state", kind="llama-server", model=MODEL, state="ready") == 1

        # -- A's llama-server is back: its restart is counted ----------------------------------
        a.wait_for(lambda n: backend(n)["state"] == "ready", "A's llama-server back", 30)
        sa = scrape(a)
        assert sa.value("meshd_backend_restarts_total", kind="llama-server", model=MODEL) == 1
        assert sa.value("meshd_backend_state", model=MODEL, state="ready") == 1

        # -- B dies: A detects it ----------------------------------------------------------------
        b.kill()
        a.wait_for(
            lambda n: scrape(n).value("meshd_peer_deaths_total") == 1, "A counting B's death", 30
        )
        sa = scrape(a)
        assert sa.value("meshd_peers", state="alive") == 0
        assert sa.value("meshd_peer_death_detection_seconds_count") == 1
    finally:
        for n in reversed(nodes):
            n.stop()
