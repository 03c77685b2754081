"""How a GGUF file's name maps to the model it is served as.

A leaf module: the scanner, the catalog and the downloader all name files
and split sets by these rules, and none of them needs the others for it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def split_name(filename: str) -> tuple[str, int, int] | None:
    """``(stem, index, count)`` for ``stem-0000i-of-0000n.gguf``, else None."""
    m = SPLIT_RE.match(filename)
    if not m:
        return None
    return m["stem"], int(m["index"]), int(m["count"])


def split_part_name(stem: str, index: int, count: int) -> str:
    """The file name of part ``index`` (1-based) of a split set of ``count``."""
    return f"{stem}-{index:05d}-of-{count:05d}.gguf"


def served_name(filename: str) -> str:
    """The model name a file is served under: its stem, without a split suffix."""
    base = os.path.basename(filename)
    parsed = split_name(base)
    if parsed:
        return parsed[0]
    return base[: -len(".gguf")] if base.lower().endswith(".gguf") else Path(base).stem
