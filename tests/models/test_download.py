"""Downloads against a local hub: bytes, resume, kill -9, 404s, the fit gate, the disk check.

The hub (``tests/harness/localhub.py``) runs on 127.0.0.1 and logs every request, so
"never requested" is asserted on its log.  Files that must span several of
huggingface_hub's 10 MiB read chunks (to have something on disk when the
transfer breaks) are a tiny GGUF header plus padding.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from meshd.config import Config
from meshd.models.catalog import parse_catalog
from meshd.models.download import (
    DownloadCancelled,
    Downloader,
    DownloadError,
    DownloadRefused,
    Downloads,
    _place,
    check_disk,
)
from meshd.models.scan import ModelError
from meshd.placement.rules import DownloadDecision
from meshd.units import GIB as GB
from tests.conftest import ROOT
from tests.harness.localhub import LocalHub, gguf_bytes

REPO = "acme/tiny-GGUF"
FILE = "tiny-q4_k_m.gguf"
MiB = 1024 * 1024
DiskUsage = namedtuple("DiskUsage", "total used free")


def big_gguf(mib: int = 13) -> bytes:
    """A GGUF of about ``mib`` MiB: more than one 10 MiB chunk of huggingface_hub."""
    return gguf_bytes(padding=random.Random(7).randbytes(mib * MiB))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with LocalHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def catalog_for(**entries):
    return parse_catalog({"models": entries})


def make_downloader(tmp_path, catalog, *, vram=64 * GB, min_free_gb=0.0, disk_usage=None):
    config = Config().replace("models", min_free_gb=min_free_gb)
    kwargs = {"disk_usage": disk_usage} if disk_usage else {}
    return Downloader(
        config, reactor=reactor, vram_bytes=lambda: vram, catalog=catalog,
        models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "partial"), **kwargs,
    )


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# -- success ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_catalog_model_downloads_byte_identical_under_its_catalog_name(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data)}))
    model = yield dl.download("tiny")
    assert model.name == "tiny"
    assert model.path == str(tmp_path / "models" / "tiny.gguf")
    assert Path(model.path).read_bytes() == data
    assert files_in(tmp_path / "partial") == []
    assert dl.downloads.to_status() == []


@pytest_twisted.inlineCallbacks
def test_hf_entry_with_subfolder_is_stored_under_its_file_name(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, f"Q4_K_M/{FILE}", data)
    dl = make_downloader(tmp_path, catalog_for())
    model = yield dl.download(f"hf:{REPO}/Q4_K_M/{FILE}")
    assert model.name == "tiny-q4_k_m"
    assert Path(model.path).read_bytes() == data
    assert [r.path for r in hub.requests(method="GET")] == [f"/{REPO}/resolve/main/Q4_K_M/{FILE}"]


@pytest_twisted.inlineCallbacks
def test_split_catalog_model_downloads_every_part(hub, tmp_path):
    parts = [gguf_bytes(name="p1"), gguf_bytes(name="p2", tensors=1)]
    names = ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    for name, data in zip(names, parts, strict=True):
        hub.add(REPO, name, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={
        "repo": REPO, "files": names, "size_bytes": sum(map(len, parts))}))
    model = yield dl.download("tiny")
    assert model.parts == tuple(str(tmp_path / "models" / n) for n in names)
    assert [Path(p).read_bytes() for p in model.parts] == parts
    assert model.size_bytes == sum(map(len, parts))


@pytest_twisted.inlineCallbacks
def test_model_already_in_models_dir_is_not_requested(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data)}))
    model = yield dl.download("tiny")
    assert model.path == str(tmp_path / "models" / "tiny.gguf")
    assert hub.requests() == []


@pytest_twisted.inlineCallbacks
def test_two_requests_for_one_model_share_one_transfer(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data)}))
    first, second = dl.download("tiny"), dl.download("tiny")
    a = yield first
    b = yield second
    assert a == b
    assert len(hub.requests(method="GET")) == 1


# -- resume --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    data = big_gguf()
    hub.add(REPO, FILE, data)
    # the first GET breaks after 11 MiB; huggingface_hub's own retry then gets a 503,
    # so this attempt fails with the bytes it had written kept
    hub.cut_next_get(FILE, 11 * MiB)
    hub.fail_next_gets(FILE, 503)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data)}))
    with pytest.raises(DownloadError, match="HTTP 503"):
        yield dl.download("tiny")
    partials = list((tmp_path / "partial").glob("*.part"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept <= 11 * MiB
    assert files_in(tmp_path / "models") == []

    model = yield dl.download("tiny")
    assert Path(model.path).read_bytes() == data
    assert hub.requests(method="GET")[-1].range == f"bytes={kept}-"
    assert files_in(tmp_path / "partial") == []


def run_cli(tmp_path, hub, *args, **popen):
    config = tmp_path / "meshd.toml"
    config.write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf-home"))
    cmd = [sys.executable, "-m", "meshd.cli.download", "--config", str(config),
           "--models-dir", str(tmp_path / "models"), "--cache-dir", str(tmp_path / "partial"),
           "--vram-gb", "1000", "--min-free-gb", "0", *args]
    return subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_download_killed_with_sigkill_resumes_when_restarted(hub, tmp_path):
    data = big_gguf()
    hub.add(REPO, FILE, data)
    reached, release = hub.hold_next_get(FILE, 11 * MiB)
    entry = f"hf:{REPO}/{FILE}"
    proc = run_cli(tmp_path, hub, "--progress-json", entry)
    print(f"started downloader pid {proc.pid}")
    try:
        # wait for the first chunk on disk: a progress line with bytes > 0
        for _ in range(1000):
            line = proc.stdout.readline()
            assert line, f"downloader exited early: {proc.wait()} {proc.stderr.read()}"
            if json.loads(line)["bytes"] > 0:
                break
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        release.set()
        proc.stdout.close()
        proc.stderr.close()
    assert reached.is_set()
    partials = list((tmp_path / "partial").glob("*.part"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert kept > 0
    assert files_in(tmp_path / "models") == []

    restarted = run_cli(tmp_path, hub, entry)
    print(f"restarted downloader pid {restarted.pid}")
    out, err = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, err
    target = tmp_path / "models" / FILE
    assert out.strip().splitlines()[-1] == str(target)
    assert target.read_bytes() == data
    assert hub.requests(method="GET")[-1].range == f"bytes={kept}-"
    assert files_in(tmp_path / "partial") == []


# -- errors ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_unknown_repo_is_a_clear_error_and_leaves_no_file(hub, tmp_path):
    hub.add(REPO, FILE, gguf_bytes())
    dl = make_downloader(tmp_path, catalog_for(ghost={"repo": "acme/missing-GGUF", "file": FILE,
                                                      "size_bytes": 1000}))
    with pytest.raises(DownloadError, match="repository acme/missing-GGUF not found on http://127"):
        yield dl.download("ghost")
    assert files_in(tmp_path / "models") == []
    assert files_in(tmp_path / "partial") == []
    assert [r.method for r in hub.requests()] == ["HEAD"]
    assert dl.downloads.failed_status()[0]["name"] == "ghost"


@pytest_twisted.inlineCallbacks
def test_unknown_file_in_a_known_repo_is_a_clear_error(hub, tmp_path):
    hub.add(REPO, FILE, gguf_bytes())
    dl = make_downloader(tmp_path, catalog_for())
    with pytest.raises(DownloadError, match=f"file nope.gguf not found in {REPO}"):
        yield dl.download(f"hf:{REPO}/nope.gguf")
    assert files_in(tmp_path / "models") == []


@pytest_twisted.inlineCallbacks
def test_sha256_mismatch_removes_the_partial_file(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data), "sha256": "0" * 64}))
    with pytest.raises(DownloadError, match="does not match"):
        yield dl.download("tiny")
    assert files_in(tmp_path / "models") == []
    assert files_in(tmp_path / "partial") == []


@pytest_twisted.inlineCallbacks
def test_exact_catalog_size_that_the_hub_contradicts_is_refused_before_get(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data) + 1}))
    with pytest.raises(DownloadError, match="the catalog says"):
        yield dl.download("tiny")
    assert hub.requests(method="GET") == []


@pytest_twisted.inlineCallbacks
def test_a_file_that_is_not_gguf_is_not_placed(hub, tmp_path):
    hub.add(REPO, FILE, b"<html>not a model</html>" * 10)
    dl = make_downloader(tmp_path, catalog_for())
    with pytest.raises(DownloadError, match="is not a GGUF file"):
        yield dl.download(f"hf:{REPO}/{FILE}")
    assert files_in(tmp_path / "models") == []
    assert files_in(tmp_path / "partial") == []


@pytest_twisted.inlineCallbacks
def test_entry_that_names_nothing_downloadable_is_a_model_error(hub, tmp_path):
    dl = make_downloader(tmp_path, catalog_for())
    with pytest.raises(ModelError, match="neither a catalog name"):
        yield dl.download("no-such-model")
    assert hub.requests() == []


# -- the gate and the disk ---------------------------------------------------------------


def gate_of(tmp_path, vram_bytes):
    """The downloader's own gate (no gate handed in): the placement download rule."""
    return make_downloader(tmp_path, catalog_for(), vram=vram_bytes).gate


def test_gate_allows_a_model_that_fits_with_ten_percent_to_spare(tmp_path):
    assert gate_of(tmp_path, 11 * GB)("m", 10 * GB, False).allowed


def test_gate_refuses_a_model_without_ten_percent_to_spare(tmp_path):
    decision = gate_of(tmp_path, 24 * GB)("big", 47 * GB, False)
    assert not decision.allowed
    assert decision.reason == (
        "model big (47.0 GiB) needs 51.7 GiB, node has 24.0 GiB: not downloading")


def test_gate_allows_a_model_too_big_when_split_peers_share_it(tmp_path):
    decision = gate_of(tmp_path, 24 * GB)("big", 47 * GB, True)
    assert decision.allowed and decision.reason.endswith(": split peers will share it")


@pytest_twisted.inlineCallbacks
def test_model_too_big_for_vram_is_never_requested(hub, tmp_path, caplog):
    hub.add(REPO, FILE, gguf_bytes())
    dl = make_downloader(tmp_path, catalog_for(big={"repo": REPO, "file": FILE,
                                                    "size_bytes": 47 * GB}), vram=24 * GB)
    with caplog.at_level(logging.INFO, logger="meshd.models.download"):
        with pytest.raises(DownloadRefused):
            yield dl.download("big")
    assert hub.requests() == []
    assert "model big (47.0 GiB) needs 51.7 GiB, node has 24.0 GiB: not downloading" in caplog.text
    assert [r["name"] for r in dl.downloads.refused_status()] == ["big"]
    assert files_in(tmp_path / "models") == []


@pytest_twisted.inlineCallbacks
def test_hf_entry_too_big_for_vram_is_asked_its_size_but_never_fetched(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(), vram=len(data))  # needs 1.1 x size
    with pytest.raises(DownloadRefused, match="not downloading"):
        yield dl.download(f"hf:{REPO}/{FILE}")
    assert [r.method for r in hub.requests()] == ["HEAD"]


@pytest_twisted.inlineCallbacks
def test_model_too_big_is_downloaded_when_split_peers_share_it(hub, tmp_path):
    data = gguf_bytes()
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for(tiny={"repo": REPO, "file": FILE,
                                                     "size_bytes": len(data)}), vram=1)
    model = yield dl.download("tiny", split_peers_available=True)
    assert Path(model.path).read_bytes() == data


@pytest_twisted.inlineCallbacks
def test_the_gate_handed_in_decides_and_is_asked_with_model_size_and_split(hub, tmp_path):
    hub.add(REPO, FILE, gguf_bytes())
    asked = []

    def gate(model, size_bytes, split_peers_available):
        asked.append((model, size_bytes, split_peers_available))
        return DownloadDecision(False, "plugin says no")

    dl = Downloader(Config(), reactor=reactor, gate=gate, catalog=catalog_for(
        tiny={"repo": REPO, "file": FILE, "size_bytes": 1234}),
        models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "partial"))
    with pytest.raises(DownloadRefused, match="plugin says no"):
        yield dl.download("tiny", split_peers_available=True)
    assert asked == [("tiny", 1234, True)]
    assert hub.requests() == []


@pytest_twisted.inlineCallbacks
def test_download_leaving_less_than_min_free_gb_is_refused_before_any_request(hub, tmp_path):
    hub.add(REPO, FILE, gguf_bytes())
    dl = make_downloader(
        tmp_path, catalog_for(mid={"repo": REPO, "file": FILE, "size_bytes": 2 * GB}),
        min_free_gb=5.0, disk_usage=lambda path: DiskUsage(100 * GB, 94 * GB, 6 * GB),
    )
    with pytest.raises(DownloadRefused) as info:
        yield dl.download("mid")
    assert str(info.value) == (
        f"download needs 2.0 GiB on {tmp_path / 'models'}, which has 6.0 GiB free: 4.0 GiB "
        "would be left, less than [models] min_free_gb = 5 GiB: not downloading"
    )
    assert hub.requests() == []
    assert dl.downloads.refused_status()[0]["reason"] == str(info.value)


def test_disk_check_passes_when_enough_stays_free():
    assert check_disk(2 * GB, 8 * GB, 5 * GB, "/models") is None


# -- progress -------------------------------------------------------------------------------


def test_progress_reports_bytes_rate_and_eta():
    clock = Clock()
    downloads = Downloads(clock=clock)
    downloads.start("m", total_bytes=100_000_000, have_bytes=0)
    clock.advance(10)
    downloads.update("m", 50_000_000)
    assert downloads.to_status() == [{
        "name": "m", "bytes": 50_000_000, "total_bytes": 100_000_000,
        "rate_bps": 5_000_000.0, "eta_s": 10.0, "state": "downloading",
    }]


def test_progress_rate_counts_only_bytes_fetched_since_a_resume():
    clock = Clock()
    downloads = Downloads(clock=clock)
    downloads.start("m", total_bytes=100_000_000, have_bytes=60_000_000)
    clock.advance(4)
    downloads.update("m", 80_000_000)
    assert downloads.to_status()[0]["rate_bps"] == 5_000_000.0


def test_progress_is_logged_at_each_tenth(caplog):
    clock = Clock()
    downloads = Downloads(clock=clock)
    downloads.start("m", total_bytes=1000, have_bytes=0)
    with caplog.at_level(logging.INFO, logger="meshd.models.download"):
        clock.advance(1)
        downloads.update("m", 50)   # 5 %: no line
        downloads.update("m", 120)  # crossed 10 %: a line
        downloads.update("m", 150)  # still in the same tenth: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["download m: 0.0 MiB of 0.0 MiB (12%), 0.0 MiB/s, ETA 7 s"]


@pytest_twisted.inlineCallbacks
def test_progress_of_a_real_download_reaches_the_total(hub, tmp_path):
    data = big_gguf(11)
    hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for())
    seen: list[dict] = []
    dl.downloads.listeners.append(lambda name: seen.extend(dl.downloads.to_status()))
    yield dl.download(f"hf:{REPO}/{FILE}")
    byte_counts = [row["bytes"] for row in seen]
    assert all(row["total_bytes"] == len(data) for row in seen)
    assert 0 < min(b for b in byte_counts if b) < len(data)  # a middle step was visible
    assert max(byte_counts) == len(data)


# -- the hub's conventions ---------------------------------------------------------------


@pytest.fixture
def cdn_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with LocalHub(cdn_redirect=True) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


@pytest_twisted.inlineCallbacks
def test_hf_token_goes_to_the_hub_but_not_to_the_cdn_it_redirects_to(cdn_hub, tmp_path):
    data = gguf_bytes()
    cdn_hub.add(REPO, FILE, data)
    dl = make_downloader(tmp_path, catalog_for())
    model = yield dl.download(f"hf:{REPO}/{FILE}")
    assert Path(model.path).read_bytes() == data
    head, get = cdn_hub.requests()
    assert (head.method, head.authorization) == ("HEAD", "Bearer hf_test_token")
    assert get.method == "GET" and get.path.startswith("/_cdn/")
    assert get.authorization is None


@pytest_twisted.inlineCallbacks
def test_offline_mode_never_touches_the_network(hub, tmp_path, monkeypatch):
    hub.add(REPO, FILE, gguf_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dl = make_downloader(tmp_path, catalog_for())
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        yield dl.download(f"hf:{REPO}/{FILE}")
    assert hub.requests() == []


def test_command_line_refusal_exits_3_with_the_reason(hub, tmp_path):
    hub.add(REPO, FILE, gguf_bytes())
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[models.big]\nrepo = "{REPO}"\nfile = "{FILE}"\nsize_bytes = {2000 * GB}\n')
    proc = run_cli(tmp_path, hub, "--catalog", str(catalog), "big")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert err.strip().splitlines()[-1] == (
        "model big (2000.0 GiB) needs 2200.0 GiB, node has 1000.0 GiB: not downloading")
    assert hub.requests() == []


@pytest_twisted.inlineCallbacks
def test_cancel_all_stops_a_transfer_and_keeps_its_bytes_for_the_next_start(hub, tmp_path):
    data = big_gguf()
    hub.add(REPO, FILE, data)
    _, release = hub.hold_next_get(FILE, 11 * MiB)
    dl = make_downloader(tmp_path, catalog_for())

    def on_change(name):
        rows = dl.downloads.to_status()
        if rows and rows[0]["bytes"] > 0 and not release.is_set():
            dl.cancel_all()
            release.set()  # the next chunk arrives and meets the cancel

    dl.downloads.listeners.append(on_change)
    with pytest.raises(DownloadCancelled):
        yield dl.download(f"hf:{REPO}/{FILE}")
    assert dl.downloads.to_status() == [] and dl.downloads.failed_status() == []
    kept = [p.stat().st_size for p in (tmp_path / "partial").glob("*.part")]
    assert len(kept) == 1 and 0 < kept[0] < len(data)
    assert files_in(tmp_path / "models") == []


def test_placing_across_file_systems_copies_then_renames(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp dir")
    partial = Path(tempfile.mkstemp(dir=shm, suffix=".part")[1])
    partial.write_bytes(b"GGUF model bytes")
    target = tmp_path / "m.gguf"
    try:
        _place(str(partial), str(target))
    finally:
        partial.unlink(missing_ok=True)
    assert target.read_bytes() == b"GGUF model bytes"
    assert not partial.exists()
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_placing_never_replaces_an_existing_model(tmp_path):
    partial = tmp_path / "x.part"
    partial.write_bytes(b"new")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(DownloadError, match="already exists"):
        _place(str(partial), str(tmp_path / "m.gguf"))
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
