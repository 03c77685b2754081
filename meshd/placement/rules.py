"""The placement decisions, each in one function: the only call sites of the hooks.

The mesh, the API and the model manager never call a hook themselves; they
call these.  Each function asks the plugins (``meshd.placement.plugins``), takes the
first valid answer, and when no plugin gives one (all said ``None``, failed,
or were disabled) decides itself:

| function          | when nobody answers                                   |
| ----------------- | ----------------------------------------------------- |
| order_hosts       | the built-in default (a request must go somewhere)    |
| choose_host       | the built-in default                                   |
| elect_host        | the built-in default                                   |
| plan_split        | the built-in default                                   |
| assign_model      | no model: the node stays idle                          |
| should_promote    | no promotion                                           |
| allow_download    | no download (and a plugin that fails refuses)          |

With the default plugin enabled (the normal case) it always answers, so a
plugin that fails or returns something invalid gets the default's decision.
Functions that must answer and whose built-in default also fails (a bug)
fall back to the plainest answer (the first host by node id) with an error
in the log: a plugin never takes the daemon down.

Every function takes ``policy=``, the daemon's :class:`meshd.placement.plugins.PolicyManager`;
without it, the default plugin alone decides.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshd.placement import default, fit, hookspecs
from meshd.placement.plugins import PolicyManager, default_manager
from meshd.placement.snapshot import MeshView, NodeView, SplitPlan
from meshd.states import PlanMode, Role

log = logging.getLogger("meshd.policy")

# decided_by for answers meshd gives without asking a plugin
BUILT_IN = "meshd"


@dataclass(frozen=True)
class Assignment:
    """What a node serves: ``model`` None means nothing (stay idle)."""

    model: str | None
    reason: str
    # the model is not on the node's disk: serving it needs a download
    download: bool = False
    decided_by: str = ""


@dataclass(frozen=True)
class Promotion:
    promote: bool
    model: str | None
    reason: str
    decided_by: str = ""


@dataclass(frozen=True)
class DownloadDecision:
    allowed: bool
    reason: str
    decided_by: str = ""


def _ask(policy: PolicyManager | None, hook: str, **kwargs: Any) -> tuple[Any, str | None]:
    return (policy or default_manager()).call(hook, **kwargs)


# (hook, the plugin that answered or BUILT_IN, the answer, the plugins asked in order):
# what ``meshctl explain`` shows (``meshd.placement.explain``); a caller that wants them
# passes a list as ``answers=``
HookRecord = tuple[str, str, Any, tuple[str, ...]]


def _record(answers: list[HookRecord] | None, policy: PolicyManager | None, hook: str,
            by: str | None, result: Any) -> None:
    if answers is not None:
        asked = tuple((policy or default_manager()).hook_order(hook))
        answers.append((hook, by or BUILT_IN, result, asked))


_DEFAULT_ARGS: dict[str, tuple[str, ...]] = {}


def _built_in(hook: str, last_resort: Callable[[], Any], **kwargs: Any) -> Any:
    """The default plugin's answer computed directly; ``last_resort()`` if that fails too."""
    fn = default.HOOKS[hook]
    args = _DEFAULT_ARGS.get(hook)
    if args is None:
        args = _DEFAULT_ARGS[hook] = tuple(inspect.signature(fn).parameters)
    try:
        result = fn(**{a: kwargs[a] for a in args})
        problem = hookspecs.RESULT_CHECKS[hook](result, kwargs)
    except Exception as e:
        log.error("built-in %s failed: %s: %s; using the plainest answer", hook, type(e).__name__, e)
        return last_resort()
    if problem is not None:
        log.error("built-in %s gave an invalid answer: %s; using the plainest answer", hook, problem)
        return last_resort()
    return result


def _by_id(n: NodeView) -> str:
    return n.node_id


def _members(group: tuple[NodeView, ...]) -> tuple[NodeView, ...]:
    """The nodes that take part in an election: active and not clients, sorted by id."""
    return tuple(sorted((n for n in group if not n.passive), key=_by_id))


# -- per request ------------------------------------------------------------------


def choose_host(
    model: str,
    client_id: str,
    hosts: tuple[NodeView, ...],
    mesh: MeshView,
    *,
    policy: PolicyManager | None = None,
    answers: list[HookRecord] | None = None,
) -> str:
    """The node id of the host that serves this request for ``model``.

    ``hosts``: the ready hosts of the model (``mesh.hosts_of(model)`` minus
    any that failed); must not be empty (the caller answers 503 first).
    For failover, call again without the failed host.
    """
    if not hosts:
        raise ValueError(f"no hosts to choose from for {model!r}")
    if len(hosts) > 1:
        hosts = tuple(sorted(hosts, key=_by_id))
    kwargs = {"model": model, "client_id": client_id, "hosts": hosts, "mesh": mesh}
    result, by = _ask(policy, "meshd_select_host", **kwargs)
    if result is None:
        result = _built_in("meshd_select_host", lambda: hosts[0].node_id, **kwargs)
    _record(answers, policy, "meshd_select_host", by, result)
    return result


def order_hosts(
    model: str,
    client_id: str,
    hosts: tuple[NodeView, ...],
    mesh: MeshView,
    *,
    policy: PolicyManager | None = None,
    answers: list[HookRecord] | None = None,
) -> list[str]:
    """Every ready host of ``model``, in the order one request tries them.

    The one call site of ``meshd_select_host`` for requests, on active and
    passive nodes alike, so the hook is asked once per request and sees every
    ready host, this node among them when it is one (``mesh.self_id``): the
    plugin decides, and the default keeps this node's own llama-server first.
    After its choice come the failover hosts: this node when it hosts the
    model (no tunnel to open), then the others by node id.  With one host
    there is nothing to choose, and the hook is not asked.
    """
    ordered = tuple(sorted(hosts, key=_by_id))
    if not ordered:
        raise ValueError(f"no hosts to choose from for {model!r}")
    if len(ordered) == 1:
        return [ordered[0].node_id]
    first = choose_host(model, client_id, ordered, mesh, policy=policy, answers=answers)
    rest = [n.node_id for n in ordered if n.node_id != first]
    if mesh.self_id in rest:
        rest.remove(mesh.self_id)
        rest.insert(0, mesh.self_id)
    return [first, *rest]


# -- on membership events -------------------------------------------------------------


def elect_host(
    model: str,
    group: tuple[NodeView, ...],
    mesh: MeshView,
    *,
    policy: PolicyManager | None = None,
    answers: list[HookRecord] | None = None,
) -> str:
    """The node id that hosts ``model``'s split group (clients and passive nodes left out)."""
    members = _members(group)
    if not members:
        raise ValueError(f"no active node in the group of {model!r}")
    kwargs = {"model": model, "group": members, "mesh": mesh}
    result, by = _ask(policy, "meshd_elect_host", **kwargs)
    if result is None:
        result = _built_in("meshd_elect_host", lambda: members[0].node_id, **kwargs)
    _record(answers, policy, "meshd_elect_host", by, result)
    log.debug("model %s: %s elected host of %d node(s) (by %s)", model, result, len(members), by or BUILT_IN)
    return result


def plan_split(
    model: str,
    size_bytes: int,
    group: tuple[NodeView, ...],
    mesh: MeshView,
    *,
    force_split: bool = False,
    tensor_split: tuple[float, ...] = (),
    policy: PolicyManager | None = None,
    answers: list[HookRecord] | None = None,
) -> SplitPlan:
    """Solo or split for ``model`` over ``group``: elects the host, then asks for the plan.

    ``tensor_split``: ``[models] tensor_split`` as read on the host; the plan
    (not config load) judges whether it matches the nodes of the split.
    ``answers``: a list that gets a :data:`HookRecord` for each hook asked.
    """
    members = _members(group)
    if not members:
        raise ValueError(f"no active node in the group of {model!r}")
    host = elect_host(model, members, mesh, policy=policy, answers=answers)
    kwargs = {
        "model": model, "size_bytes": size_bytes, "host": host, "group": members,
        "mesh": mesh, "force_split": force_split, "tensor_split": tuple(tensor_split),
    }
    result, by = _ask(policy, "meshd_plan_split", **kwargs)
    if result is None:
        by = BUILT_IN

        def plainest() -> SplitPlan:
            return SplitPlan(mode=PlanMode.WAIT, host=host, reason="no usable split plan (see the log)")

        result = _built_in("meshd_plan_split", plainest, **kwargs)
    _record(answers, policy, "meshd_plan_split", by, result)
    log.debug("model %s: plan %s (%s) by %s", model, result.mode, result.reason, by)
    return dataclasses.replace(result, decided_by=by)


def assign_model(
    node: NodeView, mesh: MeshView, *, policy: PolicyManager | None = None
) -> Assignment:
    """What ``node`` (joining without a model, or promoting) should serve."""
    if node.role == Role.CLIENT:
        return Assignment(None, "clients never serve", decided_by=BUILT_IN)
    if mesh.node(node.node_id) is None:
        mesh = mesh.with_node(node)
    result, by = _ask(policy, "meshd_assign_model", node=node, mesh=mesh)
    if result is None:
        decision = Assignment(None, "no plugin assigned a model", decided_by=BUILT_IN)
    else:
        name, reason = result
        decision = Assignment(
            name, reason, download=name is not None and not node.has(name), decided_by=by or ""
        )
    if decision.model is None:
        log.info("no model for this node: %s (decided by %s)", decision.reason, decision.decided_by)
    else:
        log.info(
            "this node will serve %s: %s (decided by %s)",
            decision.model, decision.reason, decision.decided_by,
        )
    return decision


def should_promote(
    node: NodeView, mesh: MeshView, *, policy: PolicyManager | None = None
) -> Promotion:
    """Whether standby/idle ``node`` starts serving now, and which model."""
    if node.role == Role.CLIENT:
        return Promotion(False, None, "clients never serve", BUILT_IN)
    if mesh.node(node.node_id) is None:
        mesh = mesh.with_node(node)
    result, by = _ask(policy, "meshd_promote", node=node, mesh=mesh)
    if result is None or result is False:
        why = "no orphaned model for this node" if result is False else "no plugin wants a promotion"
        if result is False and by != default.NAME:
            why = f"plugin {by} declined"
        decision = Promotion(False, None, why, by or BUILT_IN)
        log.debug("not promoting: %s", decision.reason)
        return decision
    if result is True:
        assignment = assign_model(node, mesh, policy=policy)
        if assignment.model is None:
            return Promotion(
                False, None, f"plugin {by} asked to promote, but {assignment.reason}", by or ""
            )
        decision = Promotion(True, assignment.model, f"plugin {by} asked to promote; {assignment.reason}", by or "")
    else:
        info = mesh.model(result)
        orphan = info is not None and not info.hosts
        why = f"{result} has no host and this node can serve it" if orphan else f"to serve {result}"
        if by != default.NAME:
            why = f"plugin {by}: {why}"
        decision = Promotion(True, result, why, by or "")
    log.info("promoting: %s", decision.reason)
    return decision


def allow_download(
    model: str,
    size_bytes: int,
    node: NodeView,
    mesh: MeshView | None = None,
    *,
    split_peers_available: bool = False,
    policy: PolicyManager | None = None,
) -> DownloadDecision:
    """Whether ``node`` may download ``model`` (``size_bytes``); the reason is for log and status.

    The download gate, the only one: the daemon's downloader calls it (through
    the ``gate`` it is given, or by itself without one).  ``split_peers_available``:
    the split plan puts this node in a group that needs the model.  ``mesh`` may
    be left out where no view is at hand.
    """
    if mesh is None:
        mesh = MeshView(self_id=node.node_id, nodes=(node,))
    result, by = _ask(
        policy, "meshd_allow_download", model=model, size_bytes=size_bytes, node=node,
        split_peers_available=split_peers_available, mesh=mesh,
    )
    if result is None:
        decision = DownloadDecision(False, f"{model}: no plugin allowed the download: not downloading", BUILT_IN)
    else:
        # True / False, a refusal's reason (str), or (allowed, reason): hookspecs checked which
        if isinstance(result, str):
            allowed, why = False, result
        elif isinstance(result, tuple):
            allowed, why = result
        else:
            allowed, why = bool(result), ""
        if by == default.NAME and not why:
            reason = fit.download_reason(model, size_bytes, node.vram_bytes, allowed)
        else:
            verb = "allowed" if allowed else "refused"
            reason = f"{model}: plugin {by} {verb} the download" + (f": {why}" if why else "")
        decision = DownloadDecision(allowed, reason, by or "")
    (log.info if decision.allowed else log.warning)("download: %s", decision.reason)
    return decision
