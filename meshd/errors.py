"""The exceptions meshd raises for expected conditions, in one place.

An expected condition (a port in use, a refused download, a bad token) is told
to the operator as one line naming what is wrong and what to do; a traceback
means a bug.  Modules raise these instead of defining their own, so the control
socket, the CLI and the service tree can tell "refused" from "broken" by type.
"""

from __future__ import annotations


class MeshdError(Exception):
    """Base of meshd's expected errors."""


class StartupError(MeshdError):
    """An expected reason the daemon cannot start (port in use, missing binary)."""


class Refused(MeshdError):
    """The daemon will not do what it was asked (``meshctl`` exit 3, the reason on one line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRequest(MeshdError):
    """A control-socket call whose arguments are wrong (``meshctl`` exit 2)."""


# -- configuration and state files ----------------------------------------------


# -- mesh: identity, tokens, peers, gossip ------------------------------------------


# -- placement: plugins and hooks ---------------------------------------------------


# -- serving: routing, upstreams, tunnels -------------------------------------------


# -- models: scan, catalog, downloads -----------------------------------------------


# -- backends: llama-server, rpc-server ---------------------------------------------


# -- daemon: service tree, control socket -------------------------------------------


class ServiceStopErrors(MeshdError):
    """Children of the service tree whose stop failed; the others were still stopped.

    ``errors`` holds ``(service name, Failure)`` in the order the stops ran."""

    def __init__(self, errors: list) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{name}: {f.getErrorMessage()}" for name, f in self.errors))


class RoleChangeRefused(MeshdError):
    """A role change the role machine does not allow from the node's current role."""
