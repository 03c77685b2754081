"""Why a model is where it is: the last election for it, told in full (``meshctl explain``).

Every time the election plans a model (``meshd.placement.election``), it
records here what it read and what it concluded: the group and each node's
VRAM, RTT and files, the settings (the fit rule, ``[models] split``,
``tensor_split``, ``max_rtt_ms``), which plugin answered each hook and what it
answered, and for every node of the mesh its part in the plan, or why it has
none, as a sentence with the numbers ("needs 5.3 GiB, has 4.0 GiB", "RTT
120 ms > 80 ms").  The node keeps the last one per model in memory
(:class:`ExplanationStore`); the control socket, ``meshctl explain`` and the
console read it through :func:`explain_model`, which adds what a request for
the model would do now (the host order a given client gets, and which plugin
chose its first host).

A model this node has no election for (it is not in the model's group) is
explained by planning it now, from this node's view, exactly as a group
member would; the answer says so, since RTTs are this node's.

Building an explanation is pure (:func:`explain_plan`), so it is tested with
plain views and no daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from meshd.placement.default import NAME as DEFAULT_NAME
from meshd.placement.fit import FIT_FACTOR, fits, needed_bytes
from meshd.placement.snapshot import MeshView, NodeView, SplitPlan
from meshd.states import PlanMode
from meshd.units import gib

if TYPE_CHECKING:
    from meshd.placement.rules import HookRecord

# where an explanation comes from
ELECTED_HERE = "election on this node"
COMPUTED_NOW = ("planned now on this node, which is not in the group: the group's nodes "
                "plan the same way from their own RTTs")
PASSIVE_NOW = ("planned now on this passive node from its routing table, which carries no "
               "RTTs: the group's nodes plan the same way from their own")


class Part(StrEnum):
    """A node's part in a model's plan (``nodes[].part`` of ``meshctl explain --json``)."""

    SOLO = "solo"  # runs its own llama-server with the whole model
    HOST = "split host"  # runs llama-server over the workers' rpc-servers
    WORKER = "split worker"  # lends its VRAM to the host through an rpc-server
    WAITING = "waiting"  # in the group, nothing runs yet (short of VRAM)
    LEFT_OUT = "left out"  # in the group, not in the plan (too small, too far)
    NOT_IN_GROUP = "not in the group"  # not set to serve the model


def name_of(node: Any) -> str | None:
    """A node's human name (``[node] name``, carried in gossip) when its record has one."""
    name = node.get("name") if isinstance(node, Mapping) else getattr(node, "name", None)
    return name if isinstance(name, str) and name else None


def label(node_id: str, name: str | None) -> str:
    """``gpu-box-2 (01HX...)`` when the node has a name, else its id."""
    return f"{name} ({node_id})" if name else node_id


@dataclass(frozen=True)
class NodeInput:
    """One node as the election read it."""

    node_id: str
    name: str | None
    role: str
    vram_bytes: int
    rtt_ms: float | None  # from this node; 0 for itself, None when not measured yet
    in_group: bool  # set to serve the model (serving, loading or waiting for it)
    fits: bool  # VRAM >= size x FIT_FACTOR: it could run the model alone
    on_disk_bytes: int | None  # the model's file on this node's disk, None when it has none
    serving: tuple[str, ...] = ()  # what it announces it serves


@dataclass(frozen=True)
class HookAnswer:
    """One hook the decision asked: who answered, what, and who was asked before."""

    hook: str  # meshd_elect_host, meshd_plan_split, meshd_assign_model, ...
    answered_by: str  # the plugin, or "meshd" when no plugin answered (the built-in)
    answer: str  # the answer, in words
    asked: tuple[str, ...] = ()  # every plugin with the hook, in the order asked


@dataclass(frozen=True)
class NodePart:
    """One node's part in the plan, or why it has none."""

    node_id: str
    name: str | None
    part: Part
    reason: str
    share: float | None = None  # of the layers, in a split


@dataclass(frozen=True)
class Settings:
    """What the operator set that the election read (on this node)."""

    fit_factor: float = FIT_FACTOR
    split: bool = False  # [models] split: split even when the model fits a node
    tensor_split: tuple[float, ...] = ()  # [models] tensor_split
    max_rtt_ms: float = 80.0  # [models] max_rtt_ms


@dataclass(frozen=True)
class Explanation:
    """The last election for one model, as this node made it (or made it just now)."""

    model: str
    self_id: str
    at: float  # reactor seconds (wall clock in the daemon)
    source: str  # ELECTED_HERE or COMPUTED_NOW
    trigger: str  # what made it plan ("PeerUp", "serving m", "re-checking the split")
    size_bytes: int
    need_bytes: int
    settings: Settings
    mode: str  # solo, split or wait (a PlanMode); "" when there is no group
    host: str | None
    reason: str  # the plan's reason
    inputs: tuple[NodeInput, ...] = ()
    hooks: tuple[HookAnswer, ...] = ()
    nodes: tuple[NodePart, ...] = ()
    # this node's own part ("run", "wait", "worker") and why, when it is in the group
    local: Mapping[str, str] | None = None
    shares: tuple[tuple[str, float], ...] = field(default=())

    @property
    def fit_rule(self) -> str:
        return (f"a node runs a model alone when its VRAM >= the file's size x "
                f"{self.settings.fit_factor:g}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit_rule"] = self.fit_rule
        out["shares"] = [{"node_id": n, "share": round(s, 4)} for n, s in self.shares]
        return out


class ExplanationStore:
    """The last explanation per model, on this node, in memory (one per model it planned)."""

    def __init__(self) -> None:
        self._last: dict[str, Explanation] = {}

    def record(self, e: Explanation) -> None:
        self._last[e.model] = e

    def get(self, model: str) -> Explanation | None:
        return self._last.get(model)

    def models(self) -> list[str]:
        return sorted(self._last)


# -- building one --------------------------------------------------------------------


def hook_answers(records: Iterable[HookRecord]) -> tuple[HookAnswer, ...]:
    """``meshd.placement.rules``' records (hook, by, result, asked) in words."""
    return tuple(HookAnswer(hook, by, answer_text(hook, result), tuple(asked))
                 for hook, by, result, asked in records)


def answer_text(hook: str, result: Any) -> str:
    """A hook's answer as an operator reads it."""
    if isinstance(result, SplitPlan):
        text = f"{result.mode}"
        if result.mode == PlanMode.SOLO:
            text += f" on {', '.join(result.solo) or 'no node'}"
        elif result.host is not None:
            text += f", host {result.host}"
        if result.shares:
            text += " (" + ", ".join(f"{n} {s:.0%}" for n, s in result.shares) + ")"
        return text + (f": {result.reason}" if result.reason else "")
    if hook == "meshd_elect_host" and isinstance(result, str):
        return f"host {result}"
    if isinstance(result, tuple) and len(result) == 2:
        first, why = result
        return f"{first if first is not None else 'nothing'}: {why}" if why else str(first)
    return str(result)


def _input(n: NodeView, model: str, size_bytes: int, group_ids: frozenset[str]) -> NodeInput:
    return NodeInput(node_id=n.node_id, name=name_of(n), role=str(n.role),
                     vram_bytes=n.vram_bytes, rtt_ms=n.rtt_ms,
                     in_group=n.node_id in group_ids, fits=fits(n.vram_bytes, size_bytes),
                     on_disk_bytes=n.size_of(model), serving=tuple(n.serving))


def _rtt_problem(n: NodeView, max_rtt_ms: float) -> str | None:
    """Why a split leaves ``n`` out for its RTT (as the default planner does), or None."""
    if n.rtt_ms is None:
        return "RTT not measured yet (a split waits for its first heartbeat)"
    if n.rtt_ms > max_rtt_ms:
        return f"RTT {n.rtt_ms:.0f} ms > {max_rtt_ms:.0f} ms ([models] max_rtt_ms)"
    return None


def _needs(need: int, vram: int) -> str:
    return f"needs {gib(need)}, has {gib(vram)}"


def node_parts(
    model: str, size_bytes: int, group: Sequence[NodeView], view: MeshView, plan: SplitPlan | None,
    *, force_split: bool = False,
) -> tuple[NodePart, ...]:
    """Every node of ``view``: its part in ``plan`` over ``group``, or why it has none.

    The reasons come from the numbers the plan read (VRAM against the fit
    rule, RTT against ``max_rtt_ms``); a node that the numbers would have
    kept but a plugin's plan left out is said to be left out by that plugin.
    """
    need = needed_bytes(size_bytes)
    in_group = {n.node_id for n in group}
    by = plan.decided_by if plan is not None else ""
    shares = dict(plan.shares) if plan is not None else {}
    out: list[NodePart] = []
    for n in sorted(view.nodes, key=lambda v: v.node_id):
        name = name_of(n)
        if n.node_id not in in_group:
            out.append(NodePart(n.node_id, name, Part.NOT_IN_GROUP, _not_in_group(n, model)))
            continue
        assert plan is not None  # a group is always planned
        fit = fits(n.vram_bytes, size_bytes)
        if plan.mode == PlanMode.SOLO:
            if n.node_id in plan.solo:
                why = f"fits: {_needs(need, n.vram_bytes)}"
                if not fit:
                    why = f"{_plan_of(by)} runs it solo here: {_needs(need, n.vram_bytes)}"
                out.append(NodePart(n.node_id, name, Part.SOLO, why))
            elif not fit:
                out.append(NodePart(n.node_id, name, Part.WAITING,
                                    f"too small to run it alone: {_needs(need, n.vram_bytes)}"))
            elif force_split and (rtt := _rtt_problem(n, view.max_rtt_ms)) is not None:
                # [models] split, and no peer near enough to split with: the host runs it alone
                out.append(NodePart(n.node_id, name, Part.LEFT_OUT,
                                    f"{rtt}: too far to split with ([models] split), and the "
                                    f"host runs it alone"))
            else:
                out.append(NodePart(n.node_id, name, Part.LEFT_OUT,
                                    f"fits ({_needs(need, n.vram_bytes)}), but {_plan_of(by)} "
                                    f"runs it elsewhere"))
            continue
        rtt = _rtt_problem(n, view.max_rtt_ms) if n.node_id != plan.host else None
        if plan.mode == PlanMode.SPLIT:
            share = shares.get(n.node_id)
            if n.node_id == plan.host:
                out.append(NodePart(n.node_id, name, Part.HOST,
                                    f"elected host: {_share_text(share)} of the layers, "
                                    f"{gib(n.vram_bytes)} of VRAM", share))
            elif share is not None:
                out.append(NodePart(n.node_id, name, Part.WORKER,
                                    f"{_share_text(share)} of the layers, {gib(n.vram_bytes)} "
                                    f"of VRAM, RTT {_rtt_text(n.rtt_ms)}", share))
            else:
                out.append(NodePart(n.node_id, name, Part.LEFT_OUT,
                                    rtt or f"left out by {_plan_of(by)}"))
            continue
        # WAIT: the group together is short of VRAM
        if rtt is not None:
            out.append(NodePart(n.node_id, name, Part.LEFT_OUT,
                                f"{rtt}: its {gib(n.vram_bytes)} do not count"))
        elif n.node_id == plan.host:
            out.append(NodePart(n.node_id, name, Part.WAITING,
                                f"elected host, waiting: {plan.reason}"))
        else:
            out.append(NodePart(n.node_id, name, Part.WAITING,
                                f"worker of host {plan.host}, waiting: its "
                                f"{gib(n.vram_bytes)} count"))
    return tuple(out)


def _plan_of(by: str) -> str:
    """Whose plan it is, for a reason the numbers alone do not give."""
    return "the default plan" if by in (DEFAULT_NAME, "") else f"plugin {by}'s plan"


def _not_in_group(n: NodeView, model: str) -> str:
    if n.passive:
        return f"a {n.role}: passive nodes take no part in elections"
    what = f"serves {', '.join(n.serving)}" if n.serving else "serves nothing"
    disk = f"; has {model} on disk" if n.has(model) else ""
    return f"not set to serve {model} ({what}{disk})"


def _share_text(share: float | None) -> str:
    return f"{share:.0%}" if share is not None else "no share"


def _rtt_text(rtt: float | None) -> str:
    return "not measured" if rtt is None else f"{rtt:.0f} ms"


def explain_plan(
    model: str,
    size_bytes: int,
    group: Sequence[NodeView],
    view: MeshView,
    plan: SplitPlan | None,
    *,
    at: float,
    settings: Settings,
    records: Iterable[HookRecord] = (),
    trigger: str = "",
    source: str = ELECTED_HERE,
    local: Mapping[str, str] | None = None,
    extra_hooks: Sequence[HookAnswer] = (),
) -> Explanation:
    """The explanation of ``plan`` (None: the model has no group, nothing was planned)."""
    ids = frozenset(n.node_id for n in group)
    inputs = tuple(_input(n, model, size_bytes, ids)
                   for n in sorted(view.nodes, key=lambda v: v.node_id))
    if plan is None:
        mode, host, reason = "", None, f"no active node is set to serve {model}: nothing to plan"
        shares: tuple[tuple[str, float], ...] = ()
    else:
        mode, host, reason, shares = str(plan.mode), plan.host, plan.reason, tuple(plan.shares)
    return Explanation(
        model=model, self_id=view.self_id, at=at, source=source, trigger=trigger,
        size_bytes=size_bytes, need_bytes=needed_bytes(size_bytes), settings=settings,
        mode=mode, host=host, reason=reason, inputs=inputs,
        hooks=tuple(extra_hooks) + hook_answers(records),
        nodes=node_parts(model, size_bytes, group, view, plan, force_split=settings.split),
        local=local, shares=shares)


# -- answering meshctl explain -------------------------------------------------------


def explain_model(node: Any, model: str, client_id: str = "") -> dict[str, Any]:
    """``meshctl explain MODEL``: the node's last election for ``model`` (planned now when
    it has none), whether the mesh dropped it, and the route a request would take.

    ``node`` is the ``meshd.daemon.node.Node``.  Raises ``Refused`` for a model the
    mesh does not know at all.
    """
    from meshd.errors import Refused

    store: ExplanationStore | None = getattr(node, "explanations", None)
    last = store.get(model) if store is not None else None
    dropped = model in node.dropped
    if last is None and not dropped:
        last = _plan_now(node, model)
    if last is None and not dropped:
        known = sorted(_known_models(node))
        raise Refused(f"model {model!r} is not known in this mesh: no node serves, waits for, "
                      f"asks for or has it on disk (known: {', '.join(known) or 'none'})")
    now = float(node.reactor.seconds())
    out: dict[str, Any] = {"model": model, "node_id": node.node_id, "name": name_of(node),
                           "dropped": dropped}
    if dropped:
        out["dropped_reason"] = ("dropped mesh-wide (meshctl drop): no node serves, routes or "
                                 "is assigned it")
    out["election"] = last.to_dict() if last is not None else None
    if last is not None:
        out["election"]["age_s"] = round(max(0.0, now - last.at), 3)
    out["routing"] = explain_route(node, model, client_id or DEFAULT_CLIENT)
    return out


# what a request from this machine carries as its client id (no ``user`` field)
DEFAULT_CLIENT = "127.0.0.1"


def explain_route(node: Any, model: str, client_id: str) -> dict[str, Any]:
    """The host order a request from ``client_id`` would get now, and why."""
    passive = getattr(node, "passive", None)
    router = passive.router if passive is not None else getattr(node, "router", None)
    if router is None or not hasattr(router, "explain_route"):
        return {"client_id": client_id, "order": [], "hooks": [],
                "answer": "this node routes no requests (no mesh router)"}
    route: dict[str, Any] = router.explain_route(model, client_id)
    return route


def route_explanation(
    client_id: str,
    order: Sequence[str] = (),
    view: MeshView | None = None,
    self_id: str = "",
    records: Iterable[HookRecord] = (),
    *,
    suspects: frozenset[str] = frozenset(),
    in_flight: Mapping[str, int] | None = None,
    note: str = "",
    error: Exception | None = None,
) -> dict[str, Any]:
    """The routing part of ``meshctl explain``: ``order`` (node ids, best first) with names,
    and the host-selection hook's answer; or what a request gets when ``error`` says it
    cannot be routed (404, 503)."""
    if error is not None:
        status = getattr(error, "status", 500)
        return {"client_id": client_id, "order": [], "hooks": [],
                "answer": f"HTTP {status}: {error}"}
    rows = []
    for node_id in order:
        n = view.node(node_id) if view is not None else None
        name = name_of(n) if n is not None else None
        rows.append({"node_id": node_id, "name": name, "label": label(node_id, name),
                     "local": node_id == self_id, "in_flight": (in_flight or {}).get(node_id, 0),
                     "suspect": node_id in suspects})
    if len(order) == 1:
        answer = "one ready host: the host-selection hook is not asked"
    else:
        answer = note
        if suspects & set(order):
            answer += "; a host that failed lately goes last"
    return {"client_id": client_id, "order": rows,
            "hooks": [asdict(h) for h in hook_answers(records)], "answer": answer}


def _known_models(node: Any) -> set[str]:
    passive = getattr(node, "passive", None)
    view = passive.router.view() if passive is not None else None
    names = set(node.wanted) | {m.name for m in (view or node.mesh_view()).models}
    router = getattr(node, "router", None)
    if router is not None and passive is None:
        names |= set(router.snapshot().models)
    return names - set(node.dropped)


def _plan_now(node: Any, model: str) -> Explanation | None:
    """Plan ``model`` from this node's view, as its group does (None: nobody knows it)."""
    from meshd.placement import rules
    from meshd.placement.election import group_of

    passive = getattr(node, "passive", None)
    table_view = passive.router.view() if passive is not None else None
    source = COMPUTED_NOW
    if table_view is not None:  # a client or standby: the mesh is its routing table
        view = table_view.with_node(node.node_view())  # itself as it is: standby, VRAM, disk
        targets = {n.node_id: tuple(n.serving) for n in view.nodes}
        source = PASSIVE_NOW
    else:
        view = node.mesh_view()
        rebalancer = getattr(node, "rebalancer", None)
        targets = rebalancer.targets() if rebalancer is not None else _peer_targets(node)
    group = group_of(model, view, targets)
    size = view.size_of(model)
    if not group and view.model(model) is None and model not in node.wanted:
        return None
    size = size or 0
    cfg = node.config.models
    settings = Settings(split=bool(cfg.split), tensor_split=tuple(cfg.tensor_split),
                        max_rtt_ms=float(cfg.max_rtt_ms))
    records: list[HookRecord] = []
    plan = None
    if group:
        plan = rules.plan_split(model, size, group, view, force_split=settings.split,
                                tensor_split=settings.tensor_split, policy=node.policy,
                                answers=records)
    return explain_plan(model, size, group, view, plan, at=float(node.reactor.seconds()),
                        settings=settings, records=records, trigger="meshctl explain",
                        source=source)


def _peer_targets(node: Any) -> dict[str, tuple[str, ...]]:
    mesh = getattr(node, "mesh", None)
    if mesh is None:
        return {}
    return {p.node_id: tuple(p.serving) + tuple(p.loading) + tuple(p.waiting)
            for p in mesh.peers()}
