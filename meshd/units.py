"""Sizes, in one unit: binary GiB (2**30 bytes), as GPU memory is sold and NVML counts.

Every ``_gb`` configuration key means GiB; every size a person reads (logs,
``meshctl``, the console, refusal reasons) is printed by :func:`gib` or
:func:`human_bytes` and labelled "GiB"/"MiB"/"KiB"; JSON carries exact bytes.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4


def gib(n_bytes: float) -> str:
    """``"47.0 GiB"``: how VRAM and model sizes read in logs and reasons."""
    return f"{n_bytes / GIB:.1f} GiB"


def bytes_of_gib(n_gib: float) -> int:
    """A ``_gb`` setting (GiB) in bytes."""
    return int(n_gib * GIB)


def human_bytes(n_bytes: float) -> str:
    """The largest binary unit that keeps the number readable: ``"253.4 MiB"``."""
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


def mib(n_bytes: float) -> str:
    """``"253.4 MiB"``: download progress, where a fixed unit reads better than a changing one."""
    return f"{n_bytes / MIB:.1f} MiB"
