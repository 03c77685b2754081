"""The placement hooks: the plugin author's reference.

Every placement decision meshd makes goes through one of these hooks.  A
plugin is a Python module (or object) with functions named like the hooks
below, each marked with ``hookimpl`` (a ``meshd_`` function without the
marker is refused at load time)::

    import pluggy
    hookimpl = pluggy.HookimplMarker("meshd")

    @hookimpl
    def meshd_select_host(model, client_id, hosts, mesh, settings):
        ...

Rules that hold for every hook:

- A function takes any subset of the hook's arguments, by name, as plain
  parameters: one with a default (``settings=None``), ``*args`` or
  ``**kwargs`` would never be passed anything, and is refused at load time.
- Arguments are frozen snapshots (``meshd.placement.snapshot``): ``NodeView``,
  ``MeshView``, tuples, strings, numbers.  ``settings`` is this plugin's own
  ``[policy.<plugin name>]`` table from ``/etc/meshd.toml``, read-only
  (tables are mappings, lists are tuples; empty when there is none).
- Hooks are synchronous and must be cheap: ``meshd_select_host`` runs for
  every request.  Do no I/O and never block.  Every call is timed; one that
  takes longer than ``[policy] slow_hook_ms`` (50 ms) is reported in the log
  with the plugin's name.
- Operator plugins are asked before the default plugin (``tryfirst`` /
  ``trylast`` order them among themselves; the default stays last); for the hooks marked
  *first answer wins*, the first plugin that returns something other than
  ``None`` decides, and ``None`` means "no opinion, ask the next plugin".
- A hook that raises, or returns a value of the wrong type or out of range
  (a host that is not in ``hosts``), is logged with the plugin's name and
  treated as ``None``: the next plugin, and in the end the default plugin,
  decides.  Hooks in :data:`FAIL_CLOSED` (``meshd_allow_download``) fail
  closed instead: the failing plugin's answer is a refusal.  The daemon
  never dies of a plugin.

The check for what each hook may return lives beside its spec, in
:data:`RESULT_CHECKS`; ``meshd.placement.rules`` applies it to every answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from meshd.placement.snapshot import MeshView, NodeView, SplitPlan
from meshd.states import PlanMode

PROJECT = "meshd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def meshd_configure(settings: Mapping[str, Any]) -> None:
    """Check (and, if you like, pre-compute from) this plugin's settings.

    Called once for each plugin that implements it, after all plugins are
    loaded, at start-up and by ``meshd --check-config``, with that plugin's
    own ``[policy.<name>]`` table (read-only; empty mapping when absent).

    Raise ``ValueError("what is wrong")`` to reject the settings: the daemon
    refuses to start and ``--check-config`` prints
    ``[policy.<name>] what is wrong``.  The return value is ignored.
    """


@hookspec(firstresult=True)
def meshd_select_host(
    model: str,
    client_id: str,
    hosts: tuple[NodeView, ...],
    mesh: MeshView,
    settings: Mapping[str, Any],
) -> str | None:
    """Which host of ``model`` serves this request.

    Called by the API of every node, active or passive, once per request
    for a model with two or more ready hosts (with one there is nothing to
    choose, and it is not called).  On a node that hosts the model itself,
    this node is one of ``hosts``: the hook decides there too.  The answer
    is tried first; when it cannot be reached, the request fails over
    without asking again: to this node when it is a host, then to the
    others by node id (a passive node tries one of them).

    - ``model``: the model named in the request.
    - ``client_id``: a stable id for the caller (the API client); the same
      client should land on the same host.
    - ``hosts``: every node that hosts ``model`` and is ready, this node
      included when it is one (``h.node_id == mesh.self_id``), sorted by
      node id; at least two.
    - ``mesh``: the whole mesh as this node sees it; ``mesh.self_id`` is the
      node asking (a passive node's own id is never among ``hosts``).

    Return the ``node_id`` (``str``) of one of ``hosts``, or ``None`` for no
    opinion.  First answer wins.  Default: this node when it is among
    ``hosts`` (its own llama-server, no tunnel); else ``hosts[h %
    len(hosts)]`` where ``h`` is the first 8 bytes (big-endian) of
    ``sha256(client_id + model)``, so every other node and every passive
    client computes the same host.
    """


@hookspec(firstresult=True)
def meshd_assign_model(
    node: NodeView, mesh: MeshView, settings: Mapping[str, Any]
) -> tuple[str | None, str] | None:
    """What a node that joins without a model (or a promoted standby) serves.

    Called when an active node has nothing to serve (it joined without a
    model, or its model was dropped), and when a standby promotes with
    ``True`` from ``meshd_promote``.  Never called for clients.

    - ``node``: the node that needs a model (``mesh.self_id``).
    - ``mesh``: the mesh; ``mesh.models`` is the catalog (the union of every
      node's requested, on-disk and served models, with hosts and sizes).

    Return ``(model_name, reason)``: serve ``model_name`` (downloading it
    when it is not on the node's disk, which ``meshd_allow_download`` still
    gates); ``(None, reason)``: serve nothing, stay idle; ``None``: no
    opinion.  ``reason`` is one line for the log.  First answer wins.
    Default: an unserved model on disk, else an unserved model it could
    download, else the least-served model on disk, else the least-served
    model; only models that fit (VRAM >= size x 1.1).
    """


@hookspec(firstresult=True)
def meshd_promote(
    node: NodeView, mesh: MeshView, settings: Mapping[str, Any]
) -> bool | str | None:
    """Whether a standby (or idle) node starts serving now.

    Called at every check-in of a standby node (each routing-table refresh)
    and, on active idle nodes, on every membership event (a death, a leave,
    a drop).  Never called for clients.

    - ``node``: the node asking (``mesh.self_id``), role ``standby`` or
      ``idle``.
    - ``mesh``: the mesh, including the other standby nodes the routing
      table lists, so every standby can compute the same tie-break.

    Return a model name (``str``): promote and serve that model; ``True``:
    promote and let ``meshd_assign_model`` choose the model; ``False``: do
    not promote this round; ``None``: no opinion (like pytest's
    ``pytest_ignore_collect``).  First answer wins.  Default: promote when
    a model the node has on disk, and that fits it, has no host; when
    several standby nodes could serve the same orphaned model, the one with
    the most VRAM (then the lowest node id) takes it, and each node takes
    at most one model, so two standbys never promote for the same model in
    the same round.
    """


@hookspec(firstresult=True)
def meshd_elect_host(
    model: str, group: tuple[NodeView, ...], mesh: MeshView, settings: Mapping[str, Any]
) -> str | None:
    """Which node of a split group runs llama-server (the others run rpc-server).

    Called on every membership event for each model whose group must split
    (and before ``meshd_plan_split``).  Every node of the group computes it,
    so an answer must depend only on data every node has (not ``rtt_ms``).

    - ``model``: the model.
    - ``group``: the active, non-client nodes serving ``model``, sorted by
      node id; never empty.
    - ``mesh``: the mesh.

    Return the ``node_id`` of one node in ``group``, or ``None``.  First
    answer wins.  Default: the most VRAM, ties broken by the lowest node id.
    """


@hookspec(firstresult=True)
def meshd_plan_split(
    model: str,
    size_bytes: int,
    host: str,
    group: tuple[NodeView, ...],
    mesh: MeshView,
    force_split: bool,
    tensor_split: tuple[float, ...],
    settings: Mapping[str, Any],
) -> SplitPlan | None:
    """Whether a group runs ``model`` solo or split, over which peers, in what shares.

    Called on every membership event for each model this node serves; the
    host's plan is the one acted on (llama-server restarts only when its
    worker set changes).

    - ``model``, ``size_bytes``: the model and its size on disk.
    - ``host``: the node elected by ``meshd_elect_host``.
    - ``group``: the active, non-client nodes serving ``model``, sorted by
      node id, ``host`` among them.
    - ``mesh``: the mesh; ``mesh.max_rtt_ms`` is ``[models] max_rtt_ms`` and
      each node's ``rtt_ms`` is measured from ``mesh.self_id``.
    - ``force_split``: ``[models] split`` (or ``meshd --split``).
    - ``tensor_split``: ``[models] tensor_split`` as read on this node, as
      given (``()`` when unset; not checked against the group: the plan
      decides).  Plugins written before this argument leave it out of their
      signature and keep working.

    Return a ``meshd.placement.snapshot.SplitPlan`` (``mode`` ``"solo"`` with the node
    ids that run alone, ``"split"`` with ``host`` and ``shares``, or
    ``"wait"`` with a ``reason``), or ``None``.  First answer wins.
    Default: solo on every node with VRAM >= size x 1.1 unless split is
    forced; otherwise split over the host and the peers within
    ``max_rtt_ms``, shares proportional to VRAM, or to ``tensor_split``'s
    weights in the order host first, then the others by node id (a length
    that does not match, or a weight that is not finite and > 0, falls back
    to VRAM and the reason says so); ``"wait"`` with "need X GiB, group has
    Y GiB of N nodes" while they hold less than size x 1.1
    (``meshd.placement.fit``).
    """


@hookspec(firstresult=True)
def meshd_allow_download(
    model: str,
    size_bytes: int,
    node: NodeView,
    split_peers_available: bool,
    mesh: MeshView,
    settings: Mapping[str, Any],
) -> bool | str | tuple[bool, str] | None:
    """Whether this node may download ``model``.

    Called before every download: one the assignment started, ``meshctl
    download NAME``, a ``[models] serve`` entry not on disk.

    - ``model``, ``size_bytes``: the model and its download size.
    - ``node``: this node.
    - ``split_peers_available``: the active peers within ``max_rtt_ms`` that
      a split would use, with this node, hold the VRAM the model needs
      (``meshd.placement.default.split_peers_available``).
    - ``mesh``: the mesh.

    Return ``True`` (download), ``False`` (do not), or ``None`` (no opinion,
    like pytest's ``pytest_ignore_collect``); to say why, return a ``str``
    (do not download, for this reason) or ``(allowed, reason)``.  The reason
    reaches the log, ``meshctl download`` and ``meshctl status``.  First
    answer wins.  Default: ``True`` when VRAM >= size x 1.1 or
    ``split_peers_available`` (its refusal gives the numbers).

    This hook fails closed: a plugin that raises or returns something
    invalid here refuses the download (the next plugin is not asked), so a
    broken gate never lets through a download it was written to stop.
    """


# -- what each hook may return ------------------------------------------------


def _check_host(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if not isinstance(result, str):
        return f"expected a node_id (str), got {_describe(result)}"
    if not any(h.node_id == result for h in kwargs["hosts"]):
        return f"{result!r} is not one of the hosts ({', '.join(h.node_id for h in kwargs['hosts'])})"
    return None


def _check_elected(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if not isinstance(result, str):
        return f"expected a node_id (str), got {_describe(result)}"
    if not any(n.node_id == result for n in kwargs["group"]):
        return f"{result!r} is not in the group ({', '.join(n.node_id for n in kwargs['group'])})"
    return None


def _check_assignment(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if not (isinstance(result, tuple) and len(result) == 2):
        return f"expected (model, reason) or (None, reason), got {_describe(result)}"
    model, reason = result
    if model is not None and not (isinstance(model, str) and model):
        return f"model must be a non-empty str or None, got {_describe(model)}"
    if not isinstance(reason, str):
        return f"reason must be a str, got {_describe(reason)}"
    return None


def _check_promote(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if isinstance(result, bool):
        return None
    if isinstance(result, str) and result:
        return None
    return f"expected True, False or a model name, got {_describe(result)}"


def _check_download(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if isinstance(result, bool):
        return None
    if isinstance(result, str):
        return None if result.strip() else "a refusal's reason must not be empty"
    if isinstance(result, tuple) and len(result) == 2:
        allowed, reason = result
        if not isinstance(allowed, bool):
            return f"(allowed, reason): allowed must be True or False, got {_describe(allowed)}"
        if not (isinstance(reason, str) and reason.strip()):
            return f"(allowed, reason): reason must be a non-empty str, got {_describe(reason)}"
        return None
    return (f"expected True, False, a reason for refusing (str) or (allowed, reason), "
            f"got {_describe(result)}")


def _check_plan(result: Any, kwargs: Mapping[str, Any]) -> str | None:
    if not isinstance(result, SplitPlan):
        return f"expected a meshd.placement.snapshot.SplitPlan, got {_describe(result)}"
    ids = {n.node_id for n in kwargs["group"]}
    if result.mode == PlanMode.SOLO:
        if not result.solo:
            return "a solo plan must name at least one node in solo"
        stray = [i for i in result.solo if i not in ids]
        if stray:
            return f"solo names nodes not in the group: {', '.join(map(str, stray))}"
        return None
    if result.mode not in (PlanMode.SPLIT, PlanMode.WAIT):
        return f"mode must be 'solo', 'split' or 'wait', got {result.mode!r}"
    if result.host not in ids:
        return f"host {result.host!r} is not in the group"
    if result.mode == PlanMode.WAIT:
        return None if result.reason else "a wait plan needs a reason"
    if not result.shares:
        return "a split plan needs shares"
    for entry in result.shares:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            return f"shares must be (node_id, share) pairs, got {_describe(entry)}"
        node_id, share = entry
        if node_id not in ids:
            return f"share for {node_id!r}, which is not in the group"
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0:
            return f"share for {node_id!r} must be a number > 0, got {share!r}"
    if result.shares[0][0] != result.host:
        return "the host's share must come first"
    if len({s[0] for s in result.shares}) != len(result.shares):
        return "a node appears twice in shares"
    total = sum(s[1] for s in result.shares)
    if abs(total - 1.0) > 1e-6:
        return f"shares sum to {total:g}, not 1"
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


RESULT_CHECKS: dict[str, Callable[[Any, Mapping[str, Any]], str | None]] = {
    "meshd_select_host": _check_host,
    "meshd_assign_model": _check_assignment,
    "meshd_promote": _check_promote,
    "meshd_elect_host": _check_elected,
    "meshd_plan_split": _check_plan,
    "meshd_allow_download": _check_download,
}


@dataclass(frozen=True)
class FailClosed:
    """What a hook answers for a plugin that failed, instead of asking the next plugin.

    ``answer(why)`` is the answer; ``consequence`` ends the log line.
    """

    answer: Callable[[str], Any]
    consequence: str


def _refuse_download(why: str) -> tuple[bool, str]:
    return False, f"the plugin failed ({why}), and a download gate that fails refuses"


# hooks that fail closed: a plugin's failure is a "no", not a pass to the next plugin.
# Every other hook fails over: the next plugin (in the end the default) decides.
FAIL_CLOSED: dict[str, FailClosed] = {
    "meshd_allow_download": FailClosed(_refuse_download, "refusing the download"),
}


def hook_names() -> list[str]:
    """Every hook meshd defines, in the order of this module."""
    marker = PROJECT + "_spec"
    return [name for name, obj in globals().items() if name.startswith("meshd_") and hasattr(obj, marker)]
