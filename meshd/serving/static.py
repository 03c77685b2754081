"""A router with a fixed table: each model served by given ``host:port`` upstreams.

The API's :class:`~meshd.serving.routing.Router` contract without a mesh
behind it, so the API alone can stand in front of llama-servers whose
addresses are known (``python -m meshd.cli.static_api``: benchmarks, debugging).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTCP, IStreamClientEndpoint

from meshd.config import parse_address
from meshd.serving.routing import UnknownModel, Upstream


class StaticRouter:
    """Each model served by fixed ``host:port`` upstreams, tried in order."""

    def __init__(self, table: Mapping[str, Sequence[str]], *, reactor: IReactorTCP | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = cast(IReactorTCP, default_reactor)
        self.table: dict[str, list[Upstream]] = {}
        self.failed: list[tuple[str, str]] = []
        self.active: dict[str, int] = {}
        for model, addrs in table.items():
            ups = []
            for addr in addrs:
                host, port = parse_address(addr)
                ups.append(Upstream(name=addr, endpoint=_tcp(reactor, host, port), pool_key=addr))
            self.table[model] = ups

    def models(self) -> list[dict[str, Any]]:
        return [{"id": m, "object": "model", "owned_by": "meshd"} for m in sorted(self.table)]

    def upstreams(self, model: str, client_id: str) -> list[Upstream]:
        if model not in self.table:
            raise UnknownModel(model, list(self.table))
        return list(self.table[model])

    def upstream_failed(self, upstream: Upstream, reason: str) -> None:
        self.failed.append((upstream.name, reason))

    def request_started(self, upstream: Upstream) -> None:
        self.active[upstream.name] = self.active.get(upstream.name, 0) + 1

    def request_finished(self, upstream: Upstream) -> None:
        self.active[upstream.name] -= 1


def _tcp(reactor: IReactorTCP, host: str, port: int) -> Callable[[], IStreamClientEndpoint]:
    return lambda: endpoints.TCP4ClientEndpoint(reactor, host, port)
