"""A node's name: what people call the machine (``[node] name``, the host name by default).

The node id stays the identity -- placement, tie-breaks, connections and the
routing table all key on it.  The name is only for people: it is shown first
wherever a node appears (``meshctl status`` and ``peers``, the console, log lines
about peers) with the id beside it, so two nodes with one name are both shown and
told apart by id.  Every place formats a node with :func:`label`.

A name that came from a peer is untrusted text that ends up in log lines,
terminals and a web page.  :func:`clean` bounds its length and drops every
character that is not printable (control characters, escape sequences, line and
paragraph separators, bidi overrides), so a peer cannot forge a log line or move
a terminal's cursor; the console puts it on the page as text, never as HTML.  A
peer that sends no name (an older meshd during a rolling upgrade) is shown by its
id alone.
"""

from __future__ import annotations

import socket

MAX_CHARS = 64  # a host name's first label is at most 63; room for a little more
FALLBACK = "meshd"  # the default when the host has no usable name


def problem(name: object) -> str | None:
    """Why ``name`` cannot be a ``[node] name``; None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "must not be empty"
    if len(name) > MAX_CHARS:
        return f"{len(name)} characters is too long (at most {MAX_CHARS})"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"holds a character that is not printable ({bad!r})"
    if name != name.strip():
        return "must not begin or end with white space"
    return None


def clean(raw: object) -> str:
    """A name received from a peer, safe to log and show; ``""`` when it sent none usable.

    Non-printable characters are dropped (not replaced: a name is a label, not a
    record of what was sent), white space at either end is removed, and the rest
    is cut to :data:`MAX_CHARS`.  Never raises: a bad name is no reason to refuse
    a peer.
    """
    if not isinstance(raw, str):
        return ""
    text = "".join(c for c in raw[: MAX_CHARS * 4] if c.isprintable())
    return text.strip()[:MAX_CHARS].strip()


def label(name: str | None, node_id: str | None) -> str:
    """A node for logs and people: ``"gpu-box-2 (01HX...)"``, or the id alone without a name."""
    node = node_id or "?"
    return f"{name} ({node})" if name else node


def default_name() -> str:
    """The host name, made a valid ``[node] name`` (:data:`FALLBACK` when it is unusable)."""
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    name = clean(host)
    return name if problem(name) is None else FALLBACK
