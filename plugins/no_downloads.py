"""no_downloads: never download a model; serve only what is already on disk.

For nodes on metered or air-gapped links, or where models are provisioned by
hand: every download is refused (``meshctl download`` and the assignment's
downloads alike), and a node joining without a model is only ever assigned
one it has on disk.  A node with nothing suitable on disk stays idle.

Enable it in /etc/meshd.toml::

    [policy]
    plugins = ["no_downloads"]

No settings.
"""

from __future__ import annotations

import pluggy

from meshd.placement.default import choose_assignment
from meshd.placement.snapshot import MeshView, NodeView

hookimpl = pluggy.HookimplMarker("meshd")


@hookimpl
def meshd_allow_download() -> bool:
    return False


@hookimpl
def meshd_assign_model(node: NodeView, mesh: MeshView) -> tuple[str | None, str]:
    model, reason = choose_assignment(node, mesh, on_disk_only=True)
    return model, f"{reason} (no_downloads: on-disk models only)"
