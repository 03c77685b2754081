"""pinned: keep chosen models on chosen nodes.

Name, for each pinned model, the nodes that serve it (node ids as
``meshctl peers`` prints them)::

    [policy]
    plugins = ["pinned"]

    [policy.pinned]
    "gemma-3-270m-q4_k_m" = ["node-id-1", "node-id-2"]
    "qwen2.5-7b-instruct-q4_k_m" = "node-id-3"

Then:

- requests for a pinned model go only to its pinned nodes: this node when
  it is one of them and hosts the model, else spread over them by the
  default's stable hash (when none of them hosts it right now, any host
  serves rather than failing the request);
- a pinned node joining without a model is assigned its pinned model; other
  nodes are never assigned a model pinned elsewhere;
- when a pinned model loses its host, only its pinned nodes promote for it
  (with the default's tie-break among them).

Models that are not pinned are placed by the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from meshd.placement.default import choose_assignment, promotion_winners, stable_index
from meshd.placement.snapshot import MeshView, NodeView

hookimpl = pluggy.HookimplMarker("meshd")

REASON = "pinned to this node by [policy.pinned]"


def pins(settings: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{model: (node_id, ...)}`` from the settings table (a str is one node)."""
    return {
        model: (nodes,) if isinstance(nodes, str) else tuple(nodes)
        for model, nodes in settings.items()
    }


def eligible_for(table: Mapping[str, tuple[str, ...]]) -> Callable[[NodeView, str], bool]:
    """May ``node`` take ``model``: yes unless the model is pinned to other nodes."""

    def eligible(node: NodeView, model: str) -> bool:
        return model not in table or node.node_id in table[model]

    return eligible


@hookimpl
def meshd_configure(settings: Mapping[str, Any]) -> None:
    for model, nodes in settings.items():
        if isinstance(nodes, str):
            nodes = (nodes,)
        if not isinstance(nodes, tuple) or not nodes or not all(
            isinstance(n, str) and n for n in nodes
        ):
            raise ValueError(f"{model}: expected a node id or a list of node ids, got {nodes!r}")


@hookimpl
def meshd_select_host(
    model: str, client_id: str, hosts: tuple[NodeView, ...], mesh: MeshView,
    settings: Mapping[str, Any],
) -> str | None:
    wanted = pins(settings).get(model)
    if not wanted:
        return None
    ours = [h for h in hosts if h.node_id in wanted]
    if not ours:
        return None
    if any(h.node_id == mesh.self_id for h in ours):
        return mesh.self_id
    return ours[stable_index(client_id, model, len(ours))].node_id


@hookimpl
def meshd_assign_model(
    node: NodeView, mesh: MeshView, settings: Mapping[str, Any]
) -> tuple[str | None, str] | None:
    table = pins(settings)
    if not table:
        return None
    mine = sorted(m for m, nodes in table.items() if node.node_id in nodes)
    for model in mine:
        info = mesh.model(model)
        if info is None or not info.hosts:
            return model, REASON  # a pinned model nobody hosts yet comes first
    if mine:
        return mine[0], REASON
    return choose_assignment(node, mesh, eligible=eligible_for(table))


@hookimpl
def meshd_promote(node: NodeView, mesh: MeshView, settings: Mapping[str, Any]) -> str | bool | None:
    table = pins(settings)
    if not table:
        return None
    return promotion_winners(mesh, eligible=eligible_for(table)).get(node.node_id, False)
