"""VRAM detection: a fake NVML stands in for the library; the no-NVIDIA path is real."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from meshd.config import NodeConfig
from meshd.models import gpu
from meshd.units import GIB

GB = GIB
UUID0 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID1 = "GPU-a1b2c3d4-0000-1111-2222-333344445555"


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Two GPUs: 24 GiB idle, and 8 GiB with 6 GiB in use by pid 4242 (the "busy" one)."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus=None, fail_init=False):
        self.gpus = gpus if gpus is not None else [
            {"uuid": UUID0, "name": "NVIDIA GeForce RTX 4090", "total": 24 * GB,
             "free": 23 * GB, "procs": []},
            {"uuid": UUID1, "name": b"NVIDIA GeForce RTX 3070", "total": 8 * GB,
             "free": 2 * GB, "procs": [(4242, 6 * GB), (7, None)]},
        ]
        self.fail_init = fail_init
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h["procs"]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []


@pytest.fixture
def meminfo(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       16384000 kB\nMemFree:         1000000 kB\n")
    return str(path)


def detect(node=None, nvml=None, environ=None, meminfo_path="/nonexistent"):
    return gpu.detect(node or NodeConfig(), nvml=nvml or FakeNVML(), environ=environ or {},
                      meminfo_path=meminfo_path)


def test_two_gpus_advertise_the_sum_of_their_totals_and_report_free():
    report = detect()
    assert report.source == "nvidia"
    assert report.vram_bytes == 32 * GB
    assert report.free_bytes == 25 * GB
    assert [(g.index, g.name, g.total_bytes, g.free_bytes) for g in report.gpus] == [
        (0, "NVIDIA GeForce RTX 4090", 24 * GB, 23 * GB),
        (1, "NVIDIA GeForce RTX 3070", 8 * GB, 2 * GB),
    ]
    assert report.cuda_visible_devices() == f"{UUID0},{UUID1}"


def test_nvml_is_shut_down_after_detection():
    nvml = FakeNVML()
    detect(nvml=nvml)
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_cuda_visible_devices_by_index_advertises_only_that_gpu():
    report = detect(environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert report.vram_bytes == 8 * GB
    assert [g.used for g in report.gpus] == [False, True]
    assert report.gpus[0].reason == "hidden by CUDA_VISIBLE_DEVICES"


def test_cuda_visible_devices_by_uuid_and_uuid_prefix():
    assert detect(environ={"CUDA_VISIBLE_DEVICES": UUID1}).vram_bytes == 8 * GB
    assert detect(environ={"CUDA_VISIBLE_DEVICES": "GPU-8932f937"}).vram_bytes == 24 * GB


def test_cuda_visible_devices_stops_at_the_first_unknown_entry_as_cuda_does():
    report = detect(environ={"CUDA_VISIBLE_DEVICES": "0,7,1"})
    assert report.vram_bytes == 24 * GB
    assert any("'7'" in note for note in report.notes)


def test_empty_cuda_visible_devices_hides_every_gpu_and_falls_back_to_ram(meminfo):
    report = detect(environ={"CUDA_VISIBLE_DEVICES": ""}, meminfo_path=meminfo)
    assert report.source == "system-ram"
    assert not report.used_gpus()
    assert report.cuda_visible_devices() is None
    assert report.vram_bytes == int(16384000 * 1024 * gpu.SYSTEM_RAM_SHARE)


def test_node_gpus_chooses_physical_indices():
    report = detect(NodeConfig(gpus=[0]))
    assert report.vram_bytes == 24 * GB
    assert report.gpus[1].reason == "not in [node] gpus"
    assert report.cuda_visible_devices() == UUID0


def test_node_gpus_naming_a_missing_gpu_is_a_note_not_an_error():
    report = detect(NodeConfig(gpus=[1, 5]))
    assert report.vram_bytes == 8 * GB
    assert any("no GPU 5" in note for note in report.notes)


def test_node_gpus_intersects_with_cuda_visible_devices():
    report = detect(NodeConfig(gpus=[0]), environ={"CUDA_VISIBLE_DEVICES": UUID1})
    assert report.used_gpus() == []


def test_max_vram_gb_caps_the_advertised_figure():
    report = detect(NodeConfig(max_vram_gb=10))
    assert report.vram_bytes == 10 * GB
    assert report.detected_bytes == 32 * GB
    assert report.capped


def test_max_vram_gb_above_detection_changes_nothing():
    report = detect(NodeConfig(max_vram_gb=100))
    assert report.vram_bytes == 32 * GB
    assert not report.capped


def test_vram_gb_overrides_detection_on_a_gpu_machine_and_still_lists_gpus():
    report = detect(NodeConfig(vram_gb=12.5))
    assert report.source == "config"
    assert report.vram_bytes == int(12.5 * GB)
    assert len(report.gpus) == 2


def test_vram_gb_is_capped_by_max_vram_gb():
    assert detect(NodeConfig(vram_gb=12, max_vram_gb=4)).vram_bytes == 4 * GB


def test_driver_missing_means_system_ram_share(meminfo):
    report = detect(nvml=FakeNVML(fail_init=True), meminfo_path=meminfo)
    assert report.source == "system-ram"
    assert report.gpus == ()
    assert report.vram_bytes == int(16384000 * 1024 * 0.75)
    assert "Driver Not Loaded" in report.notes[0]


def test_unreadable_meminfo_advertises_zero_with_a_note():
    report = detect(nvml=FakeNVML(fail_init=True), meminfo_path="/nonexistent/meminfo")
    assert report.vram_bytes == 0
    assert any("MemTotal" in note for note in report.notes)


def test_a_gpu_that_cannot_be_read_is_skipped():
    nvml = FakeNVML()

    def broken(h):
        if h["uuid"] == UUID0:
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(total=h["total"], free=h["free"])

    nvml.nvmlDeviceGetMemoryInfo = broken
    report = detect(nvml=nvml)
    assert report.vram_bytes == 8 * GB
    assert [g.index for g in report.gpus] == [1]


def _nvidia_present() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


no_nvidia = pytest.mark.skipif(_nvidia_present(), reason="this machine has an NVIDIA driver")
with_nvidia = pytest.mark.skipif(not _nvidia_present(), reason="no NVIDIA driver here")


@no_nvidia
def test_this_machine_without_nvidia_falls_back_to_system_ram():
    """The real pynvml import on a machine with no NVIDIA driver: no exception."""
    report = gpu.detect(NodeConfig(), environ={})
    assert report.source == "system-ram"
    assert report.vram_bytes > 0
    assert report.vram_bytes == report.detected_bytes
    assert report.notes


@no_nvidia
def test_this_machine_vram_gb_is_used_without_nvidia():
    report = gpu.detect(NodeConfig(vram_gb=3), environ={})
    assert (report.source, report.vram_bytes) == ("config", 3 * GB)


def test_report_to_dict_is_json():
    data = json.loads(json.dumps(detect(NodeConfig(max_vram_gb=10)).to_dict()))
    assert data["source"] == "nvidia"
    assert data["vram_bytes"] == 10 * GB
    assert data["capped"] is True
    assert data["gpus"][1]["uuid"] == UUID1
    assert set(data["gpus"][0]) >= {"index", "name", "total_bytes", "free_bytes", "used"}


def test_process_used_bytes_sums_our_pid_over_gpus():
    assert gpu.process_used_bytes(4242, nvml=FakeNVML()) == 6 * GB
    assert gpu.process_used_bytes(4243, nvml=FakeNVML()) == 0


def test_process_used_bytes_treats_unknown_usage_as_zero():
    assert gpu.process_used_bytes(7, nvml=FakeNVML()) == 0


def test_process_used_bytes_without_nvidia_is_zero():
    assert gpu.process_used_bytes(4242, nvml=FakeNVML(fail_init=True)) == 0


@no_nvidia
def test_process_used_bytes_on_this_machine_without_nvidia_is_zero():
    assert gpu.process_used_bytes(1) == 0


@with_nvidia
def test_real_nvidia_gpus_are_reported_with_their_memory():
    """On a GPU machine: the real NVML, each GPU's total as nvidia-smi shows it."""
    import subprocess

    report = gpu.detect(NodeConfig(), environ={})
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip().splitlines()
    expected = {int(i): (u.strip(), int(m) * 1024**2) for i, u, m in (r.split(",") for r in smi)}
    assert report.source == "nvidia"
    assert {g.index: g.uuid for g in report.gpus} == {i: u for i, (u, _) in expected.items()}
    for g in report.gpus:  # nvidia-smi rounds to MiB
        assert abs(g.total_bytes - expected[g.index][1]) < 1024**2
    assert report.vram_bytes == sum(g.total_bytes for g in report.gpus)
    one = report.gpus[0].uuid
    assert gpu.detect(NodeConfig(), environ={"CUDA_VISIBLE_DEVICES": one}).vram_bytes == (
        report.gpus[0].total_bytes
    )
