"""Every state word meshd has, defined once.

The enums are ``StrEnum``s: a member *is* its string, so ``meshctl status --json``,
``/api/status``, gossip and the routing table keep the words operators and older
peers know ("warm", "waiting-for-vram", "host"), while the code compares members,
never raw strings.  Where a state has rules about what may follow it, the table of
allowed moves sits beside the enum (as ``meshd.mesh.peer`` does for a connection),
so the machine fits on one screen.
"""

from __future__ import annotations

from enum import StrEnum


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
    BackendState.RESTARTING: frozenset({BackendState.STARTING, BackendState.STOPPING,
                                        BackendState.FAILED}),
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


class MemberState(StrEnum):
    """A peer in the membership table (``peers[].state``)."""

    ALIVE = "alive"
    VERIFYING = "verifying"  # reported dead by another node; we are checking ourselves
