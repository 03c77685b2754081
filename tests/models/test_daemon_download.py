"""Downloads through the real daemon: resume after kill -9, and ``meshctl download``.

The hub is the local test hub (``HF_ENDPOINT``); llama-server is the fast fake
backend, so the test is about the download, not about inference.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir
from tests.models.test_download import FILE, REPO, MiB, big_gguf, files_in, hub  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e
ENTRY = f"hf:{REPO}/{FILE}"
NAME = FILE.removesuffix(".gguf")


def node(tmp_path, **models) -> Meshd:
    return Meshd(
        tmp_path / "node",
        {"llama": {"bin_dir": fake_llama_bin_dir(tmp_path)}, "models": {"min_free_gb": 0.0, **models}},
        name="node",
    )


def on_disk(n: Meshd) -> bool:
    table = json.loads(n.ctl("models", "--json").stdout)
    return any(m["name"] == NAME for m in table["disk"])


def downloading(n: Meshd) -> int:
    rows = [d for d in n.status()["downloads"] if d["name"] == NAME]
    return rows[0]["bytes"] if rows and rows[0]["bytes"] > 0 else 0


def test_daemon_killed_mid_download_resumes_after_restart(hub, tmp_path):  # noqa: F811
    data = big_gguf()
    hub.add(REPO, FILE, data)
    reached, release = hub.hold_next_get(FILE, 11 * MiB)
    n = node(tmp_path, serve=[ENTRY])
    n.start()
    try:
        n.wait_for(downloading, "download progress in meshctl status", timeout=60)
        n.kill()
    finally:
        release.set()
    assert reached.is_set()
    models_dir = tmp_path / "node" / "models"
    assert files_in(models_dir) == []  # nothing half-written in the models directory
    partials = list((tmp_path / "node" / "state").rglob("*.part"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert kept > 0

    n.start()
    try:
        n.wait_model_warm(NAME, timeout=120)
        assert (models_dir / FILE).read_bytes() == data
        assert hub.requests(method="GET")[-1].range == f"bytes={kept}-"
    finally:
        n.stop()


def test_meshctl_download_fetches_a_model_and_the_scan_offers_it(hub, tmp_path):  # noqa: F811
    data = big_gguf(1)
    hub.add(REPO, FILE, data)
    n = node(tmp_path)
    n.start()
    try:
        n.wait_running()
        r = n.ctl("download", ENTRY)
        assert r.returncode == 0 and "downloading" in r.stdout, r.stdout + r.stderr
        n.wait_for(on_disk, "the downloaded model in meshctl models", timeout=60)
        assert (tmp_path / "node" / "models" / FILE).read_bytes() == data
    finally:
        n.stop()


def test_meshctl_download_too_big_is_refused_without_asking_the_hub(hub, tmp_path):  # noqa: F811
    n = node(tmp_path)
    n.config["node"]["vram_gb"] = 0.5
    n.start()
    try:
        n.wait_running()
        # a catalog model of several GB: the gate answers before any request
        r = n.ctl("download", "llama-3.1-8b-instruct-q4_k_m", check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "not downloading" in r.stderr and "needs" in r.stderr
        (refused,) = n.status()["downloads_refused"]
        assert refused["name"] == "llama-3.1-8b-instruct-q4_k_m" and "needs" in refused["reason"]
        assert hub.requests() == []
    finally:
        n.stop()


def test_meshctl_download_of_an_hf_file_too_big_answers_the_refusal(hub, tmp_path):  # noqa: F811
    """For an hf: name the size is known only after the hub's HEAD: the refusal, with its
    numbers, is still meshctl's answer (it answered "downloading", exit 0, and the log
    read "'NoneType' object has no attribute 'name'")."""
    hub.add(REPO, FILE, big_gguf(8))  # 8 MiB
    n = node(tmp_path)
    n.config["node"]["vram_gb"] = 0.001  # about 1 MiB
    n.start()
    try:
        n.wait_running()
        r = n.ctl("download", ENTRY, check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "needs" in r.stderr and "not downloading" in r.stderr, r.stderr
        assert hub.requests(method="GET") == []  # the HEAD only: nothing was fetched
        (refused,) = n.status()["downloads_refused"]
        assert refused["name"] == NAME and "needs" in refused["reason"]
        assert "NoneType" not in n.log() and "Traceback" not in n.log()
    finally:
        n.stop()


def test_a_serve_entry_whose_download_is_refused_leaves_the_node_up_and_idle(hub, tmp_path):  # noqa: F811
    """[models] serve names a file that cannot fit: the node stays up, serving nothing of its
    own, and its status says why (it used to exit 1, and systemd restarted it in a loop)."""
    hub.add(REPO, FILE, big_gguf(8))
    n = node(tmp_path, serve=[ENTRY])
    n.config["node"]["vram_gb"] = 0.001
    n.start()
    try:
        refused = n.wait_for(lambda m: m.status()["downloads_refused"], "the refusal in status", 60)
        assert refused[0]["name"] == NAME and "needs" in refused[0]["reason"]
        status = n.status()
        assert status["state"] == "running" and status["serving"] is None
        assert n.proc.poll() is None
        assert "cannot start" not in n.log()
        assert "download refused" in n.ctl("status").stdout
    finally:
        n.stop()


def test_a_catalog_serve_entry_too_big_leaves_the_node_up_idle_and_says_why(hub, tmp_path):  # noqa: F811
    """The same for a catalog name (its size is known before any request): up, idle, the
    refusal with its numbers in ``meshctl status`` (text and --json) and in the log."""
    name = "llama-3.1-8b-instruct-q4_k_m"
    n = node(tmp_path, serve=[name])
    n.config["node"]["vram_gb"] = 0.5
    n.start()
    try:
        refused = n.wait_for(lambda m: m.status()["downloads_refused"], "the refusal in status", 60)
        assert refused[0]["name"] == name and "needs" in refused[0]["reason"]
        n.wait_for(lambda m: m.status()["state"] == "running", "running", 30)
        status = json.loads(n.ctl("status", "--json").stdout)
        assert status["serving"] is None and status["downloads_refused"] == refused
        assert n.proc.poll() is None and hub.requests() == []
        assert "download refused" in n.ctl("status").stdout and "needs" in n.ctl("status").stdout
        assert f"serving nothing of its own: {name} was not downloaded" in n.log()
        assert "cannot start" not in n.log()
    finally:
        n.stop()
