"""The fit rule, once: how much VRAM a model needs, and the download gate built on it.

A model needs its file size times :data:`FIT_FACTOR` of VRAM: the rest is the
KV cache and compute buffers.  The default policy plugin (solo or split,
assignment, promotion, ``meshd_allow_download``), the election's "need X,
have Y" and the downloader's gate all ask this module, so a node never
downloads a model that the election would then refuse to run.

A leaf module (units only), so plugins may import it freely.
"""

from __future__ import annotations

from meshd.units import gib

# a model fits a node when its VRAM is at least the model's size times this
FIT_FACTOR = 1.1

# why the built-in download gate said what it said (the end of its reason line)
BECAUSE_FITS = "it fits"
BECAUSE_SPLIT = "split peers will share it"
BECAUSE_NO = "not downloading"


def needed_bytes(size_bytes: int) -> int:
    """The VRAM a model of ``size_bytes`` needs, rounded to a byte."""
    return int(size_bytes * FIT_FACTOR + 0.5)


def fits(vram_bytes: int, size_bytes: int | None) -> bool:
    """A node with ``vram_bytes`` runs a model of ``size_bytes`` alone (None: size unknown, no)."""
    return size_bytes is not None and vram_bytes >= size_bytes * FIT_FACTOR


def download_allowed(size_bytes: int, vram_bytes: int, split_peers_available: bool) -> bool:
    """The download gate: only what fits, unless split peers will hold shares of it."""
    return fits(vram_bytes, size_bytes) or split_peers_available


def download_reason(model: str, size_bytes: int, vram_bytes: int, allowed: bool) -> str:
    """The gate's decision as operators read it in the log and ``meshctl status``:
    ``model NAME (47.0 GiB) needs 51.7 GiB, node has 24.0 GiB: not downloading``."""
    numbers = (f"model {model} ({gib(size_bytes)}) needs {gib(needed_bytes(size_bytes))}, "
               f"node has {gib(vram_bytes)}")
    if not allowed:
        return f"{numbers}: {BECAUSE_NO}"
    return f"{numbers}: {BECAUSE_FITS if fits(vram_bytes, size_bytes) else BECAUSE_SPLIT}"
