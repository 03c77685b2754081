"""meshd's own placement decisions, as an ordinary plugin.

This is DESIGN.md's placement table.  It is registered under the name
``default`` through the same manager as operator plugins, after them and
marked ``trylast``, so an operator plugin that answers a hook wins, and a
plugin that has no opinion (returns ``None``), fails or is disabled leaves
the decision here.  ``[policy] disable = ["default:select_host"]`` takes one
of these out.

The helpers without the ``meshd_`` prefix (``stable_index``,
``choose_assignment``, ``promotion_winners``, ``fits``) are meant for other
plugins to reuse: import this module and call them.  Importing a ``meshd_``
function into your own plugin module would not make it yours (only
functions defined in the plugin module count as its hooks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from meshd.placement.fit import download_allowed, fits, needed_bytes
from meshd.placement.hookspecs import hookimpl
from meshd.placement.snapshot import MeshView, ModelInfo, NodeView, SplitPlan
from meshd.placement.spread import stable_index  # re-exported for plugins
from meshd.states import PlanMode, Role
from meshd.units import gib

NAME = "default"

# ``fits`` and ``need_bytes`` are meshd.placement.fit's rule (VRAM >= size x FIT_FACTOR),
# here for plugins that reuse the default's helpers

# roles that may promote or be assigned a model: not clients, not busy nodes
SPARE_ROLES = frozenset({Role.STANDBY, Role.IDLE})

# the VRAM a model needs: the fit rule's, under the name plugins know
need_bytes = needed_bytes


@hookimpl(trylast=True)
def meshd_select_host(model: str, client_id: str, hosts: tuple[NodeView, ...], mesh: MeshView) -> str:
    # this node's own llama-server when it is a host: no tunnel, no hop
    if any(h.node_id == mesh.self_id for h in hosts):
        return mesh.self_id
    ordered = sorted(hosts, key=_by_id)
    return ordered[stable_index(client_id, model, len(ordered))].node_id


# -- assignment ---------------------------------------------------------------

Eligible = Callable[[NodeView, str], bool]


def choose_assignment(
    node: NodeView,
    mesh: MeshView,
    *,
    on_disk_only: bool = False,
    eligible: Eligible | None = None,
) -> tuple[str | None, str]:
    """The default assignment, with knobs for plugins that narrow it.

    ``on_disk_only`` leaves out models the node would have to download;
    ``eligible(node, model)`` leaves out models a plugin forbids.  Among
    models of equal rank, the one most nodes ask for wins, then the name.
    Only models that fit the node count, so a size must be known.
    """
    local: list[tuple[ModelInfo, int]] = []
    remote: list[ModelInfo] = []
    for info in mesh.models:
        if eligible is not None and not eligible(node, info.name):
            continue
        size = node.size_of(info.name)
        if size is not None:
            if fits(node.vram_bytes, size):
                local.append((info, size))
        elif not on_disk_only and fits(node.vram_bytes, info.size_bytes):
            remote.append(info)

    def hosts_elsewhere(info: ModelInfo) -> int:
        return sum(1 for h in info.hosts if h != node.node_id)

    def rank(info: ModelInfo) -> tuple[int, str]:
        return (-len(info.requested_by), info.name)

    unserved_local = [i for i, _ in local if hosts_elsewhere(i) == 0]
    if unserved_local:
        pick = min(unserved_local, key=rank)
        return pick.name, "unserved model on disk"
    unserved_remote = [i for i in remote if hosts_elsewhere(i) == 0]
    if unserved_remote:
        pick = min(unserved_remote, key=rank)
        return pick.name, f"unserved model, not on disk: download {gib(pick.size_bytes or 0)}"
    if local:
        pick = min((i for i, _ in local), key=lambda i: (hosts_elsewhere(i), *rank(i)))
        return pick.name, f"least-served model on disk ({_hosts_text(hosts_elsewhere(pick))})"
    if remote:
        pick = min(remote, key=lambda i: (hosts_elsewhere(i), *rank(i)))
        return pick.name, (
            f"least-served model ({_hosts_text(hosts_elsewhere(pick))}), "
            f"not on disk: download {gib(pick.size_bytes or 0)}"
        )
    if not mesh.models:
        return None, "the mesh has no models yet"
    where = "on disk " if on_disk_only else ""
    return None, f"no model {where}fits this node ({gib(node.vram_bytes)} of VRAM)"


def _hosts_text(n: int) -> str:
    return "1 host" if n == 1 else f"{n} hosts"


@hookimpl(trylast=True)
def meshd_assign_model(node: NodeView, mesh: MeshView) -> tuple[str | None, str]:
    return choose_assignment(node, mesh)


# -- promotion ----------------------------------------------------------------


def promotion_winners(mesh: MeshView, eligible: Eligible | None = None) -> dict[str, str]:
    """Which spare node promotes for which orphaned model: ``{node_id: model}``.

    An orphaned model has no host.  Orphans are taken in order (most
    requested first, then by name); each goes to the spare node with the most
    VRAM (then the lowest node id) that has it on disk, fits it and has not
    taken another.  Every node computes this from the same table and gets the
    same answer, so two standbys never promote for the same model together.
    """
    spares = sorted(
        (n for n in mesh.nodes if n.role in SPARE_ROLES and n.vram_bytes > 0),
        key=lambda n: (-n.vram_bytes, n.node_id),
    )
    orphans = sorted(
        (m for m in mesh.models if not m.hosts),
        key=lambda m: (-len(m.requested_by), m.name),
    )
    winners: dict[str, str] = {}
    for info in orphans:
        for n in spares:
            if n.node_id in winners:
                continue
            if not fits(n.vram_bytes, n.size_of(info.name)):
                continue
            if eligible is not None and not eligible(n, info.name):
                continue
            winners[n.node_id] = info.name
            break
    return winners


@hookimpl(trylast=True)
def meshd_promote(node: NodeView, mesh: MeshView) -> str | bool:
    return promotion_winners(mesh).get(node.node_id, False)


# -- split groups ---------------------------------------------------------------


def elect(group: tuple[NodeView, ...]) -> str:
    """The most VRAM, ties broken by the lowest node id."""
    return min(group, key=lambda n: (-n.vram_bytes, n.node_id)).node_id


@hookimpl(trylast=True)
def meshd_elect_host(group: tuple[NodeView, ...]) -> str:
    return elect(group)


def plan(
    size_bytes: int,
    host: str,
    group: tuple[NodeView, ...],
    mesh: MeshView,
    force_split: bool,
    tensor_split: tuple[float, ...] = (),
) -> SplitPlan:
    """Solo when the model fits one node (and split is not forced), else split or wait.

    Solo wins whenever any node fits, so peers around never cause an accidental
    split.  A split uses the host and the peers within ``mesh.max_rtt_ms`` (the
    others stay in the mesh, left out of this split only); shares follow VRAM,
    or ``tensor_split``'s weights (host first, then the others by node id) when
    they are valid for that node set.
    """
    need = need_bytes(size_bytes)
    fitting = tuple(n.node_id for n in sorted(group, key=_by_id) if fits(n.vram_bytes, size_bytes))
    if fitting and not force_split:
        return SplitPlan(
            mode=PlanMode.SOLO, solo=fitting, need_bytes=need,
            reason=f"fits {len(fitting)} of {len(group)} node(s): no split",
        )
    by_id = {n.node_id: n for n in group}
    host_node = by_id[host]
    near, skipped = split_nodes(host_node, group, mesh.max_rtt_ms)
    skip_text = f"; skipped {', '.join(skipped)}" if skipped else ""
    if len(near) == 1 and fits(host_node.vram_bytes, size_bytes):
        return SplitPlan(
            mode=PlanMode.SOLO, solo=(host,), need_bytes=need,
            reason=f"split forced but no peer within {mesh.max_rtt_ms:.0f} ms: solo{skip_text}",
        )
    have = sum(n.vram_bytes for n in near)
    if have < need:
        return SplitPlan(
            mode=PlanMode.WAIT, host=host, need_bytes=need, have_bytes=have,
            reason=f"need {gib(need)}, group has {gib(have)} of {_nodes_text(len(near))}{skip_text}",
        )
    shares, weights_problem = _shares(near, tensor_split)
    why = "split forced" if fitting else "fits no single node"
    weights_text = f"; {weights_problem}" if weights_problem else ""
    return SplitPlan(
        mode=PlanMode.SPLIT, host=host, shares=shares, need_bytes=need, have_bytes=have,
        reason=f"{why}: split over {len(near)} nodes{skip_text}{weights_text}",
    )


def split_nodes(
    host: NodeView, group: tuple[NodeView, ...], max_rtt_ms: float, *,
    unmeasured_near: bool = False,
) -> tuple[list[NodeView], list[str]]:
    """The nodes a split uses (the host first, then the others by node id) and the skipped ones.

    A peer whose RTT is over ``max_rtt_ms`` is left out: llama.cpp's RPC makes
    several round trips per token, so one far peer slows the whole split.  A
    peer not measured yet (``rtt_ms`` None: just connected, or known only from
    gossip, with no connection of ours to carry a tunnel) is left out too, until
    its first PONG: counted as near, a far peer would join the first plan and
    force a restart a heartbeat later, its share of the weights sent over the
    slow link for nothing.  ``unmeasured_near`` counts it (the download gate:
    it is measured long before a download ends).
    """
    near: list[NodeView] = [host]
    skipped: list[str] = []
    for n in sorted(group, key=_by_id):
        if n.node_id == host.node_id:
            continue
        if n.rtt_ms is None and not unmeasured_near:
            skipped.append(f"{n.node_id} (RTT not measured yet)")
            continue
        if n.rtt_ms is not None and n.rtt_ms > max_rtt_ms:
            skipped.append(f"{n.node_id} ({n.rtt_ms:.0f} ms > {max_rtt_ms:.0f} ms)")
            continue
        near.append(n)
    return near, skipped


def tensor_split_problem(weights: tuple[float, ...], nodes: int) -> str | None:
    """Why ``[models] tensor_split`` cannot give the shares of ``nodes`` nodes (None: it can)."""
    if len(weights) != nodes:
        return f"[models] tensor_split has {len(weights)} weights for {_nodes_text(nodes)}"
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            return f"[models] tensor_split[{i}] is {w!r}, not a finite number > 0"
    return None


def _shares(
    near: list[NodeView], tensor_split: tuple[float, ...]
) -> tuple[tuple[tuple[str, float], ...], str | None]:
    """The shares of ``near`` and, when ``tensor_split`` was given but unusable, why."""
    problem = None
    if tensor_split:
        problem = tensor_split_problem(tuple(tensor_split), len(near))
        if problem is None:
            total = float(sum(tensor_split))
            pairs = zip(near, tensor_split, strict=True)
            return tuple((n.node_id, float(w) / total) for n, w in pairs), None
        problem += ": shares follow VRAM"
    have = sum(n.vram_bytes for n in near)
    return tuple((n.node_id, n.vram_bytes / have) for n in near), problem


def _nodes_text(n: int) -> str:
    return "1 node" if n == 1 else f"{n} nodes"


@hookimpl(trylast=True)
def meshd_plan_split(
    size_bytes: int,
    host: str,
    group: tuple[NodeView, ...],
    mesh: MeshView,
    force_split: bool,
    tensor_split: tuple[float, ...],
) -> SplitPlan:
    return plan(size_bytes, host, group, mesh, force_split, tensor_split)


def split_peers_available(size_bytes: int, me: NodeView, view: MeshView) -> bool:
    """Whether peers the planner would use make a model that does not fit ``me`` fit the group.

    The download gate's ``split_peers_available``: the active (non-passive)
    peers within ``view.max_rtt_ms`` plus this node hold at least the VRAM the
    model needs, and there is at least one such peer.  Peers count with their
    whole ``vram_bytes``: a NodeView says which models a node serves but not
    how much of its VRAM each takes (a worker's share is not in the view), so
    what a peer already serves is not subtracted.
    """
    group = tuple(n for n in view.nodes if not n.passive and n.node_id != me.node_id)
    near, _ = split_nodes(me, (me, *group), view.max_rtt_ms, unmeasured_near=True)
    if len(near) < 2:
        return False
    return sum(n.vram_bytes for n in near) >= need_bytes(size_bytes)


# -- downloads -------------------------------------------------------------------


@hookimpl(trylast=True)
def meshd_allow_download(size_bytes: int, node: NodeView, split_peers_available: bool) -> bool:
    return download_allowed(size_bytes, node.vram_bytes, split_peers_available)


def _by_id(n: NodeView) -> str:
    return n.node_id


# the hook functions by hook name, for meshd.placement.rules's last-resort fallback
HOOKS: Mapping[str, Callable[..., Any]] = {
    "meshd_select_host": meshd_select_host,
    "meshd_assign_model": meshd_assign_model,
    "meshd_promote": meshd_promote,
    "meshd_elect_host": meshd_elect_host,
    "meshd_plan_split": meshd_plan_split,
    "meshd_allow_download": meshd_allow_download,
}
