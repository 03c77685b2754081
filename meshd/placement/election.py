"""Per-model election and model assignment, re-decided on every mesh event (no polling).

Nodes set to serve the same model form its *group* (a peer is in the group
of every model it announces as serving, loading or waiting for).  On every
membership event, and when this node's own model changes, this node asks
``placement.plan_split`` about its model's group and acts on the answer:

- **solo** (the model fits, VRAM >= size x 1.1, and split is not forced):
  every node of the group that fits runs its own llama-server; one that does
  not fit waits ("need X GiB, have Y GiB").
- **wait** (the group together has too little VRAM): the elected host (most
  VRAM, tie by node id, ``placement.elect_host``) waits with "need X GiB, have
  Y GiB"; the others are its workers (``role: worker``), waiting too.
- **split** (enough VRAM together): the host runs llama-server over its
  workers' rpc-servers (``meshd.daemon.split``), the others are workers and
  run an rpc-server for it.  The shares are tracked, so llama-server
  restarts only when the worker set or the shares really change (no restart
  storm on unrelated events).  A split group is planned again every
  ``recheck_s`` too: a worker's RTT crossing ``[models] max_rtt_ms`` is no
  membership event.

A node that is in the mesh with nothing to serve (and is neither a client
nor a standby: those are the passive path's) asks ``placement.assign_model``
once the mesh view has settled after it joined (``[models]
assign_settle_s`` after the last membership event, at most three times
that after the first), logs the choice and its reason, and serves it --
through the gated downloader first when it is not on disk.  A model the
mesh dropped (``meshctl drop``) is never assigned again automatically.

Such an idle node also reacts at once to a peer's death, departure or
drop, and to a peer that stops hosting a model: it asks
``placement.should_promote`` (the promotion hook, with the default's
deterministic tie-break among spare nodes, so two idle nodes never promote
for one orphan) and, when told to, serves the orphaned model the same way
as an assignment.  Standbys do the same on their routing table
(``meshd.passive.node``).

``decide`` is pure; :class:`Rebalancer` holds the state and does what the
decisions say through three callables (start, stop, start a split), so it is
tested with a ``Clock`` and fakes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshd.mesh.membership import PeerChanged, PeerDown, PeerLeft
from meshd.nodename import label
from meshd.placement import explain
from meshd.placement import rules as placement
from meshd.placement.fit import needed_bytes
from meshd.placement.snapshot import MeshView, NodeView, SplitPlan
from meshd.states import ModelAction, ModelState, PlanMode, Role
from meshd.units import gib

if TYPE_CHECKING:
    from meshd.config import Config
    from meshd.models.download import Downloader
    from meshd.models.scan import ScanResult
    from meshd.placement.plugins import PolicyManager

log = logging.getLogger("meshd.placement.election")

# short names for the actions (meshd.states.ModelAction)
RUN, WAIT, WORKER = ModelAction.RUN, ModelAction.WAIT, ModelAction.WORKER
# the assignment settles at most this many settle periods after the first event
SETTLE_CAP = 3


@dataclass(frozen=True)
class Decision:
    """What this node does about one model, from one plan."""

    model: str
    action: ModelAction  # RUN: llama-server (solo, or split host over ``workers``); WAIT; WORKER
    mode: str = PlanMode.SOLO  # the plan's mode (a PlanMode)
    host: str | None = None
    workers: tuple[tuple[str, float], ...] = ()  # (node id, share), the host left out
    reason: str = ""
    # (node id, share) of every node of a split, the host first; () when not a split
    shares: tuple[tuple[str, float], ...] = ()
    need_bytes: int = 0
    have_bytes: int = 0

    @property
    def worker_ids(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.workers)

    @property
    def state(self) -> ModelState:
        """The local model state for status when no llama-server of ours runs it."""
        if self.action == WORKER:
            return ModelState.WORKER
        if self.action == RUN and self.mode == PlanMode.SPLIT:
            return ModelState.WAITING_SPLIT
        return ModelState.WAITING

    @property
    def split_key(self) -> tuple[tuple[str, float], ...]:
        """What a split host's llama-server runs with: a change of it means a restart."""
        return tuple((n, round(s, 4)) for n, s in self.shares)

    def split_status(self) -> dict[str, Any] | None:
        """``meshctl status`` ``split``: ``{host, workers: [{node_id, share}], reason}``
        (every node with a share, the host first; why this plan: a skipped peer, a
        ``tensor_split`` that did not fit) or None (solo)."""
        if self.mode == PlanMode.SOLO or self.host is None:
            return None
        shares = self.shares or ((self.host, 0.0),) + self.workers
        return {"host": self.host,
                "workers": [{"node_id": n, "share": round(s, 4)} for n, s in shares],
                "reason": self.reason}


_RTT_FIGURE = re.compile(r"\d+ ms\b")


def _gist(reason: str) -> str:
    """A plan's reason without its RTT figures: a skipped peer measured at 302 ms, then
    at 303 ms, is the same plan, logged once, not at every re-check."""
    return _RTT_FIGURE.sub("N ms", reason)


def group_of(model: str, view: MeshView, targets: dict[str, tuple[str, ...]]) -> tuple[NodeView, ...]:
    """The active nodes set to serve ``model``: ``targets`` maps node id -> its models
    (serving, loading or waiting); passive nodes (clients, standbys) are left out."""
    return tuple(sorted(
        (n for n in view.nodes if model in targets.get(n.node_id, ()) and not n.passive),
        key=lambda n: n.node_id))


def decide(
    model: str,
    size_bytes: int,
    self_id: str,
    group: tuple[NodeView, ...],
    view: MeshView,
    *,
    force_split: bool = False,
    tensor_split: tuple[float, ...] = (),
    policy: PolicyManager | None = None,
    answers: list[placement.HookRecord] | None = None,
    plans: list[SplitPlan] | None = None,
) -> Decision:
    """This node's part in running ``model`` over ``group`` (which includes this node).

    ``answers`` / ``plans``: lists that get the hooks' answers and the plan, for
    ``meshctl explain`` (``meshd.placement.explain``)."""
    plan = placement.plan_split(model, size_bytes, group, view, force_split=force_split,
                                tensor_split=tensor_split, policy=policy, answers=answers)
    if plans is not None:
        plans.append(plan)
    me = next(n for n in group if n.node_id == self_id)
    if plan.mode == PlanMode.SOLO:
        if self_id in plan.solo:
            return Decision(model, RUN, PlanMode.SOLO, reason=plan.reason,
                            need_bytes=plan.need_bytes)
        need = plan.need_bytes or needed_bytes(size_bytes)
        return Decision(model, WAIT, PlanMode.SOLO, need_bytes=need, have_bytes=me.vram_bytes,
                        reason=f"need {gib(need)}, have {gib(me.vram_bytes)} "
                               f"(it runs solo on {len(plan.solo)} other node(s))")
    if plan.mode == PlanMode.WAIT:
        # every node's status lists the whole waiting group, the host first
        others = tuple((n.node_id, 0.0) for n in group if n.node_id != plan.host)
        if plan.host == self_id:
            return Decision(model, WAIT, PlanMode.WAIT, host=plan.host, reason=plan.reason,
                            need_bytes=plan.need_bytes, have_bytes=plan.have_bytes,
                            workers=others)
        return Decision(model, WORKER, PlanMode.WAIT, host=plan.host,
                        reason=f"worker of host {plan.host}: {plan.reason}",
                        need_bytes=plan.need_bytes, have_bytes=plan.have_bytes, workers=others)
    if plan.host == self_id:
        return Decision(model, RUN, PlanMode.SPLIT, host=plan.host, workers=plan.workers,
                        reason=plan.reason, need_bytes=plan.need_bytes,
                        have_bytes=plan.have_bytes, shares=tuple(plan.shares))
    if all(n != self_id for n, _ in plan.shares):  # left out of the split (its RTT)
        return Decision(model, WAIT, PlanMode.SPLIT, host=plan.host,
                        reason=f"not in host {plan.host}'s split: {plan.reason}",
                        need_bytes=plan.need_bytes, have_bytes=plan.have_bytes,
                        shares=tuple(plan.shares))
    return Decision(model, WORKER, PlanMode.SPLIT, host=plan.host, workers=plan.workers,
                    reason=f"worker of host {plan.host}: {plan.reason}",
                    need_bytes=plan.need_bytes, have_bytes=plan.have_bytes,
                    shares=tuple(plan.shares))


class ElectionPeer(Protocol):
    """A peer as the election reads it (``meshd.mesh.membership.PeerView``)."""

    @property
    def node_id(self) -> str: ...

    @property
    def serving(self) -> Sequence[str]: ...

    @property
    def loading(self) -> Sequence[str]: ...

    @property
    def waiting(self) -> Sequence[str]: ...


class ElectionMesh(Protocol):
    def peers(self) -> Sequence[ElectionPeer]: ...


class ElectionNode(Protocol):
    """What the election needs of this node (``meshd.daemon.node.Node``)."""

    @property
    def node_id(self) -> str: ...

    @property
    def config(self) -> Config: ...

    @property
    def policy(self) -> PolicyManager | None: ...

    @property
    def scan(self) -> ScanResult | None: ...

    @property
    def dropped(self) -> Collection[str]: ...

    @property
    def downloader(self) -> Downloader | None: ...

    @property
    def mesh(self) -> ElectionMesh | None: ...

    @property
    def role(self) -> str: ...

    @property
    def served(self) -> Mapping[str, Any]: ...

    def node_view(self) -> NodeView: ...

    def mesh_view(self) -> MeshView: ...

    def rescan(self) -> None: ...


class Rebalancer:
    """This node's model: its decision, re-made on every event, and assignment after joining.

    ``node`` is what it reads of this node (:class:`ElectionNode`).  Once
    :meth:`stop` ped (the daemon stops, or the node stood by) it neither assigns
    nor promotes any more.  ``start(model)`` starts the llama-server for the model
    (solo), ``stop(model)`` stops it, ``start_split(model, shares)`` runs it
    as a split host over ``shares`` (every node's, the host first);
    ``lend(model, host)`` / ``unlend()`` start and stop this node's rpc-server
    as a worker.  ``changed()`` is called whenever this node's announce may
    differ (role, waiting models).
    """

    def __init__(
        self,
        node: ElectionNode,
        *,
        reactor: Any,
        start: Callable[[str], Any],
        stop: Callable[[str], Any],
        start_split: Callable[[str, tuple[tuple[str, float], ...]], Any] | None = None,
        changed: Callable[[], Any] | None = None,
        settle_s: float = 2.0,
        unassigned: Callable[[str], Any] | None = None,
        lend: Callable[[str, str], Any] | None = None,
        unlend: Callable[[], Any] | None = None,
        recheck_s: float = 5.0,
    ):
        self.node = node
        self.reactor = reactor
        self._start = start
        self._stop = stop
        self._start_split = start_split
        self._changed = changed or (lambda: None)
        self._unassigned = unassigned or (lambda reason: None)
        self._lend = lend
        self._unlend = unlend
        self.recheck_s = recheck_s
        self._recheck_call: Any = None
        self.lent: tuple[str, str] | None = None  # (model, host) this node's rpc-server is for
        self.settle_s = settle_s
        self.target: str | None = None
        self.target_size: int | None = None
        self.decision: Decision | None = None
        # what llama-server runs with: () solo, the split's shares; None: not running
        self.running: tuple[tuple[str, float], ...] | None = None
        self.assigning = False
        self._assign_call: Any = None
        self._assign_deadline: float | None = None
        self.decisions = 0  # plans made, for tests and status
        self.stopped = False  # stop(): no assignment or promotion any more
        # model -> how this node came to serve it (the assignment or promotion hook's
        # answer), for ``meshctl explain``
        self.chosen_by: dict[str, explain.HookAnswer] = {}

    # -- this node's model ----------------------------------------------------------------

    def serve(self, model: str, size_bytes: int | None = None) -> None:
        """This node is to serve ``model`` ([models] serve, or an assignment); ``size_bytes``
        when known (a file outside the models directories is in no scan)."""
        self.target = model
        self.target_size = size_bytes
        self._cancel_assign()
        self.evaluate(f"serving {model}")

    def forget(self, model: str) -> None:
        """``model`` was dropped: stop it (if ours) and become free for another assignment."""
        if self.target != model:
            return
        self.target = None
        self.decision = None
        if self.running is not None:
            self.running = None
            self._stop(model)
        self._stop_lending()
        self._changed()

    def waiting_models(self) -> list[str]:
        """Models this node is set to serve without a llama-server of its own running them."""
        d = self.decision
        if d is None or (d.action == RUN and d.mode == PlanMode.SOLO):
            return []
        if d.action == RUN and self.running is not None and d.mode == PlanMode.SPLIT \
                and self._start_split is not None and d.model in self.node.served:
            return []
        return [d.model]

    @property
    def role(self) -> Role | None:
        """``worker`` or ``host`` from the decision; None when the node decides by its backends."""
        d = self.decision
        if d is None:
            return None
        return Role.WORKER if d.action == WORKER else Role.HOST

    # -- deciding -----------------------------------------------------------------------------

    def targets(self) -> dict[str, tuple[str, ...]]:
        """node id -> models it is set to serve (serving, loading, waiting), this node included."""
        out: dict[str, tuple[str, ...]] = {}
        mesh = self.node.mesh
        if mesh is not None:
            for p in mesh.peers():
                out[p.node_id] = tuple(p.serving) + tuple(p.loading) + tuple(p.waiting)
        if self.target is not None:
            out[self.node.node_id] = (self.target,)
        return out

    def size_of(self, model: str, view: MeshView) -> int:
        if model == self.target and self.target_size:
            return self.target_size
        scan = self.node.scan
        local = scan.models.get(model) if scan is not None else None
        if local is not None:
            return local.size_bytes
        return view.size_of(model) or 0

    def evaluate(self, why: str = "") -> Decision | None:
        """Decide again for this node's model and act only on a real change."""
        model = self.target
        if model is None:
            return None
        view = self.node.mesh_view()
        me = self.node.node_view()
        view = view.with_node(me)
        group = group_of(model, view, self.targets())
        if not any(n.node_id == me.node_id for n in group):  # a passive node never decides
            return None
        size = self.size_of(model, view)
        answers: list[placement.HookRecord] = []
        plans: list[SplitPlan] = []
        d = decide(model, size, me.node_id, group, view,
                   force_split=self.node.config.models.split,
                   tensor_split=tuple(self.node.config.models.tensor_split),
                   policy=self.node.policy, answers=answers, plans=plans)
        self._explain(d, size, group, view, plans[0], answers, why)
        self.decisions += 1
        old, self.decision = self.decision, d
        self._act(old, d)
        if old is None or (old.action, old.mode, old.host, old.split_key, _gist(old.reason)) != (
                d.action, d.mode, d.host, d.split_key, _gist(d.reason)):
            self._log(d, why)
            self._changed()
        return d

    def _explain(self, d: Decision, size: int, group: tuple[NodeView, ...], view: MeshView,
                 plan: SplitPlan, answers: list[placement.HookRecord], why: str) -> None:
        """Keep what this plan read and concluded for ``meshctl explain`` (the node's store)."""
        store = getattr(self.node, "explanations", None)
        if store is None:
            return
        cfg = self.node.config.models
        settings = explain.Settings(split=bool(cfg.split), tensor_split=tuple(cfg.tensor_split),
                                    max_rtt_ms=float(view.max_rtt_ms))
        chosen = self.chosen_by.get(d.model)
        store.record(explain.explain_plan(
            d.model, size, group, view, plan, at=float(self.reactor.seconds()),
            settings=settings, records=answers, trigger=why,
            local={"action": str(d.action), "state": str(d.state), "reason": d.reason},
            extra_hooks=(chosen,) if chosen is not None else ()))

    def _stop_lending(self) -> None:
        if self.lent is not None:
            self.lent = None
            if self._unlend is not None:
                self._unlend()

    def _act(self, old: Decision | None, d: Decision) -> None:
        self._recheck(d)
        # a worker lends while the group splits or waits: its own RTTs may leave a peer out
        # that the host keeps (each node measures its own), and a worker that then
        # thought the group short must not refuse the host's tunnels; waiting, its
        # rpc-server is there the moment the group is complete
        if d.action == WORKER and d.host is not None:
            if self._lend is not None:
                self.lent = (d.model, d.host)
                self._lend(d.model, d.host)
        else:
            self._stop_lending()
        if d.action == RUN and d.mode == PlanMode.SOLO:
            if self.running != ():
                if self.running is not None:
                    self._stop(d.model)
                self.running = ()
                self._start(d.model)
        elif d.action == RUN:  # split host
            if self._start_split is None:
                if self.running is not None:
                    self._stop(d.model)
                    self.running = None
                return
            key = d.split_key
            if self.running != key:
                if self.running is not None:
                    log.info("%s: split changed (%s -> %s): restarting llama-server", d.model,
                             _shares(self.running), _shares(key))
                    self._stop(d.model)
                self.running = key
                self._start_split(d.model, d.shares)
        elif self.running is not None:  # WAIT or WORKER: nothing of ours runs the model
            self.running = None
            self._stop(d.model)

    def _recheck(self, d: Decision) -> None:
        """A split group is planned again every ``recheck_s``: RTTs move without events."""
        call = self._recheck_call
        if d.mode == PlanMode.SOLO or self.stopped:
            if call is not None and call.active():
                call.cancel()
            self._recheck_call = None
            return
        if call is None or not call.active():
            self._recheck_call = self.reactor.callLater(self.recheck_s, self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck_call = None
        if not self.stopped:
            self.evaluate("re-checking the split")

    def _log(self, d: Decision, why: str) -> None:
        because = f" ({why})" if why else ""
        if d.action == RUN and d.mode == PlanMode.SOLO:
            log.info("model %s: running solo: %s%s", d.model, d.reason, because)
        elif d.action == RUN:
            if self._start_split is None:
                log.warning("model %s: elected split host over %s: %s; the rpc-server split is "
                            "not wired here, waiting%s", d.model, _ids(d.worker_ids), d.reason,
                            because)
            else:
                log.info("model %s: split host, shares %s: %s%s", d.model, _shares(d.split_key),
                         d.reason, because)
        elif d.action == WAIT:
            log.warning("model %s: waiting for VRAM: %s%s", d.model, d.reason, because)
        else:
            log.info("model %s: %s%s", d.model, d.reason, because)

    # -- mesh events ----------------------------------------------------------------------------

    def on_event(self, event: Any = None) -> None:
        """A membership event: decide again; an idle node may promote, else (re)starts its
        settle timer.  ``event`` None: a model was dropped."""
        if self.target is not None:
            self.evaluate(type(event).__name__ if event is not None else "")
            return
        why = _orphaning(event)
        # a lone node promotes when its last peer died, not for its own drop
        alone = event is None and not (self.node.mesh is not None and self.node.mesh.peers())
        if why is not None and not alone and self._may_promote() and self.promote(why) is not None:
            return
        if self._may_assign():
            self._schedule_assign()

    def downloaded(self) -> None:
        """A download ended: an idle node may serve the model now, or join its group."""
        if self._may_assign():
            self._schedule_assign()

    def _may_promote(self) -> bool:
        node = self.node
        if self.stopped or node.config.node.client or self.assigning or self.target is not None:
            return False
        return node.mesh is not None and node.role == Role.IDLE

    def promote(self, why: str = "") -> str | None:
        """Ask the promotion hook whether this idle node serves an orphaned model now."""
        view, me = self._spare_view()
        decision = placement.should_promote(me, view, policy=self.node.policy)
        because = f" ({why})" if why else ""
        if not decision.promote or decision.model is None:
            log.debug("idle, not promoting: %s%s", decision.reason, because)
            return None
        log.info("idle node promoting to serve %s: %s (decided by %s)%s", decision.model,
                 decision.reason, decision.decided_by or placement.BUILT_IN, because)
        self._cancel_assign()
        self.chosen_by[decision.model] = explain.HookAnswer(
            "meshd_promote", decision.decided_by or placement.BUILT_IN,
            f"{decision.model}: {decision.reason}", self._asked("meshd_promote"))
        return self._take(decision.model, download=not me.has(decision.model),
                          what="promoted to")

    def _may_assign(self) -> bool:
        node = self.node
        cfg = node.config.node
        if self.stopped or cfg.client or cfg.standby or self.assigning or self.target is not None:
            return False
        return node.mesh is not None and bool(node.mesh.peers())

    def _schedule_assign(self) -> None:
        now = self.reactor.seconds()
        if self._assign_deadline is None:
            self._assign_deadline = now + SETTLE_CAP * self.settle_s
        delay = max(0.0, min(self.settle_s, self._assign_deadline - now))
        if self._assign_call is not None and self._assign_call.active():
            self._assign_call.reset(delay)
        else:
            self._assign_call = self.reactor.callLater(delay, self.assign)

    def _cancel_assign(self) -> None:
        if self._assign_call is not None and self._assign_call.active():
            self._assign_call.cancel()
        self._assign_call = None
        self._assign_deadline = None

    def assign(self) -> str | None:
        """Ask the assignment hook what to serve, now; serve it (downloading first if needed)."""
        self._assign_call = None
        self._assign_deadline = None
        if not self._may_assign():
            return None
        waiting = self._waiting_group_to_join()
        if waiting is not None:
            log.info("model %s: its group waits and this node has it on disk: joining the "
                     "group", waiting)
            return self._take(waiting, download=False, what="joined the waiting group of")
        view, me = self._spare_view()
        decision = placement.assign_model(me, view, policy=self.node.policy)
        if decision.model is None:
            self._unassigned(decision.reason)  # the daemon may make it a standby
            return None
        self.chosen_by[decision.model] = explain.HookAnswer(
            "meshd_assign_model", decision.decided_by or placement.BUILT_IN,
            f"{decision.model}: {decision.reason}", self._asked("meshd_assign_model"))
        return self._take(decision.model, download=decision.download, what="assigned")

    def _asked(self, hook: str) -> tuple[str, ...]:
        from meshd.placement.plugins import default_manager

        return tuple((self.node.policy or default_manager()).hook_order(hook))

    def _waiting_group_to_join(self) -> str | None:
        """A model on this node's disk whose group waits (nobody serves or loads it: short
        of VRAM): joining brings the VRAM a split needs, or a node that runs it alone.
        The assignment hook only hands out models that fit a node alone, so a node that
        got a big model's file (``meshctl download``) would otherwise never join."""
        mesh, scan = self.node.mesh, self.node.scan
        if mesh is None or scan is None:
            return None
        peers = mesh.peers()
        busy = {m for p in peers for m in (*p.serving, *p.loading)}
        waiting = {m for p in peers for m in p.waiting} - busy - set(self.node.dropped)
        return next((m for m in sorted(waiting) if m in scan.models), None)

    def _spare_view(self) -> tuple[MeshView, NodeView]:
        """The mesh and this node as assignment and promotion see them: dropped models left
        out, and a model a peer is loading or waiting for counted as served."""
        dropped = frozenset(self.node.dropped)
        targets = self.targets()
        mesh_view = self.node.mesh_view()
        view = without_models(MeshView(
            self_id=mesh_view.self_id, catalog=mesh_view.catalog, max_rtt_ms=mesh_view.max_rtt_ms,
            nodes=tuple(dataclasses.replace(n, serving=tuple(dict.fromkeys(
                n.serving + targets.get(n.node_id, ())))) for n in mesh_view.nodes)), dropped)
        me = without_models(MeshView(self_id=self.node.node_id, nodes=(self.node.node_view(),)),
                            dropped).nodes[0]
        return view, me

    def _take(self, model: str, *, download: bool, what: str) -> str | None:
        """Serve ``model`` (assigned or promoted): through the gated downloader first when it
        is not on disk."""
        if model in self.node.dropped:
            return None
        if not download:
            self.serve(model)
            return model
        downloader = self.node.downloader
        if downloader is None:
            log.warning("%s %s, but this node cannot download", what, model)
            return None
        self.assigning = True
        d = downloader.download(model)

        def done(_: Any) -> None:
            self.assigning = False
            self.node.rescan()
            if model not in self.node.dropped:
                self.serve(model)

        def failed(f: Any) -> None:
            self.assigning = False
            log.error("%s %s, but its download failed: %s", what, model, f.getErrorMessage())

        d.addCallbacks(done, failed)
        return model

    def stop(self) -> None:
        self.stopped = True
        self._cancel_assign()
        if self._recheck_call is not None and self._recheck_call.active():
            self._recheck_call.cancel()
        self._recheck_call = None


def _orphaning(event: Any) -> str | None:
    """Why ``event`` may have left a model without a host (None: it cannot have)."""
    if event is None:
        return "a model was dropped"
    if isinstance(event, PeerDown):
        return f"peer {label(event.name, event.node_id)} down: {event.reason}"
    if isinstance(event, PeerLeft):
        return f"peer {label(event.name, event.node_id)} left"
    if isinstance(event, PeerChanged):
        lost = sorted(set(event.old.serving) - set(event.node.serving))
        if lost:
            return f"peer {event.node.label} stopped serving {', '.join(lost)}"
    return None


def without_models(view: MeshView, names: frozenset[str]) -> MeshView:
    """``view`` as if no node had, served or asked for the models in ``names``."""
    if not names:
        return view

    def strip(n: NodeView) -> NodeView:
        return NodeView(
            node_id=n.node_id, role=n.role, vram_bytes=n.vram_bytes,
            serving=tuple(m for m in n.serving if m not in names),
            available_models=tuple(f for f in n.available_models if f.name not in names),
            requested_models=tuple(m for m in n.requested_models if m not in names),
            rtt_ms=n.rtt_ms, load=n.load, addrs=n.addrs, name=n.name)

    return MeshView(self_id=view.self_id, nodes=tuple(strip(n) for n in view.nodes),
                    catalog=tuple(f for f in view.catalog if f.name not in names),
                    max_rtt_ms=view.max_rtt_ms)


def _ids(ids: frozenset[str] | None) -> str:
    if not ids:
        return "no workers"
    return ", ".join(sorted(ids))


def _shares(shares: tuple[tuple[str, float], ...] | None) -> str:
    if not shares:
        return "none"
    return ", ".join(f"{n} {s:.0%}" for n, s in shares)

