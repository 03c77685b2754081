"""The one hash every node agrees on, for spreading clients over hosts.

A leaf module, so both the default policy (which host serves a client) and
the route table (which active node a passive node checks in with first) use
the same rule without the table depending on a plugin.
"""

from __future__ import annotations

import hashlib


def stable_index(client_id: str, model: str, n: int) -> int:
    """``hash(client_id + model) % n`` with a hash that is the same on every machine.

    Python's ``hash()`` of a str is salted per process, so two nodes (or two
    runs) would disagree; the first 8 bytes of SHA-256 do not.
    """
    digest = hashlib.sha256((client_id + model).encode()).digest()
    return int.from_bytes(digest[:8], "big") % n
