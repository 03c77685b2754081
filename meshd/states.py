"""Every state word meshd has, defined once.

The enums are ``StrEnum``s: a member *is* its string, so ``meshctl status --json``,
``/api/status``, gossip and the routing table keep the words operators and older
peers know ("warm", "waiting-for-vram", "host"), while the code compares members,
never raw strings.  Where a state has rules about what may follow it, the table of
allowed moves sits beside the enum (as ``meshd.mesh.peer`` does for a connection),
so the machine fits on one screen.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class IllegalMove(AssertionError):
    """A state machine was asked for a move its table does not allow: a bug in meshd."""


_S = TypeVar("_S", bound=StrEnum)


def check_move(what: str, moves: Mapping[_S, frozenset[_S]], old: _S, new: _S) -> None:
    """Raise :class:`IllegalMove` unless ``old -> new`` is in ``moves`` (``what`` names the machine)."""
    if new not in moves[old]:
        raise IllegalMove(f"{what} cannot go from {old} to {new}")


class Role(StrEnum):
    """What a node is in the mesh (``role`` in status and gossip)."""

    CLIENT = "client"  # API only, no VRAM; never serves
    STANDBY = "standby"  # passive, with VRAM and models on disk; may promote
    IDLE = "idle"  # active, in the gossip, serving nothing
    HOST = "host"  # active, runs llama-server for a model (solo or split host)
    WORKER = "worker"  # active, lends its VRAM to a split host (rpc-server)


PASSIVE_ROLES = frozenset({Role.CLIENT, Role.STANDBY})


class NodeState(StrEnum):
    """The daemon's own life (``state`` in status)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class BackendState(StrEnum):
    """One supervised child process (llama-server or rpc-server)."""

    STOPPED = "stopped"
    STARTING = "starting"  # spawned, not answering yet
    LOADING = "loading"  # answering, still loading the model (503)
    READY = "ready"
    RESTARTING = "restarting"  # exited unexpectedly; waiting out the back-off
    STOPPING = "stopping"
    FAILED = "failed"  # gave up: too many restarts, or it cannot start at all


BACKEND_MOVES: dict[BackendState, frozenset[BackendState]] = {
    BackendState.STOPPED: frozenset({BackendState.STARTING, BackendState.FAILED}),
    BackendState.STARTING: frozenset({BackendState.LOADING, BackendState.READY,
                                      BackendState.RESTARTING, BackendState.STOPPING,
                                      BackendState.FAILED}),
    BackendState.LOADING: frozenset({BackendState.READY, BackendState.RESTARTING,
                                     BackendState.STOPPING, BackendState.FAILED}),
    BackendState.READY: frozenset({BackendState.LOADING, BackendState.RESTARTING,
                                   BackendState.STOPPING, BackendState.FAILED}),
    # stop() while waiting out the back-off: nothing runs, so straight to stopped
    BackendState.RESTARTING: frozenset({BackendState.STARTING, BackendState.STOPPED,
                                        BackendState.STOPPING, BackendState.FAILED}),
    BackendState.STOPPING: frozenset({BackendState.STOPPED}),
    BackendState.FAILED: frozenset({BackendState.STARTING, BackendState.STOPPING,
                                    BackendState.STOPPED}),
}


class ModelState(StrEnum):
    """A model as operators see it, on this node or mesh-wide (``models[].state``)."""

    COLD = "cold"  # known (on disk, asked for) but nobody runs it
    LOADING = "loading"
    WARM = "warm"  # takes requests
    RESTARTING = "restarting"
    DRAINING = "draining"
    FAILED = "failed"
    WAITING = "waiting-for-vram"  # set to run it, short of VRAM
    WAITING_SPLIT = "waiting-for-split"  # elected split host, workers not ready
    WORKER = "worker"  # this node lends VRAM to the model's split host


# a local backend state -> the model state operators see
MODEL_STATE_OF_BACKEND: dict[BackendState, ModelState] = {
    BackendState.STOPPED: ModelState.COLD,
    BackendState.STARTING: ModelState.LOADING,
    BackendState.LOADING: ModelState.LOADING,
    BackendState.READY: ModelState.WARM,
    BackendState.RESTARTING: ModelState.RESTARTING,
    BackendState.STOPPING: ModelState.DRAINING,
    BackendState.FAILED: ModelState.FAILED,
}


class ModelAction(StrEnum):
    """What this node does about its model, from one election (``meshd.placement.election``)."""

    RUN = "run"  # llama-server: solo, or as a split host over its workers
    WAIT = "wait"  # short of VRAM: nothing runs
    WORKER = "worker"  # lends VRAM (rpc-server) to another node's split host


class PlanMode(StrEnum):
    """``SplitPlan.mode``, the split-planning hook's answer; plugins may return the plain words."""

    SOLO = "solo"  # every fitting node runs the whole model
    SPLIT = "split"  # one host over the rpc-servers of its workers
    WAIT = "wait"  # the group together has too little VRAM


class DownloadState(StrEnum):
    """One model download in progress (``downloads[].state``)."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"  # all bytes here; checking size and sha256


class MemberState(StrEnum):
    """A peer in the membership table (``peers[].state``)."""

    ALIVE = "alive"
    VERIFYING = "verifying"  # reported dead by another node; we are checking ourselves


class PeerState(StrEnum):
    """One mTLS peer connection (``meshd.mesh.peer``)."""

    HANDSHAKING = "handshaking"  # TLS in progress
    HELLO = "hello"  # TLS done; HELLOs being exchanged and verified
    CONFIRM = "confirm"  # server: the client's HELLO verified, waiting for READY
    OPEN = "open"
    CLOSED = "closed"


PEER_MOVES: dict[PeerState, frozenset[PeerState]] = {
    PeerState.HANDSHAKING: frozenset({PeerState.HELLO, PeerState.CLOSED}),
    PeerState.HELLO: frozenset({PeerState.OPEN, PeerState.CONFIRM, PeerState.CLOSED}),
    PeerState.CONFIRM: frozenset({PeerState.OPEN, PeerState.CLOSED}),
    PeerState.OPEN: frozenset({PeerState.CLOSED}),
    PeerState.CLOSED: frozenset(),
}


class TunnelState(StrEnum):
    """The far end of one tunnel (``meshd.serving.tunnel``)."""

    HEADER = "header"  # reading the TUNNEL header line
    OPEN = "open"  # carrying bytes
    CLOSED = "closed"


TUNNEL_MOVES: dict[TunnelState, frozenset[TunnelState]] = {
    TunnelState.HEADER: frozenset({TunnelState.OPEN, TunnelState.CLOSED}),
    TunnelState.OPEN: frozenset({TunnelState.CLOSED}),
    TunnelState.CLOSED: frozenset(),
}


class ForwardState(StrEnum):
    """One request the API forwards (``meshd.serving.api.Forward``).

    ``connecting`` and ``sent`` repeat for each upstream tried; once a
    response byte arrives the request is never sent again.
    """

    CONNECTING = "connecting"  # waiting for a connection to the current upstream
    SENT = "sent"  # the request is on the wire, no response head yet
    HOLDING = "holding"  # a non-streamed response, held until it ends (a clean 502 on failure)
    STREAMING = "streaming"  # an SSE response, passed through as it comes
    RELAYING = "relaying"  # a held response past HOLD_BYTES, passed through from then on
    DONE = "done"  # answered, failed, or the client went away


FORWARD_MOVES: dict[ForwardState, frozenset[ForwardState]] = {
    # (a failed connect fails over to the next upstream staying in connecting)
    ForwardState.CONNECTING: frozenset({ForwardState.SENT, ForwardState.DONE}),
    # back to connecting: failover, or a stale pooled connection retried fresh
    ForwardState.SENT: frozenset({ForwardState.CONNECTING, ForwardState.HOLDING,
                                  ForwardState.STREAMING, ForwardState.DONE}),
    ForwardState.HOLDING: frozenset({ForwardState.RELAYING, ForwardState.DONE}),
    ForwardState.STREAMING: frozenset({ForwardState.DONE}),
    ForwardState.RELAYING: frozenset({ForwardState.DONE}),
    ForwardState.DONE: frozenset(),
}


class RequestPhase(StrEnum):
    """Where an HTTP door's current request is (``meshd.httpbounds``): what its
    deadline is counting."""

    IDLE = "idle"  # no byte of it yet
    HEAD = "head"
    BODY = "body"
    HANDLING = "handling"  # read whole: later bytes are pipelined, buffered by twisted.web
    CLOSED = "closed"
