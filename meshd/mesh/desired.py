"""The mesh's desired state: the models operators dropped (``meshctl drop``) or asked the
mesh to serve again (``meshctl serve``), as versioned decisions that merge the same on
every node.

Pure data, no I/O: the node keeps one :class:`DesiredState` across role changes, saves
it in the state directory (``desired.json``, ``meshd.statedir``) and the gossip carries
it (``DESIRED`` frames, ``meshd.mesh.gossip``; the routing table for passive nodes), so
a node that joins later, or restarts, honours decisions made without it.

One decision per model: ``{state: dropped|serve, version, by: node id, at}``.  A new
decision about a model takes the highest version this node knows for it plus one.
Two decisions about one model merge by ``(version, by)``: the higher version wins
(the last writer), and between equal versions -- made on both sides of a partition --
the higher node id; the state and the time only break ties that cannot happen between
well-behaved nodes (one node never writes one version twice), so the order is total and
:func:`merge` is commutative, associative and idempotent: every node that has heard the
same decisions holds the same state, whatever the order it heard them in.

A ``dropped`` model is not served, routed, assigned or promoted anywhere, whatever a
node's ``[models] serve`` says; ``serve`` lifts a drop (a node configured to serve the
model serves it again, an idle one may be assigned it) and is otherwise what no decision
is: the default.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# decisions kept (one per model): bounds the state file and every DESIRED frame
MAX_DECISIONS = 1024
MAX_MODEL_CHARS = 512
MAX_NODE_ID_CHARS = 128


class Want(enum.StrEnum):
    """What an operator decided for a model, mesh-wide."""

    DROPPED = "dropped"  # meshctl drop: served nowhere, whatever [models] serve says
    SERVE = "serve"  # meshctl serve: the drop is lifted


@dataclass(frozen=True)
class Decision:
    """One operator decision about one model, as it travels and is stored."""

    model: str
    want: Want
    version: int
    by: str  # the node id of the node the operator asked
    at: float = 0.0  # that node's wall clock, seconds since the epoch: for people only

    def rank(self) -> tuple[int, str, int, float]:
        """The merge order: (version, node id), then the state and time (ties that only a
        node writing one version twice could make; a drop wins those)."""
        return (self.version, self.by, 1 if self.want is Want.DROPPED else 0, self.at)

    def to_body(self) -> dict[str, Any]:
        return {"state": str(self.want), "version": self.version, "by": self.by, "at": self.at}

    @classmethod
    def from_body(cls, model: Any, body: Any) -> Decision:
        """One decision from a frame or the state file; ValueError says what is wrong."""
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
            raise ValueError(f"model name {str(model)[:40]!r} is not a model name")
        if not isinstance(body, dict):
            raise ValueError(f"model {model!r}: the decision is not an object")
        try:
            want = Want(str(body.get("state")))
        except ValueError:
            raise ValueError(
                f"model {model!r}: state {str(body.get('state'))[:20]!r} is not "
                f"one of {', '.join(w.value for w in Want)}"
            ) from None
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"model {model!r}: version is not a positive integer")
        by = body.get("by")
        if not isinstance(by, str) or not by or len(by) > MAX_NODE_ID_CHARS:
            raise ValueError(f"model {model!r}: 'by' is not a node id")
        at = body.get("at", 0.0)
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise ValueError(f"model {model!r}: 'at' is not a number")
        return cls(model, want, version, by, float(at))


def newer(a: Decision, b: Decision | None) -> bool:
    """Whether ``a`` wins over ``b`` (None: no decision yet) by the merge rule."""
    return b is None or a.rank() > b.rank()


def parse(body: Any) -> list[Decision]:
    """The decisions of a ``{"models": {name: decision}}`` body (DESIRED, desired.json, the
    routing table's ``desired``); ValueError names the first bad one.  Decisions of a
    state this node does not know (a newer node's) are skipped, not an error."""
    if not isinstance(body, dict):
        raise ValueError("the desired state is not an object")
    models = body.get("models", {})
    if not isinstance(models, dict):
        raise ValueError("'models' is not an object")
    if len(models) > MAX_DECISIONS:
        raise ValueError(f"{len(models)} decisions, more than the {MAX_DECISIONS} kept")
    out = []
    for model, entry in models.items():
        if isinstance(entry, dict) and entry.get("state") not in {w.value for w in Want}:
            continue  # a newer node's kind of decision: not ours to judge
        out.append(Decision.from_body(model, entry))
    return out


def to_body(decisions: Iterable[Decision]) -> dict[str, Any]:
    """``{"models": {name: decision}}``, sorted by name (stable bytes, stable etags)."""
    return {"models": {d.model: d.to_body() for d in sorted(decisions, key=lambda d: d.model)}}


class DesiredState:
    """The decisions this node knows, one per model (the winner of every merge)."""

    def __init__(self, decisions: Iterable[Decision] = ()):
        self._decisions: dict[str, Decision] = {}
        self.merge(decisions)

    @property
    def decisions(self) -> Mapping[str, Decision]:
        return self._decisions

    def get(self, model: str) -> Decision | None:
        return self._decisions.get(model)

    @property
    def dropped(self) -> frozenset[str]:
        """The models dropped mesh-wide: served, routed, assigned and promoted nowhere."""
        return frozenset(m for m, d in self._decisions.items() if d.want is Want.DROPPED)

    def is_dropped(self, model: str) -> bool:
        d = self._decisions.get(model)
        return d is not None and d.want is Want.DROPPED

    def decide(self, model: str, want: Want, *, by: str, at: float = 0.0) -> Decision:
        """A new decision of this node's operator: the model's highest known version + 1.
        ValueError when the model would be one more than :data:`MAX_DECISIONS`."""
        current = self._decisions.get(model)
        if current is None and len(self._decisions) >= MAX_DECISIONS:
            raise ValueError(f"the mesh already holds {MAX_DECISIONS} drop/serve decisions")
        decision = Decision(model, want, (current.version if current else 0) + 1, by, at)
        self._decisions[model] = decision
        return decision

    def merge(self, decisions: Iterable[Decision]) -> list[Decision]:
        """Take every decision that wins over the one held; the ones taken (what changed,
        to apply and to pass on).  Models beyond :data:`MAX_DECISIONS` are not taken."""
        taken: dict[str, Decision] = {}
        for d in decisions:
            held = self._decisions.get(d.model)
            if not newer(d, held):
                continue
            if held is None and len(self._decisions) >= MAX_DECISIONS:
                continue
            self._decisions[d.model] = d
            taken[d.model] = d
        return list(taken.values())

    def to_body(self) -> dict[str, Any]:
        return to_body(self._decisions.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DesiredState) and self._decisions == other._decisions

    def __repr__(self) -> str:
        return f"DesiredState({sorted(self._decisions.values(), key=lambda d: d.model)!r})"


def merge(*states: DesiredState) -> DesiredState:
    """The state that holds, per model, the winning decision of ``states`` (pure)."""
    out = DesiredState()
    for s in states:
        out.merge(s.decisions.values())
    return out


def from_drop(
    model: str, origin: str, version: Any, held: Decision | None, at: float = 0.0
) -> Decision:
    """A DROP frame as a decision.  A node of this version sends the drop's ``version``; an
    older one sends none, and its drop is taken as the next version of what this node
    holds (every node that holds the same state makes the same decision of it)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        version = (held.version if held is not None else 0) + 1
    return Decision(model, Want.DROPPED, version, origin, at)
