"""Where a request for a model goes: the contract between the API and the rest.

The API server knows nothing of llama-server processes, peers or tunnels: it
asks a :class:`Router` for the upstreams of a model, in the order to try them,
and sends the request to the first that answers.  An :class:`Upstream` is just
"an HTTP server reachable through this endpoint": the local llama-server on a
loopback port, or (later) a remote host's llama-server through an mTLS tunnel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IStreamClientEndpoint

if TYPE_CHECKING:
    from meshd.backends.supervisor import Traffic


class RouteError(Exception):
    """A request cannot be routed; carries the HTTP status and OpenAI error code."""

    status = 500
    code = "internal_error"
    type = "server_error"


class UnknownModel(RouteError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"

    def __init__(self, model: str, known: list[str]):
        self.model = model
        self.known = sorted(known)
        served = ", ".join(self.known) if self.known else "none"
        super().__init__(f"model {model!r} is not served in this mesh (served: {served})")


class NotReady(RouteError):
    """The model is known but no host can take the request right now."""

    status = 503
    code = "model_not_ready"
    type = "server_error"

    def __init__(self, model: str, reason: str, retry_after_s: int = 5):
        self.model = model
        self.retry_after_s = retry_after_s
        super().__init__(f"model {model!r} is not ready: {reason}")


@dataclass(frozen=True)
class Upstream:
    """One HTTP server that can answer requests for a model."""

    # for logs and failover bookkeeping: "local" or a peer's node id
    name: str
    # builds a fresh client endpoint to the upstream's HTTP server
    endpoint: Callable[[], IStreamClientEndpoint] = field(compare=False)
    # a key for connection pooling: equal keys may share connections
    pool_key: str = ""
    # the mesh node whose llama-server this is (the X-Meshd-Node of its answers);
    # "" for an upstream outside a mesh (a static one), named by ``name`` instead
    node_id: str = ""
    # the bearer key this upstream's llama-server wants, read for each request (a local
    # one's key changes with every start); None for a tunnel, whose far end adds its own
    api_key: Callable[[], str] | None = field(default=None, compare=False)
    # a local llama-server's read count (its liveness check's evidence of a busy child);
    # None for a tunnel, whose far end counts its own
    traffic: Traffic | None = field(default=None, compare=False)


class Router(Protocol):
    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries (OpenAI shape: id, object, owned_by, plus meshd fields)."""

    def upstreams(self, model: str, client_id: str) -> list[Upstream]:
        """Upstreams to try, best first; raises UnknownModel or NotReady."""

    def upstream_failed(self, upstream: Upstream, reason: str) -> None:
        """The API could not reach ``upstream`` before any response byte."""

    def request_started(self, upstream: Upstream) -> None:
        """A request was sent to ``upstream`` (for load accounting)."""

    def request_finished(self, upstream: Upstream) -> None:
        """A request to ``upstream`` ended, whatever the outcome."""
