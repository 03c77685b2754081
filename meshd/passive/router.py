"""Routing a passive node's requests from its routing table, through tunnels to the hosts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from meshd.placement import rules as placement
from meshd.placement.snapshot import NodeView
from meshd.serving import routing
from meshd.serving.routetable import (
    RouteTable,
    host_views,
    table_view,
)
from meshd.states import ModelState, Role

log = logging.getLogger(__name__)

# -- routing requests from the table ----------------------------------------------------------------


class PassiveRouter:
    """The API's :class:`meshd.serving.routing.Router` on a passive node: every model of the table,
    each request to a host chosen by the host-selection hook (asked once per request), the
    next host by node id after it to fail over to."""

    def __init__(self, self_id: str, *, endpoint_for: Callable[[str, str], Any],
                 on_failure: Callable[[str, str], None] = lambda n, r: None,
                 policy: Any = None, started_at: float | None = None):
        self.self_id = self_id
        self.endpoint_for = endpoint_for
        self.on_failure = on_failure
        self.policy = policy
        self.table: RouteTable | None = None
        self.failed: set[str] = set()  # hosts a request failed on since the last table
        self.in_flight: dict[str, int] = {}
        self._view: Any = None
        self._created = int(started_at if started_at is not None else time.time())

    def update(self, table: RouteTable) -> None:
        self.table = table
        self.failed.clear()
        self._view = None

    def _mesh_view(self) -> Any:
        if self._view is None:
            assert self.table is not None
            self._view = table_view(self.table, NodeView(self.self_id, role=Role.CLIENT))
        return self._view

    def models(self) -> list[dict[str, Any]]:
        table = self.table
        if table is None:
            return []
        return [{"id": name, "object": "model", "created": self._created, "owned_by": "meshd",
                 "meshd": {"hosts": warm, "nodes": nodes,
                           "state": ModelState.WARM if warm else ModelState.LOADING}}
                for name, warm, nodes in table.model_summaries()]

    def view(self) -> Any:
        """The mesh as the routing table shows it (None before the first table)."""
        return self._mesh_view() if self.table is not None else None

    def upstreams(self, model: str, client_id: str) -> list[routing.Upstream]:
        return [self._upstream(node_id, model) for node_id in self._order(model, client_id)]

    def explain_route(self, model: str, client_id: str) -> dict[str, Any]:
        """``meshctl explain``'s routing part on a passive node (nothing is sent)."""
        from meshd.placement.explain import route_explanation

        answers: list[placement.HookRecord] = []
        try:
            order = self._order(model, client_id, answers)
        except routing.RouteError as e:
            return route_explanation(client_id, error=e)
        return route_explanation(client_id, order, self._mesh_view(), self.self_id, answers,
                                 suspects=frozenset(self.failed), in_flight=self.in_flight,
                                 note="a passive node tries the hook's choice, then one more "
                                      "host by node id")

    def _order(self, model: str, client_id: str,
               answers: list[placement.HookRecord] | None = None) -> list[str]:
        table = self.table
        if table is None:
            raise routing.NotReady(model, "this passive node has no routing table yet", 2)
        if not table.hosts_of(model, state=None):
            raise routing.UnknownModel(model, table.models())
        warm = table.hosts_of(model)
        if not warm:
            raise routing.NotReady(model, "its host is loading it", 5)
        usable = [h for h in warm if h.node_id not in self.failed] or list(warm)
        # one hook call per request: its choice, then the next host by node id to fail over to
        order = placement.order_hosts(model, client_id, host_views(usable), self._mesh_view(),
                                      policy=self.policy, answers=answers)
        return order[:2]

    def _upstream(self, node_id: str, model: str) -> routing.Upstream:
        return routing.Upstream(name=node_id,
                                endpoint=lambda: self.endpoint_for(node_id, model),
                                pool_key=f"tunnel:{node_id}:{model}", node_id=node_id)

    def upstream_failed(self, upstream: routing.Upstream, reason: str) -> None:
        log.warning("host %s failed before answering: %s", upstream.name, reason)
        self.failed.add(upstream.name)
        self.on_failure(upstream.name, reason)

    def request_started(self, upstream: routing.Upstream) -> None:
        self.in_flight[upstream.name] = self.in_flight.get(upstream.name, 0) + 1

    def request_finished(self, upstream: routing.Upstream) -> None:
        self.in_flight[upstream.name] = max(0, self.in_flight.get(upstream.name, 1) - 1)
