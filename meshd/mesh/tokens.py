"""Invite tokens: one printable line that lets a new node join a mesh.

A token carries the mesh id, a per-token join key, the issuing node's id and
addresses, the SHA-256 of the issuer's public key (the joiner pins it, as
kubeadm pins its CA hash), an expiry time and a one-use flag::

    meshd1.<base64url( JSON body || first 4 bytes of SHA-256(JSON body) )>

The join key is random per token and stored by the issuer (``tokens.json``),
not the mesh secret itself: a joiner proves it holds the key (bound to the TLS
session, see ``meshd.mesh.peer``) and only then receives the mesh secret, so an
expired, used or revoked token grants nothing -- the issuer checks all three
before it answers.  The checksum catches a token cut short or edited by hand
with a message that says so, instead of a confusing refusal from the issuer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from meshd import jsonbounds
from meshd.config import parse_address
from meshd.mesh.wire import CloseCode
from meshd.statedir import StateDir

PREFIX = "meshd1."
CHECKSUM_BYTES = 4
KEY_BYTES = 32
# issued-token records are kept this long after they expire, so "expired" stays precise
KEEP_EXPIRED_S = 7 * 24 * 3600.0
_TOKEN_ID = re.compile(r"^[0-9a-f]{8,64}$")
_NODE_ID = re.compile(r"^[a-z2-7]{26}$")


class TokenError(Exception):
    """A token cannot be used; the message says exactly why (for the operator).

    ``code`` is what the issuer's CLOSE carries when it refuses the token, so the
    joiner tells a refusal for good from a passing failure without reading text."""

    code: ClassVar[CloseCode] = CloseCode.TOKEN_UNKNOWN


class TokenMalformed(TokenError):
    pass


class TokenExpired(TokenError):
    code = CloseCode.TOKEN_EXPIRED


class TokenRevoked(TokenError):
    code = CloseCode.TOKEN_REVOKED


class TokenUsed(TokenError):
    code = CloseCode.TOKEN_USED


class TokenUnknown(TokenError):
    code = CloseCode.TOKEN_UNKNOWN


@dataclass(frozen=True)
class Token:
    mesh_id: str
    token_id: str
    issuer: str  # the issuing node's id
    pin: bytes  # SHA-256 of the issuer's SubjectPublicKeyInfo
    addrs: tuple[str, ...]
    expires_at: float  # seconds since the epoch
    once: bool
    key: bytes  # the join key (KEY_BYTES)


def encode(token: Token) -> str:
    body = json.dumps(
        {
            "m": token.mesh_id,
            "i": token.token_id,
            "n": token.issuer,
            "p": base64.urlsafe_b64encode(token.pin).decode().rstrip("="),
            "a": list(token.addrs),
            "e": int(token.expires_at),
            "o": token.once,
            "k": base64.urlsafe_b64encode(token.key).decode().rstrip("="),
        },
        separators=(",", ":"),
    ).encode()
    blob = body + hashlib.sha256(body).digest()[:CHECKSUM_BYTES]
    return PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")


def _b64(text: str) -> bytes:
    """Strict base64url (no padding needed); binascii.Error on any other character."""
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _field(body: dict[str, Any], key: str, name: str, kind: type) -> Any:
    if key not in body:
        raise TokenMalformed(f"token has no {name}")
    value = body[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise TokenMalformed(f"token's {name} is not a {kind.__name__}: {value!r}")
    return value


def _bytes_field(body: dict[str, Any], key: str, name: str, size: int) -> bytes:
    text = _field(body, key, name, str)
    try:
        value = _b64(text)
    except (binascii.Error, ValueError):
        raise TokenMalformed(f"token's {name} is not base64url") from None
    if len(value) != size:
        raise TokenMalformed(f"token's {name} has {len(value)} bytes, expected {size}")
    return value


def decode(text: str, *, now: float | None = None) -> Token:
    """Parse a token; TokenMalformed (or TokenExpired when ``now`` is given) says why not."""
    if not isinstance(text, str):
        raise TokenMalformed("token must be a string")
    text = "".join(text.split())  # tolerate line wrapping from a terminal or an e-mail
    if not text:
        raise TokenMalformed("token is empty")
    if not text.startswith(PREFIX):
        m = re.match(r"^meshd(\d+)\.", text)
        if m:
            raise TokenMalformed(
                f"token format version {m.group(1)} is not supported by this meshd (it reads version 1)"
            )
        raise TokenMalformed(f"not a meshd invite token (it should start with {PREFIX!r})")
    payload = text[len(PREFIX):]
    if not re.fullmatch(r"[A-Za-z0-9_-]*", payload):
        bad = sorted({c for c in payload if not re.match(r"[A-Za-z0-9_-]", c)})
        raise TokenMalformed(f"token contains characters that base64url never uses: {''.join(bad)!r}")
    try:
        blob = _b64(payload)
    except (binascii.Error, ValueError):
        raise TokenMalformed("token is cut short (its base64url length is impossible)") from None
    if len(blob) <= CHECKSUM_BYTES:
        raise TokenMalformed("token is cut short (too few bytes)")
    body_bytes, checksum = blob[:-CHECKSUM_BYTES], blob[-CHECKSUM_BYTES:]
    if hashlib.sha256(body_bytes).digest()[:CHECKSUM_BYTES] != checksum:
        raise TokenMalformed(
            "token checksum does not match: it was changed or not copied in full"
        )
    try:
        body = jsonbounds.loads(body_bytes)
    except jsonbounds.JsonRefused:
        raise TokenMalformed("token body is not valid JSON (made by a different program?)") from None
    if not isinstance(body, dict):
        raise TokenMalformed("token body is not a JSON object")
    mesh_id = _field(body, "m", "mesh id", str)
    token_id = _field(body, "i", "token id", str)
    if not _TOKEN_ID.match(token_id):
        raise TokenMalformed(f"token id {token_id!r} is not lowercase hex")
    issuer = _field(body, "n", "issuer node id", str)
    if not _NODE_ID.match(issuer):
        raise TokenMalformed(f"token's issuer node id {issuer!r} is not a node id")
    pin = _bytes_field(body, "p", "certificate fingerprint", 32)
    addrs = _field(body, "a", "address list", list)
    if not addrs:
        raise TokenMalformed("token carries no address to reach the mesh at")
    for addr in addrs:
        if not isinstance(addr, str):
            raise TokenMalformed(f"token address {addr!r} is not a string")
        try:
            parse_address(addr)
        except ValueError as e:
            raise TokenMalformed(f"token address {addr!r} is not host:port ({e})") from None
    expires_at = _field(body, "e", "expiry time", int)
    if not -(2**53) <= expires_at <= 2**53:  # beyond a float (OverflowError) or any date
        raise TokenMalformed("token's expiry time is out of range")
    once = _field(body, "o", "one-use flag", bool)
    key = _bytes_field(body, "k", "join key", KEY_BYTES)
    token = Token(mesh_id, token_id, issuer, pin, tuple(addrs), float(expires_at), once, key)
    if now is not None:
        check_expiry(token, now)
    return token


def check_expiry(token: Token, now: float) -> None:
    if now >= token.expires_at:
        raise TokenExpired(
            f"token {token.token_id} expired {_ago(now - token.expires_at)} ago "
            f"({_date(token.expires_at)})"
        )


def _date(ts: float) -> str:
    """A UTC date for a message; a time the platform cannot show (OverflowError, OSError)
    is shown as seconds, never raised."""
    try:
        return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} s after the epoch"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TokenBook:
    """The tokens this node issued: expiry, one use, revocation (kept in ``tokens.json``).

    Only the issuer can check a token (the joiner pins the issuer's key, so a
    token is only ever presented to it); ``check`` is the gate.
    """

    def __init__(self, state: StateDir, *, now: Callable[[], float] = time.time):
        self._state = state
        self._now = now

    def issue(
        self,
        *,
        mesh_id: str,
        issuer: str,
        pin: bytes,
        addrs: list[str],
        ttl_s: float,
        once: bool,
    ) -> Token:
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl must be a finite number of seconds above 0, not {ttl_s}")
        if not addrs:
            raise ValueError("no address to put in the token: set [mesh] advertise")
        now = self._now()
        token = Token(
            mesh_id=mesh_id,
            token_id=secrets.token_hex(6),
            issuer=issuer,
            pin=pin,
            addrs=tuple(addrs),
            expires_at=float(int(now + ttl_s)),
            once=once,
            key=secrets.token_bytes(KEY_BYTES),
        )
        records = self._prune(self._state.load_tokens(), now)
        records[token.token_id] = {
            "key": token.key.hex(),
            "mesh_id": mesh_id,
            "created_at": now,
            "expires_at": token.expires_at,
            "once": once,
            "used_at": None,
            "revoked_at": None,
        }
        self._state.save_tokens(records)
        return token

    def revoke(self, token_id: str) -> None:
        records = self._state.load_tokens()
        record = records.get(token_id)
        if record is None:
            raise TokenUnknown(f"no token {token_id!r} was issued by this node")
        if record.get("revoked_at") is None:
            record["revoked_at"] = self._now()
            self._state.save_tokens(records)

    def check(self, token_id: str, mesh_id: str) -> bytes:
        """The join key of a usable token; TokenError says why it is not usable."""
        record = self._state.load_tokens().get(token_id)
        if record is None or record.get("mesh_id") != mesh_id:
            raise TokenUnknown(f"token {token_id} was not issued by this node for this mesh")
        now = self._now()
        if record.get("revoked_at") is not None:
            raise TokenRevoked(f"token {token_id} was revoked")
        if now >= record["expires_at"]:
            raise TokenExpired(f"token {token_id} expired {_ago(now - record['expires_at'])} ago")
        if record.get("once") and record.get("used_at") is not None:
            raise TokenUsed(f"token {token_id} was for one use and has been used")
        return bytes.fromhex(record["key"])

    def mark_used(self, token_id: str) -> None:
        records = self._state.load_tokens()
        record = records.get(token_id)
        if record is not None and record.get("used_at") is None:
            record["used_at"] = self._now()
            self._state.save_tokens(records)

    def _prune(self, records: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
        return {
            k: r
            for k, r in records.items()
            if isinstance(r, dict) and r.get("expires_at", 0) + KEEP_EXPIRED_S > now
        }
