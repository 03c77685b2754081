"""The state directory's layout, owned by this one module (as Tahoe-LAFS does).

Everything a node must keep across restarts lives here, each file written
atomically (temporary file, fsync, rename) with mode 0600, because a crash
half-way through writing the mesh secret must not leave a node that can neither
rejoin nor create a new identity.

    identity/key.pem     the node's private key (PEM, PKCS#8)
    identity/cert.pem    its self-signed certificate (names the node id)
    mesh.json            {"mesh_id", "secret"}: the mesh this node belongs to
    peers.json           {"bootstrap": [...], "known": [...]}: where to rejoin
    tokens.json          invite tokens this node issued (keys, expiry, use, revocation)
    desired.json         the mesh's drop/serve decisions (meshd.mesh.desired), so a
                         restarted node honours them before it hears a peer
    incarnation          a counter bumped at every start (SWIM refutation)
    node_id              the node id of identity/, one line (so a lost identity/ is named)

Every file is validated when it is read (:meth:`StateDir.check` reads them all at
start): a file meshd did not write, or a half-restored backup, stops the start with
one line that names the file, what is wrong and what to do -- never a traceback at
first use, and never a mesh secret too short to keep strangers out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd import jsonbounds
from meshd.errors import StartupError
from meshd.mesh import desired
from meshd.mesh.desired import Decision

log = logging.getLogger("meshd.statedir")

FILE_MODE = 0o600
DIR_MODE = 0o700
# a mesh secret is an HMAC key: meshd makes 32 random bytes; fewer (an empty one!) is
# refused, from mesh.json and from a WELCOME
MIN_SECRET_BYTES = 32
MAX_MESH_ID_CHARS = 128
_TOKEN_KEY = re.compile(r"^[0-9a-f]{64}$")
_MESH_FIX = ("restore it from a backup, or remove it and start with a token from a member "
             "([mesh] join or meshd --join; without one the node founds a new mesh)")
_PEERS_FIX = "remove it (meshd writes it again; until then it rejoins only through [mesh] join)"
_DESIRED_FIX = ("remove it: this node learns the mesh's drop/serve decisions again from its "
                "peers (a node alone forgets its drops; drop again with meshctl drop)")
_TOKENS_FIX = ("remove it: every token this node issued stops working "
               "(issue new ones with meshctl token)")


class StateDirError(StartupError):
    """A state file cannot be read, written or used; the message names the file, what is
    wrong and what to do (at start: one line, and the daemon does not start)."""


@dataclass(frozen=True)
class MeshState:
    mesh_id: str
    secret: bytes


def mesh_problem(mesh_id: object, secret: bytes) -> str | None:
    """Why ``(mesh_id, secret)`` cannot be a mesh, or None: from mesh.json or a WELCOME."""
    if not isinstance(mesh_id, str) or not mesh_id.strip():
        return "the mesh id is missing or empty"
    if len(mesh_id) > MAX_MESH_ID_CHARS or not mesh_id.isprintable():
        return f"the mesh id {mesh_id[:40]!r} is not a mesh id"
    if len(secret) < MIN_SECRET_BYTES:
        what = "empty" if not secret else f"{len(secret)} bytes"
        return (f"the mesh secret is {what}; it must be at least {MIN_SECRET_BYTES} "
                "random bytes (a short one lets a stranger join)")
    return None


@dataclass(frozen=True)
class KnownNode:
    """A node we may reconnect to: its id (the pin) and where it listened."""

    node_id: str
    addrs: tuple[str, ...]


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- paths ----------------------------------------------------------------

    @property
    def key_path(self) -> Path:
        return self.path / "identity" / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.path / "identity" / "cert.pem"

    def _file(self, name: str) -> Path:
        return self.path / name

    # -- primitives -----------------------------------------------------------

    def ensure(self) -> None:
        for d in (self.path, self.path / "identity"):
            d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically, mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StateDirError(f"cannot write {path}: {e.strerror}") from None

    def read_bytes(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateDirError(f"cannot read {path}: {e.strerror}") from None

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(self._file(name))
        if data is None:
            return None
        try:
            return jsonbounds.loads(data, allow_nan=True)
        except jsonbounds.JsonRefused as e:
            raise StateDirError(f"{self._file(name)} is not valid JSON ({e}); move it away") from None

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(self._file(name), json.dumps(value, indent=1, sort_keys=True).encode())

    # -- the mesh ---------------------------------------------------------------

    def load_mesh(self) -> MeshState | None:
        data = self.read_json("mesh.json")
        if data is None:
            return None
        path = self._file("mesh.json")
        if not isinstance(data, dict):
            raise StateDirError(f"{path}: expected a JSON object with mesh_id and secret, "
                                f"found {_json_type(data)}; {_MESH_FIX}")
        secret_hex = data.get("secret")
        try:
            secret = bytes.fromhex(secret_hex) if isinstance(secret_hex, str) else None
        except ValueError:
            secret = None
        if secret is None:
            raise StateDirError(f"{path}: the mesh secret is missing or not hex; {_MESH_FIX}")
        problem = mesh_problem(data.get("mesh_id"), secret)
        if problem is not None:
            raise StateDirError(f"{path}: {problem}; {_MESH_FIX}")
        return MeshState(data["mesh_id"], secret)

    def save_mesh(self, mesh: MeshState) -> None:
        self.write_json("mesh.json", {"mesh_id": mesh.mesh_id, "secret": mesh.secret.hex()})

    def new_mesh(self) -> MeshState:
        """Create (and store) a new mesh: a random id and a 32-byte secret."""
        mesh = MeshState(secrets.token_hex(8), secrets.token_bytes(32))
        self.save_mesh(mesh)
        return mesh

    # -- where to rejoin ----------------------------------------------------------

    def load_peers(self) -> tuple[list[KnownNode], list[KnownNode]]:
        """(bootstrap nodes from the token we joined with, peers we knew)."""
        data = self.read_json("peers.json")
        if data is None:
            return [], []
        path = self._file("peers.json")
        if not isinstance(data, dict):
            raise StateDirError(f"{path}: expected a JSON object with bootstrap and known "
                                f"lists, found {_json_type(data)}; {_PEERS_FIX}")

        def nodes(key: str) -> list[KnownNode]:
            items = data.get(key, [])
            if not isinstance(items, list):
                raise StateDirError(f"{path}: {key!r} is {_json_type(items)}, expected a list; "
                                    f"{_PEERS_FIX}")
            out = []
            for i, item in enumerate(items):
                node_id = item.get("node_id") if isinstance(item, dict) else None
                addrs = item.get("addrs") if isinstance(item, dict) else None
                if (not isinstance(node_id, str) or not isinstance(addrs, list)
                        or not all(isinstance(a, str) for a in addrs)):
                    raise StateDirError(f"{path}: {key}[{i}] is not {{\"node_id\": a string, "
                                        f"\"addrs\": a list of strings}}; {_PEERS_FIX}")
                out.append(KnownNode(node_id, tuple(addrs)))
            return out

        return nodes("bootstrap"), nodes("known")

    def save_peers(self, bootstrap: list[KnownNode], known: list[KnownNode]) -> None:
        def dump(nodes: list[KnownNode]) -> list[dict]:
            return [{"node_id": n.node_id, "addrs": list(n.addrs)} for n in nodes]

        self.write_json("peers.json", {"bootstrap": dump(bootstrap), "known": dump(known)})

    # -- issued tokens ------------------------------------------------------------

    def load_tokens(self) -> dict[str, dict[str, Any]]:
        data = self.read_json("tokens.json")
        if data is None:
            return {}
        path = self._file("tokens.json")
        if not isinstance(data, dict):
            raise StateDirError(f"{path}: expected a JSON object of issued tokens, found "
                                f"{_json_type(data)}; {_TOKENS_FIX}")
        for token_id, record in data.items():
            problem = _token_record_problem(record)
            if problem is not None:
                raise StateDirError(f"{path}: token {token_id[:40]!r}: {problem}; {_TOKENS_FIX}")
        return data

    def save_tokens(self, tokens: dict[str, dict[str, Any]]) -> None:
        self.write_json("tokens.json", tokens)

    # -- the mesh's drop/serve decisions -------------------------------------------

    def load_desired(self) -> list[Decision]:
        """The decisions of desired.json (none when it is missing)."""
        data = self.read_json("desired.json")
        if data is None:
            return []
        path = self._file("desired.json")
        if not isinstance(data, dict):
            raise StateDirError(f"{path}: expected a JSON object with the models' decisions, "
                                f"found {_json_type(data)}; {_DESIRED_FIX}")
        try:
            return desired.parse(data)
        except ValueError as e:
            raise StateDirError(f"{path}: {e}; {_DESIRED_FIX}") from None

    def save_desired(self, decisions: Iterable[Decision]) -> None:
        self.write_json("desired.json", desired.to_body(decisions))

    # -- incarnation ----------------------------------------------------------------

    def next_incarnation(self) -> int:
        """The stored counter plus one (stored), so every start outranks the last.

        A file that holds no number is counted from 1 again, with a warning: until this
        node's incarnation passes the old one, peers may take its news for stale."""
        path = self._file("incarnation")
        data = self.read_bytes(path)
        try:
            current = int(data.decode().strip()) if data else 0
            if current < 0:
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            log.warning("%s holds %r, not a number: counting from 1 again (peers that "
                        "remember a higher incarnation may take this node's news for stale "
                        "for a while; nothing to do)", path, (data or b"")[:40])
            current = 0
        return self.store_incarnation(current + 1)

    def store_incarnation(self, value: int) -> int:
        self.write_bytes(self._file("incarnation"), f"{value}\n".encode())
        return value

    # -- the node id of identity/ ---------------------------------------------------

    def last_node_id(self) -> str | None:
        """The node id identity/ held when last used here; None on a first start."""
        data = self.read_bytes(self._file("node_id"))
        text = data.decode(errors="replace").strip() if data else ""
        return text or None

    def store_node_id(self, node_id: str) -> None:
        if self.last_node_id() != node_id:
            self.write_bytes(self._file("node_id"), f"{node_id}\n".encode())

    def used_before(self) -> bool:
        """Whether a node has run with this state directory (a mesh, a counter, an id)."""
        return any(self._file(n).exists() for n in ("mesh.json", "incarnation", "node_id"))

    # -- all at once --------------------------------------------------------------------

    def check(self) -> None:
        """Read every state file once, so a broken one stops the start with its name and
        the fix (StateDirError), not a traceback at its first use."""
        self.load_mesh()
        self.load_peers()
        self.load_tokens()
        self.load_desired()


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(value), "a number")


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _token_record_problem(record: Any) -> str | None:
    """Why an issued-token record is unusable, or None (the shape ``TokenBook.issue`` writes)."""
    if not isinstance(record, dict):
        return f"the record is {_json_type(record)}, expected an object"
    key = record.get("key")
    if not isinstance(key, str) or not _TOKEN_KEY.match(key):
        return "its join key is not 64 hex digits"
    if not isinstance(record.get("mesh_id"), str):
        return "its mesh_id is not a string"
    if not _number(record.get("expires_at")):
        return "its expires_at is not a number"
    if not isinstance(record.get("once", False), bool):
        return "its once flag is not true or false"
    for name in ("created_at", "used_at", "revoked_at"):
        value = record.get(name)
        if value is not None and not _number(value):
            return f"its {name} is not a number"
    return None
