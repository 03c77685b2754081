"""The issuer's side of invite tokens: issue and revoke them, let a joiner in with one.

``meshd.mesh.tokens`` is the token itself (its format, and the book of issued
tokens); this module is what the mesh does with them: print one for
``meshctl token``, refuse a presented one with the right CLOSE code, mark a
one-use token used, and hand the mesh secret over in the WELCOME once the
joiner proved the token's key.  The joiner's side is ``meshd.mesh.joining``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, Protocol

from meshd.errors import Refused
from meshd.mesh import tokens as tokensmod
from meshd.mesh.peer import AuthRefused, Hello
from meshd.mesh.wire import CloseCode
from meshd.statedir import MeshState, StateDir, StateDirError, mesh_problem

log = logging.getLogger(__name__)


def welcome_body(mesh: MeshState) -> dict[str, Any]:
    """The WELCOME an issuer sends a token joiner: the mesh id and its secret."""
    return {"mesh_id": mesh.mesh_id, "secret": base64.b64encode(mesh.secret).decode()}


def parse_welcome(body: dict[str, Any]) -> MeshState:
    """The mesh a WELCOME names; KeyError/ValueError (binascii.Error) when it names none,
    or one this node would refuse from its own mesh.json (an empty or short secret)."""
    mesh = MeshState(body["mesh_id"], base64.b64decode(body["secret"], validate=True))
    problem = mesh_problem(mesh.mesh_id, mesh.secret)
    if problem is not None:
        raise ValueError(f"the WELCOME's mesh is unusable: {problem}")
    return mesh


class Invites:
    """The tokens this node issued (``tokens.json`` in the state directory)."""

    def __init__(self, state: StateDir, now: Callable[[], float]):
        self.book = tokensmod.TokenBook(state, now=now)
        self._state = state

    def key_of(self, token_id: str, mesh_id: str) -> bytes | None:
        """The key of a token issued here for ``mesh_id``, usable or not; None if there is none.

        A refused token's holder may learn why (it stops trying) once it proved this key.
        """
        try:
            record = self._state.load_tokens().get(token_id)
            if not isinstance(record, dict) or record.get("mesh_id") != mesh_id:
                return None
            return bytes.fromhex(record["key"])
        except (StateDirError, KeyError, TypeError, ValueError):
            return None

    def issue(self, mesh: MeshState | None, *, issuer: str, pin: bytes, addrs: list[str],
              ttl_s: float, once: bool) -> dict[str, Any]:
        """A new token for ``meshctl token``; Refused says why there can be none."""
        if mesh is None:
            raise Refused("this node is not in a mesh yet (it is still joining)")
        if not addrs:
            raise Refused("no address to put in a token: set [mesh] advertise")
        try:
            token = self.book.issue(mesh_id=mesh.mesh_id, issuer=issuer, pin=pin, addrs=addrs,
                                    ttl_s=ttl_s, once=once)
        except (ValueError, StateDirError) as e:
            raise Refused(str(e)) from None
        log.info("issued invite token %s (expires in %s s%s, addresses %s)", token.token_id,
                 int(ttl_s), ", one use" if once else "", ", ".join(addrs))
        return {"id": token.token_id, "token": tokensmod.encode(token),
                "expires_at": token.expires_at}

    def revoke(self, token_id: str) -> dict[str, Any]:
        try:
            self.book.revoke(token_id)
        except (tokensmod.TokenError, StateDirError) as e:
            raise Refused(str(e)) from None
        log.info("revoked invite token %s", token_id)
        return {"id": token_id, "revoked": True}


class GateMesh(Protocol):
    """What the listening side's rules read of the mesh service."""

    @property
    def mesh(self) -> MeshState | None: ...

    @property
    def leaving(self) -> bool: ...


class Gate:
    """The listening side's rules (``peer.ServerGate``): the mesh secret, or a token
    this node issued; a refused token closes with its own code, told to the peer only
    once it proved the token's key (a stranger learns nothing of the tokens here)."""

    def __init__(self, mesh: GateMesh, invites: Invites):
        self._mesh = mesh
        self._invites = invites

    def mesh_id(self) -> str | None:
        mesh = self._mesh.mesh
        return mesh.mesh_id if mesh is not None else None

    def key_for(self, hello: Hello) -> bytes:
        mesh = self._mesh.mesh
        if self._mesh.leaving:
            raise AuthRefused("this node is leaving the mesh", CloseCode.LEAVING,
                              proof_key=self._named_key(hello, mesh))
        if mesh is None:  # checked by the connection before it asks; kept for the types
            raise AuthRefused("this node has not joined a mesh yet", CloseCode.WRONG_MESH)
        if hello.auth == "mesh":
            return mesh.secret
        try:
            return self._invites.book.check(hello.token_id or "", mesh.mesh_id)
        except tokensmod.TokenError as e:
            raise AuthRefused(str(e), e.code,
                              proof_key=self._named_key(hello, mesh)) from None
        except StateDirError as e:
            # damaged since the start: the operator reads which file; the joiner a refusal
            log.error("cannot check invite token %s: %s", hello.token_id, e)
            raise AuthRefused("this node cannot check invite tokens now") from None

    def authenticated(self, hello: Hello) -> None:
        if hello.auth == "token" and hello.token_id:
            try:
                self._invites.book.mark_used(hello.token_id)
            except StateDirError as e:
                # a one-use token whose use is not recorded could be used again
                log.error("cannot mark invite token %s used: %s", hello.token_id, e)
                raise AuthRefused("this node cannot check invite tokens now") from None
            log.info("node %s presented invite token %s", hello.node_id, hello.token_id)

    def _named_key(self, hello: Hello, mesh: MeshState | None) -> bytes | None:
        """The key ``hello`` claims to prove, when this node has it."""
        if mesh is None:
            return None
        if hello.auth == "mesh":
            return mesh.secret
        return self._invites.key_of(hello.token_id or "", mesh.mesh_id)
