"""JSON from outside, parsed within bounds: one function for every door.

``json.loads`` recurses once per nested array or object, so a kilobyte of
``[[[[...`` raises ``RecursionError`` -- not a ``ValueError``, so no door's
"not valid JSON" answer caught it: a HELLO printed a CRITICAL traceback, the
control socket a 500.  :func:`loads` turns every way a document can be
unacceptable (too big, too deep, not JSON, ``NaN``) into :class:`JsonRefused`,
a ``ValueError``, so each door answers with its normal "bad JSON" error.

Used for peer frames (``meshd.mesh.wire.decode_json``, which carries the routing
table and every gossip frame), the control socket, invite tokens and the state
files.  The client API's body (``meshd.serving.api``) should call it too.
"""

from __future__ import annotations

import json
from typing import Any

# Deeper than anything meshd or an OpenAI client sends (a tool's JSON schema is a
# dozen levels), far below the ~1000 frames where CPython's parser gives up.
MAX_DEPTH = 64


class JsonRefused(ValueError):
    """The document is not acceptable JSON; the message says why (for the sender)."""


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON value")


def loads(data: bytes | str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH,
          allow_nan: bool = False) -> Any:
    """``data`` parsed, or :class:`JsonRefused` (a ``ValueError``) saying why not.

    ``max_bytes``: refuse a longer document before parsing it.  ``max_depth``:
    arrays and objects nested deeper than this are refused (a scalar is depth 0).
    ``allow_nan``: accept Python's ``NaN``/``Infinity`` extension (what
    ``json.dumps`` writes for such floats); otherwise only standard JSON.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonRefused(f"JSON document of {len(data)} bytes, the limit is {max_bytes}")
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonRefused(f"not UTF-8: {e}") from None
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except RecursionError:
        raise JsonRefused(f"JSON nested deeper than {max_depth} levels") from None
    except JsonRefused:
        raise
    except ValueError as e:
        raise JsonRefused(str(e)) from None
    if depth_exceeds(value, max_depth):
        raise JsonRefused(f"JSON nested deeper than {max_depth} levels")
    return value


def depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether parsed JSON nests deeper than ``max_depth``; iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth + 1 > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False
