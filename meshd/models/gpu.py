"""What memory this node offers the mesh for models ("VRAM"), and where it comes from.

Order of decision, as documented in etc/meshd.toml:

1. ``[node] vram_gb`` set: that figure (source ``"config"``), on any machine;
   the GPUs found are still listed for ``meshctl gpus``.
2. NVIDIA GPUs visible (pynvml): the sum of the *total* memory of the chosen
   GPUs (source ``"nvidia"``).  Total, not free, because our own llama-server
   fills the card once loaded and the node must not look smaller for it; the
   free figure is reported beside it.
3. Otherwise CPU inference: ``SYSTEM_RAM_SHARE`` (75 %) of ``MemTotal`` from
   /proc/meminfo (source ``"system-ram"``), leaving a quarter to the system,
   meshd and the page cache.

``[node] max_vram_gb`` then caps the advertised figure.  Every ``_gb`` setting is
GiB (2**30 bytes, ``meshd.units``), as GPU memory is counted.

Which GPUs are chosen (mesh-llm issue #1755 advertised a GPU that
``CUDA_VISIBLE_DEVICES`` hid): NVML numbers every GPU of the machine in PCI bus
order whatever ``CUDA_VISIBLE_DEVICES`` says, while CUDA only sees the devices
that variable lists.  So the visible set is resolved to NVML devices by
identity: a ``GPU-…`` entry (full UUID or unique prefix) by UUID, a number as a
physical index (the order CUDA uses with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``;
prefer UUIDs on machines with mixed GPUs).  As in CUDA, the list ends at the
first entry that names no device, and an empty value hides every GPU.
``[node] gpus`` lists physical indices (as ``nvidia-smi`` numbers them) and
narrows the visible set further.  :meth:`GpuReport.cuda_visible_devices` gives
the UUIDs of the chosen GPUs, for llama-server's environment, so the memory
advertised is the memory llama-server uses.

Missing NVIDIA library or driver is normal here: ImportError, OSError and the
``pynvml.NVMLError`` family mean "no NVIDIA", logged once at info level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from meshd.config import NodeConfig
from meshd.units import bytes_of_gib

log = logging.getLogger("meshd.models.gpu")

# share of MemTotal offered for CPU inference when there is no NVIDIA GPU
SYSTEM_RAM_SHARE = 0.75

SOURCE_NVIDIA, SOURCE_CONFIG, SOURCE_SYSTEM_RAM = "nvidia", "config", "system-ram"


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML numbers it, and whether this node uses it."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used: bool
    # why it is not used ("hidden by CUDA_VISIBLE_DEVICES", "not in [node] gpus"), else ""
    reason: str = ""


@dataclass(frozen=True)
class GpuReport:
    """The outcome of :func:`detect`: what this node advertises and why."""

    source: str
    vram_bytes: int
    # before [node] max_vram_gb; equals vram_bytes when nothing was capped
    detected_bytes: int
    # free memory of the GPUs used (None when the figure does not come from GPUs)
    free_bytes: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    # things an operator should know: no NVML, an unknown CUDA_VISIBLE_DEVICES entry, ...
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def capped(self) -> bool:
        return self.vram_bytes < self.detected_bytes

    def used_gpus(self) -> list[GpuInfo]:
        return [g for g in self.gpus if g.used]

    def cuda_visible_devices(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for llama-server: the used GPUs by UUID; None without GPUs."""
        used = self.used_gpus()
        return ",".join(g.uuid for g in used) if used else None

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``meshctl gpus --json`` and the console."""
        out = asdict(self)
        out["gpus"] = [asdict(g) for g in self.gpus]
        out["notes"] = list(self.notes)
        out["capped"] = self.capped
        return out


def _load_nvml(nvml: Any) -> tuple[Any, str]:
    """The NVML module, initialised, or (None, why not)."""
    if nvml is None:
        try:
            import pynvml
        except (ImportError, OSError) as e:
            return None, f"NVIDIA bindings not importable: {e}"
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as e:
        return None, f"no NVIDIA driver: {e}"
    return nvml, ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_gpus(nvml: Any, notes: list[str]) -> list[tuple[int, str, str, int, int]]:
    """(index, uuid, name, total, free) for every GPU NVML can read."""
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append((
                index, _text(nvml.nvmlDeviceGetUUID(handle)),
                _text(nvml.nvmlDeviceGetName(handle)), int(memory.total), int(memory.free),
            ))
        except nvml.NVMLError as e:
            notes.append(f"GPU {index}: cannot be read ({e}); not used")
    return found


def _visible(
    gpus: list[tuple[int, str, str, int, int]], environ: Mapping[str, str], notes: list[str]
) -> set[int] | None:
    """NVML indices CUDA_VISIBLE_DEVICES lets CUDA see; None when it is not set."""
    spec = environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return None
    indices = {g[0] for g in gpus}
    visible: set[int] = set()
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            match = [int(entry)] if int(entry) in indices else []
        else:
            match = [g[0] for g in gpus if g[1].startswith(entry)]
        if len(match) != 1:
            why = "no GPU" if not match else "more than one GPU"
            notes.append(
                f"CUDA_VISIBLE_DEVICES entry {entry!r} names {why}; CUDA ignores it and the rest"
            )
            break
        visible.add(match[0])
    return visible


def _choose(
    gpus: list[tuple[int, str, str, int, int]],
    node: NodeConfig,
    environ: Mapping[str, str],
    notes: list[str],
) -> list[GpuInfo]:
    visible = _visible(gpus, environ, notes)
    wanted = set(node.gpus)
    for index in sorted(wanted - {g[0] for g in gpus}):
        notes.append(f"[node] gpus: there is no GPU {index}")
    out = []
    for index, uuid, name, total, free in gpus:
        reason = ""
        if visible is not None and index not in visible:
            reason = "hidden by CUDA_VISIBLE_DEVICES"
        elif wanted and index not in wanted:
            reason = "not in [node] gpus"
        out.append(GpuInfo(index, uuid, name, total, free, used=not reason, reason=reason))
    return out


def _mem_total_bytes(meminfo_path: str) -> int | None:
    try:
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def detect(
    node: NodeConfig,
    *,
    nvml: Any = None,
    environ: Mapping[str, str] = os.environ,
    meminfo_path: str = "/proc/meminfo",
) -> GpuReport:
    """Detect the memory this node advertises; never raises for a missing GPU stack."""
    notes: list[str] = []
    nvml, why = _load_nvml(nvml)
    gpus: list[GpuInfo] = []
    if nvml is None:
        log.info("no NVIDIA GPUs: %s", why)
    else:
        try:
            gpus = _choose(_read_gpus(nvml, notes), node, environ, notes)
        except nvml.NVMLError as e:
            notes.append(f"NVML failed: {e}")
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass
    used = [g for g in gpus if g.used]
    free: int | None = None
    if node.vram_gb is not None:
        source, detected = SOURCE_CONFIG, bytes_of_gib(node.vram_gb)
    elif used:
        source = SOURCE_NVIDIA
        detected = sum(g.total_bytes for g in used)
        free = sum(g.free_bytes for g in used)
    else:
        source = SOURCE_SYSTEM_RAM
        total = _mem_total_bytes(meminfo_path)
        if total is None:
            notes.append(f"cannot read MemTotal from {meminfo_path}; advertising 0 bytes")
            total = 0
        if gpus:
            notes.append("no usable GPU chosen; using system RAM (CPU inference)")
        detected = int(total * SYSTEM_RAM_SHARE)
    vram = detected
    if node.max_vram_gb is not None:
        vram = min(vram, bytes_of_gib(node.max_vram_gb))
    for note in notes:
        log.warning("GPU detection: %s", note)
    if why:
        notes.insert(0, why)
    return GpuReport(
        source=source, vram_bytes=vram, detected_bytes=detected, free_bytes=free,
        gpus=tuple(gpus), notes=tuple(notes),
    )


def process_used_bytes(pid: int | Iterable[int], nvml: Any = None) -> int:
    """GPU memory used by process ``pid`` (or any of several) on all GPUs; 0 without NVIDIA.

    For the console's VRAM bar: how much of the card our llama-server holds.
    """
    pids = {pid} if isinstance(pid, int) else set(pid)
    nvml, _ = _load_nvml(nvml)
    if nvml is None:
        return 0
    used = 0
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                procs = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
                procs += nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
            except nvml.NVMLError:
                continue
            seen = set()
            for proc in procs:
                # a process may be listed as both compute and graphics: count it once per GPU
                if proc.pid in pids and proc.pid not in seen:
                    seen.add(proc.pid)
                    used += int(proc.usedGpuMemory or 0)
    except nvml.NVMLError:
        pass
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    return used
