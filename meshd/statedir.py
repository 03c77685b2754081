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
    incarnation          a counter bumped at every start (SWIM refutation)
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd import jsonbounds

FILE_MODE = 0o600
DIR_MODE = 0o700


class StateDirError(Exception):
    """A state file cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class MeshState:
    mesh_id: str
    secret: bytes


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
        try:
            return MeshState(str(data["mesh_id"]), bytes.fromhex(data["secret"]))
        except (KeyError, TypeError, ValueError):
            raise StateDirError(f"{self._file('mesh.json')} lacks a valid mesh_id/secret") from None

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
        data = self.read_json("peers.json") or {}

        def nodes(key: str) -> list[KnownNode]:
            out = []
            for item in data.get(key, []) if isinstance(data, dict) else []:
                try:
                    out.append(KnownNode(str(item["node_id"]), tuple(str(a) for a in item["addrs"])))
                except (KeyError, TypeError):
                    continue
            return out

        return nodes("bootstrap"), nodes("known")

    def save_peers(self, bootstrap: list[KnownNode], known: list[KnownNode]) -> None:
        def dump(nodes: list[KnownNode]) -> list[dict]:
            return [{"node_id": n.node_id, "addrs": list(n.addrs)} for n in nodes]

        self.write_json("peers.json", {"bootstrap": dump(bootstrap), "known": dump(known)})

    # -- issued tokens ------------------------------------------------------------

    def load_tokens(self) -> dict[str, dict[str, Any]]:
        data = self.read_json("tokens.json")
        return data if isinstance(data, dict) else {}

    def save_tokens(self, tokens: dict[str, dict[str, Any]]) -> None:
        self.write_json("tokens.json", tokens)

    # -- incarnation ----------------------------------------------------------------

    def next_incarnation(self) -> int:
        """The stored counter plus one (stored), so every start outranks the last."""
        data = self.read_bytes(self._file("incarnation"))
        try:
            current = int(data.decode().strip()) if data else 0
        except ValueError:
            current = 0
        return self.store_incarnation(current + 1)

    def store_incarnation(self, value: int) -> int:
        self.write_bytes(self._file("incarnation"), f"{value}\n".encode())
        return value
