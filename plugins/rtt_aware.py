"""rtt_aware: send requests to the nearest host of a model.

In a mesh that spans sites, the default's hash can send a request across a
WAN link while a host of the same model sits on the local network (or on
this very machine).  This plugin picks among the hosts with the lowest
round-trip time from this node, as measured by the heartbeats: every host
within ``slack_ms`` of the nearest counts as near, and requests are spread
over the near hosts by the default's stable hash.  When this node hosts the
model itself (``mesh.self_id`` among ``hosts``), it serves the request: no
hop is nearer.  While no RTT is known yet, the default decides.

    [policy]
    plugins = ["rtt_aware"]

    [policy.rtt_aware]
    # hosts this much slower than the nearest still count as near
    slack_ms = 5.0

``slack_ms = 0`` always picks the single nearest host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pluggy

from meshd.placement.default import stable_index
from meshd.placement.snapshot import MeshView, NodeView

hookimpl = pluggy.HookimplMarker("meshd")

DEFAULT_SLACK_MS = 5.0


@hookimpl
def meshd_configure(settings: Mapping[str, Any]) -> None:
    unknown = sorted(set(settings) - {"slack_ms"})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} (known: slack_ms)")
    slack = settings.get("slack_ms", DEFAULT_SLACK_MS)
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) or slack < 0:
        raise ValueError(f"slack_ms: expected a number of milliseconds >= 0, got {slack!r}")


@hookimpl
def meshd_select_host(
    model: str,
    client_id: str,
    hosts: tuple[NodeView, ...],
    mesh: MeshView,
    settings: Mapping[str, Any],
) -> str | None:
    if any(h.node_id == mesh.self_id for h in hosts):
        return mesh.self_id
    slack = settings.get("slack_ms", DEFAULT_SLACK_MS)

    def rtt(h: NodeView) -> float | None:
        return 0.0 if h.node_id == mesh.self_id else h.rtt_ms

    measured = [h for h in hosts if rtt(h) is not None]
    if not measured:
        return None
    nearest = min(rtt(h) for h in measured)
    near = [h for h in measured if rtt(h) <= nearest + slack]
    return near[stable_index(client_id, model, len(near))].node_id
