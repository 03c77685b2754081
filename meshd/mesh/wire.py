"""Frames on a peer connection: length-prefixed, typed, bounded.

This module knows bytes and frame types only -- nothing of gossip or of who a
peer is -- so the parser can be tested alone (``tests/mesh/test_wire.py``, with
hypothesis) and a malformed stream can only ever close *one* connection.

One frame on the wire (all integers big-endian)::

    +----------------+---------+-----------------------------+
    | length: uint32 | type: u8| payload: length - 1 bytes   |
    +----------------+---------+-----------------------------+

``length`` counts the type byte and the payload, so the smallest frame is
``00 00 00 01 TT``.  ``length`` above the connection's ``max_frame_bytes``
(``[mesh] max_frame_bytes``, default 1 MiB) is an error *before* the payload is
buffered, so a peer cannot make us hold more than one maximum frame.

Control frames carry a UTF-8 JSON object; PING and PONG carry a fixed binary
body so an idle mesh stays nearly silent.  ``docs/protocol.md`` is the
reference for each type.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from meshd import jsonbounds

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IB")
LENGTH = struct.Struct(">I")
PING_BODY = struct.Struct(">I")  # sequence number; PONG echoes it
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


class FrameType(enum.IntEnum):
    """Known frame types.  A receiver ignores types it does not know (newer peers)."""

    HELLO = 1  # first frame each way: version, who I am, proof of the secret
    WELCOME = 2  # issuer -> token joiner: the mesh id and secret
    CLOSE = 3  # "I am closing this connection, because ..." (JSON {"reason", "code"?}, see CloseCode)
    PING = 4  # binary seq; answered at once by PONG
    PONG = 5  # binary seq echoed
    ANNOUNCE = 6  # a node's own description (JSON)
    MEMBERS = 7  # digest of nodes the sender is connected to (JSON)
    PEER_DOWN = 8  # "I found X dead" (JSON {"node_id", "incarnation", "reason"})
    LEAVING = 9  # "I am leaving the mesh" (JSON {"incarnation"})
    READY = 10  # client -> server after HELLOs: "your HELLO checks out", empty
    DROP = 11  # "stop serving this model mesh-wide" (JSON {"model", "id", "origin", "version"?}), forwarded once
    TUNNEL = 12  # first frame each way on an "http" tunnel: {"model"} / {"ok"} or {"error"}
    ROUTE_REQUEST = 13  # passive -> active on a "route" connection: check-in (JSON, meshd.serving.routetable.CheckIn)
    ROUTE_TABLE = 14  # active -> passive: the routing table, or {"etag", "same": true} (meshd.serving.routetable)
    # the mesh's drop/serve decisions (JSON {"models": {name: {"state", "version", "by", "at"}}},
    # meshd.mesh.desired): all of them on open, what changed when it changes; older peers ignore it
    DESIRED = 15


class CloseCode(enum.StrEnum):
    """Why a connection was closed, for the machine; the CLOSE frame's ``reason`` is for people.

    The code travels in the optional ``code`` key of the CLOSE body.  A peer that
    predates codes ignores the key; a CLOSE without one (from such a peer) is
    classified from its text by :func:`legacy_close_code`, the only place that
    reads a reason's words.  A code this node does not know (a newer peer) is
    ``OTHER``: nothing to act on, the reason is still logged.
    """

    OTHER = "other"  # nothing a machine acts on: read the reason
    PROTOCOL_ERROR = "protocol-error"  # a malformed or unexpected frame
    BAD_HELLO = "bad-hello"  # a HELLO that is not one (missing fields, not JSON)
    VERSION_MISMATCH = "version-mismatch"  # no protocol version both sides speak
    # wrong proof, certificate or node id; and every refusal of a peer that has not
    # proven a key (it learns no mesh id or token state: meshd.mesh.peer)
    AUTH_FAILED = "auth-failed"
    WRONG_MESH = "wrong-mesh"  # the peer is in another mesh, or in none yet
    TOKEN_UNKNOWN = "token-unknown"  # the invite token was not issued here for this mesh
    TOKEN_REVOKED = "token-revoked"
    TOKEN_EXPIRED = "token-expired"
    TOKEN_USED = "token-used"  # a one-use token presented a second time
    TOKEN_NOT_ALLOWED = "token-not-allowed"  # a token cannot open this purpose
    UNSUPPORTED_PURPOSE = "unsupported-purpose"  # this node serves no such connections
    DUPLICATE = "duplicate"  # the same pair is connected twice; the other one is kept
    LEAVING = "leaving"  # the sender is leaving the mesh
    STOPPING = "stopping"  # the sender (or this part of it) is stopping
    TIMEOUT = "timeout"  # a handshake or an answer did not come in time


# the issuer will never accept this token: trying it again is pointless
TOKEN_REFUSALS = frozenset({CloseCode.TOKEN_UNKNOWN, CloseCode.TOKEN_REVOKED,
                            CloseCode.TOKEN_EXPIRED, CloseCode.TOKEN_USED})
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class Close:
    """A CLOSE frame's body: the reason for the log, the code for the code."""

    reason: str
    code: CloseCode


def encode_close_body(reason: str, code: CloseCode) -> dict[str, Any]:
    return {"reason": reason[:MAX_REASON_CHARS], "code": code.value}


def decode_close(payload: bytes) -> Close:
    """A CLOSE body, never an error: the peer is going away, whatever it sent."""
    try:
        body = decode_json(payload)
    except FrameError:
        return Close("(unreadable reason)", CloseCode.OTHER)
    raw = body.get("reason")
    reason = str(raw)[:MAX_REASON_CHARS] if raw else "(no reason given)"
    code = body.get("code")
    if not isinstance(code, str):
        return Close(reason, legacy_close_code(reason))  # a peer older than codes
    try:
        return Close(reason, CloseCode(code))
    except ValueError:
        return Close(reason, CloseCode.OTHER)  # a newer peer's code


# the words version-1 peers without codes wrote, and the code each meant (first match)
_LEGACY_PHRASES = (
    ("duplicate connection", CloseCode.DUPLICATE),
    ("revoked", CloseCode.TOKEN_REVOKED),
    ("expired", CloseCode.TOKEN_EXPIRED),
    ("one use", CloseCode.TOKEN_USED),
    ("not issued by", CloseCode.TOKEN_UNKNOWN),
    ("leaving the mesh", CloseCode.LEAVING),
)


def legacy_close_code(reason: str) -> CloseCode:
    """The code a peer older than codes meant, from the words its version wrote.

    Kept for rolling upgrades, and only here: every other decision reads the code.
    """
    return next((code for phrase, code in _LEGACY_PHRASES if phrase in reason), CloseCode.OTHER)


class FrameError(Exception):
    """The stream is not a valid frame sequence; the connection must be closed."""


class FrameTooLarge(FrameError):
    pass


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object; FrameError when it is not one."""
        return decode_json(self.payload)


def encode(frame_type: int, payload: bytes = b"", *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """One frame as bytes; FrameTooLarge when it would exceed ``max_frame_bytes``."""
    if not 0 <= frame_type <= 255:
        raise ValueError(f"frame type {frame_type} does not fit in one byte")
    length = 1 + len(payload)
    if length > max_frame_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_frame_bytes}")
    return HEADER.pack(length, frame_type) + payload


def dump_json(body: dict[str, Any]) -> bytes:
    """A JSON payload, compact (an idle mesh's bytes matter)."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def encode_json(frame_type: int, body: dict[str, Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    return encode(frame_type, dump_json(body), max_frame_bytes=max_frame_bytes)


def decode_json(payload: bytes) -> dict[str, Any]:
    """A JSON object from a peer, nested at most ``jsonbounds.MAX_DEPTH`` deep (a HELLO of
    nested brackets is a FrameError, never a RecursionError); ``NaN`` is accepted, as
    ``dump_json`` writes it."""
    try:
        body = jsonbounds.loads(payload, allow_nan=True)
    except jsonbounds.JsonRefused as e:
        raise FrameError(f"payload is not UTF-8 JSON: {e}") from None
    if not isinstance(body, dict):
        raise FrameError(f"payload is JSON {type(body).__name__}, expected an object")
    return body


def encode_ping(frame_type: int, seq: int) -> bytes:
    return encode(frame_type, PING_BODY.pack(seq & 0xFFFFFFFF))


def decode_ping(payload: bytes) -> int:
    """The sequence number of a PING/PONG; extra trailing bytes (newer peers) are ignored."""
    if len(payload) < PING_BODY.size:
        raise FrameError(f"ping body of {len(payload)} bytes, expected at least {PING_BODY.size}")
    return PING_BODY.unpack_from(payload)[0]


class Decoder:
    """Incremental frame parser: feed bytes, get whole frames.

    Raises only FrameError (or its subclass FrameTooLarge); after an error the
    decoder is poisoned and every later ``feed`` raises again, so a caller that
    forgot to close cannot parse garbage as frames.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """Hand over the unparsed bytes (for a connection switching to a raw stream)."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Frames completed by ``data``, in order.  A generator: consume it fully."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        while len(self._buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buffer)
            if length == 0:
                self._error = FrameError("frame of length 0 (no type byte)")
                raise self._error
            if length > self.max_frame_bytes:
                self._error = FrameTooLarge(
                    f"frame of {length} bytes announced, the limit is {self.max_frame_bytes}"
                )
                raise self._error
            end = LENGTH.size + length
            if len(self._buffer) < end:
                return
            frame = Frame(self._buffer[LENGTH.size], bytes(self._buffer[LENGTH.size + 1 : end]))
            del self._buffer[:end]
            yield frame
