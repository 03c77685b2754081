"""The joiner's side of an invite token: dial the issuer, prove the key, take the WELCOME.

A node with no mesh proves the token's join key to its issuer and receives the
mesh id and secret in the WELCOME; a node already in the token's mesh just
dials the issuer with the mesh secret.  Either way the issuer becomes a
bootstrap node (``peers.json``) for later rejoins.  ``[mesh] join`` tokens at
start are tried in order until one works, with the mesh's reconnect back-off
between rounds; a token the issuer refused for good (by its CLOSE code, see
``wire.TOKEN_REFUSALS``) is not tried again.  When every token is refused (or
none could be used at all), the node waits outside any mesh -- it never founds
one of its own -- and :meth:`Joiner.status` says why until ``meshctl join`` brings
a token that works.  The issuer's side is ``meshd.mesh.invites``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from meshd.backoff import Backoff
from meshd.errors import Refused
from meshd.mesh import tokens as tokensmod
from meshd.mesh.invites import parse_welcome
from meshd.mesh.peer import ClientAuth, PeerProtocol
from meshd.mesh.wire import TOKEN_REFUSALS, CloseCode
from meshd.statedir import KnownNode, MeshState, StateDir

log = logging.getLogger(__name__)


class JoinFailed(Refused):
    """No address in a token answered, or the issuer refused; the reason says which,
    ``codes`` the CLOSE codes the issuer gave (``wire.TOKEN_REFUSALS``: for good)."""

    def __init__(self, reason: str, codes: Iterable[CloseCode] = ()):
        super().__init__(reason)
        self.codes = frozenset(codes)


class JoinHost(Protocol):
    """What joining needs of the mesh service."""

    @property
    def mesh(self) -> MeshState | None: ...

    @property
    def leaving(self) -> bool: ...

    def dial_addrs(self, addrs: list[str], auth: ClientAuth) -> defer.Deferred[PeerProtocol]:
        """An open control connection to one of ``addrs``; fails with JoinFailed."""

    def adopt_mesh(self, mesh: MeshState) -> None:
        """The WELCOME came: this node is in ``mesh`` from now on."""


class Joiner:
    """Joins with tokens for one mesh service; its retry timer is its own (``cancel``)."""

    def __init__(self, host: JoinHost, state: StateDir, reactor: IReactorTime, backoff: Backoff):
        self._host = host
        self._state = state
        self._reactor = reactor
        self._backoff = backoff  # shared with the rejoin: any success starts both over
        self._joins: dict[int, defer.Deferred[dict[str, Any]]] = {}  # by id(connection)
        self._retry_call: IDelayedCall | None = None
        self._waiting: str | None = None  # why no token is tried any more
        self._last_failure: str | None = None  # why the last try failed (still trying)

    def status(self) -> dict[str, str]:
        """Where joining stands while the node is in no mesh: ``state`` "joining" (still
        trying the tokens) or "waiting" (none can work: a new token is needed), and why."""
        if self._waiting is not None:
            return {"state": "waiting", "reason": self._waiting}
        return {"state": "joining",
                "reason": self._last_failure or "trying the [mesh] join tokens"}

    def wait(self, reason: str) -> None:
        """No token can work: stay out of any mesh, and say so (log and status)."""
        self._waiting = f"{reason}; waiting for meshctl join with a new token"
        log.error("not in any mesh: %s", self._waiting)

    def join(self, token: tokensmod.Token) -> defer.Deferred[dict[str, Any]]:
        """Join (or reconnect to) the token's mesh; fires ``{"mesh_id", "via"}``, or fails
        with JoinFailed."""
        mesh = self._host.mesh
        if mesh is not None and token.mesh_id == mesh.mesh_id:
            # already in that mesh: just connect to the issuer with the mesh secret
            auth = ClientAuth(mesh.mesh_id, mesh.secret, expect_node_id=token.issuer,
                              pin=token.pin)
        else:
            auth = ClientAuth(token.mesh_id, token.key, token_id=token.token_id,
                              expect_node_id=token.issuer, pin=token.pin)
        log.info("joining mesh %s via node %s (token %s, trying %s)", token.mesh_id,
                 token.issuer, token.token_id, ", ".join(token.addrs))
        d = self._host.dial_addrs(list(token.addrs), auth)
        done: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def opened(conn: PeerProtocol) -> None:
            self.add_bootstrap(token)
            if auth.token_id is None:
                done.callback({"mesh_id": token.mesh_id, "via": token.issuer})
            else:  # the mesh secret comes in the issuer's WELCOME
                self._joins[id(conn)] = done
                conn.closed.addCallback(lambda reason: self._join_lost(conn, reason))

        def failed(f: Failure) -> None:
            reason = str(f.value)
            codes = f.value.codes if isinstance(f.value, JoinFailed) else frozenset()
            log.error("cannot join mesh %s: %s", token.mesh_id, reason)
            self._last_failure = f"cannot join mesh {token.mesh_id}: {reason}"
            done.errback(JoinFailed(self._last_failure, codes))

        d.addCallbacks(opened, failed)
        return done

    def join_at_start(self, tokens: list[tokensmod.Token], unusable: Iterable[str] = ()) -> None:
        """``[mesh] join``: the first token that works wins; retry with back-off if none does.

        A token refused for good is dropped; when none is left the node waits (``status``),
        the reasons of ``unusable`` tokens (expired here, say) included."""
        live = list(tokens)
        refused = list(unusable)
        self._waiting = None

        def attempt(i: int) -> None:
            self._retry_call = None
            if self._host.mesh is not None or self._host.leaving:
                return
            if not live:
                self.wait("no [mesh] join token can be used: " + "; ".join(refused))
                return
            if i >= len(live):
                delay = self._backoff.next_delay()
                log.warning("no [mesh] join token worked; trying again in %.0f s", delay)
                self._retry_call = self._reactor.callLater(delay, attempt, 0)
                return
            d = self.join(live[i])
            d.addCallbacks(joined, lambda f: failed(f, i))

        def joined(_: object) -> None:
            self._backoff.reset()
            self._waiting = self._last_failure = None

        def failed(f: Failure, i: int) -> None:
            codes = f.value.codes if isinstance(f.value, JoinFailed) else frozenset()
            refusals = codes & TOKEN_REFUSALS
            if refusals:
                token = live.pop(i)
                log.error("token %s refused for good (%s): %s", token.token_id,
                          ", ".join(sorted(refusals)), f.value)
                refused.append(f"token {token.token_id} was refused by its issuer "
                               f"({', '.join(sorted(refusals))})")
                attempt(i)  # the next token is now at i
                return
            attempt(i + 1)

        attempt(0)

    def welcomed(self, conn: PeerProtocol, body: dict[str, Any]) -> None:
        """A WELCOME on ``conn``: the mesh secret, if we are joining through it."""
        d = self._joins.pop(id(conn), None)
        if d is None:
            return  # not joining through this connection: nothing to learn
        mesh = parse_welcome(body)
        self._host.adopt_mesh(mesh)
        self._waiting = self._last_failure = None
        # the connection was authenticated with the token key; from now on the mesh secret
        conn.client = ClientAuth(mesh.mesh_id, mesh.secret, expect_node_id=conn.node_id)
        log.info("joined mesh %s via node %s at %s", mesh.mesh_id, conn.node_id, conn.peer_address)
        d.callback({"mesh_id": mesh.mesh_id, "via": conn.node_id})

    def add_bootstrap(self, token: tokensmod.Token) -> None:
        """Remember the token's issuer as a bootstrap node, for rejoining later."""
        boot, known = self._state.load_peers()
        boot = [b for b in boot if b.node_id != token.issuer]
        boot.append(KnownNode(token.issuer, token.addrs))
        self._state.save_peers(boot, known)

    def cancel(self) -> None:
        """No more retries (the node is leaving)."""
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    def _join_lost(self, conn: PeerProtocol, reason: str) -> None:
        d = self._joins.pop(id(conn), None)
        if d is not None:
            codes = () if conn.close_code is None else (conn.close_code,)
            d.errback(JoinFailed(f"the issuer closed the connection before welcoming us: {reason}",
                                 codes))
