"""A sequence of faults on a :class:`tests.harness.chaoslab.Lab` under a stream of requests,
and what came of each request.

A :class:`Fault` is applied, the views are waited for (bounded) until they show it,
traffic runs ``hold_s`` more, the fault is removed and the views are waited for until
they agree again: both waits are measured (``detect_s``, ``converge_s``).  Every
request's outcome (``tests.harness.chaosdriver``) is then placed in the fault during
which it started.  Shared by ``tests/test_chaos.py`` and ``bench/chaos.py``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.chaoslab import Lab, View, read_outcomes


@dataclass
class Fault:
    """``apply(lab)`` makes the fault and may return what ``remove(lab, it)`` needs;
    ``during(lab)`` is the view it should cause (a View for all, or one per node name;
    None: nothing to wait for), ``after(lab)`` the view once removed (default: full)."""

    name: str
    apply: Callable[[Lab], Any]
    remove: Callable[[Lab, Any], Any] = lambda lab, it: None
    during: Callable[[Lab], View | dict[str, View] | None] = lambda lab: None
    after: Callable[[Lab], View | dict[str, View]] | None = None
    hold_s: float = 8.0
    detect_bound_s: float = 30.0
    converge_bound_s: float = 30.0
    paused: str | None = None  # the host paused (SIGSTOP), for the executed-twice count
    steady: bool = False  # the views should not change: count the polls where one did
    # filled in by run()
    t_apply: float = 0.0
    t_remove: float = 0.0
    t_end: float = 0.0
    detect_s: float | None = None
    converge_s: float | None = None
    executed_twice: int | None = None
    retried_away: int | None = None
    polls: int = 0  # steady faults: view polls during the hold, and those off the full view
    dips: int = 0
    notes: list[str] = field(default_factory=list)


def run(lab: Lab, faults: list[Fault], log: Callable[[str], None] = print) -> None:
    """Each fault in turn; raises ``LabError`` when a view does not converge in its bound."""
    for f in faults:
        nm = lab.names()
        marks = _marks(lab)
        tasks_before = lab.finished_tasks(f.paused) if f.paused else 0
        f.t_apply = time.time()
        m0 = time.monotonic()
        it = f.apply(lab)
        expected = f.during(lab)
        if expected is not None:
            f.detect_s = lab.converge(expected, f.detect_bound_s, f"{f.name}: the fault seen",
                                      who=_who(lab, expected), since=m0)
        log(f"{f.name}: applied" + (f", seen by every node in {f.detect_s:.2f} s"
                                     if f.detect_s is not None else ""))
        _hold(lab, f)
        f.t_remove = time.time()
        m1 = time.monotonic()
        f.remove(lab, it)
        after = f.after(lab) if f.after else lab.full_view()
        f.converge_s = lab.converge(after, f.converge_bound_s, f"{f.name}: views agree again",
                                    who=_who(lab, after), since=m1)
        log(f"{f.name}: removed, views agree in {f.converge_s:.2f} s "
            f"({next(iter(after.values())) if isinstance(after, dict) else after.show(nm)})")
        f.t_end = time.time()
        if f.paused:
            _count_doubles(lab, f, marks, tasks_before)


def _hold(lab: Lab, f: Fault) -> None:
    """Traffic under the fault for ``hold_s`` (a fixed span: the waits are on state);
    a steady fault's views are polled meanwhile, every node against the full view."""
    end = time.monotonic() + f.hold_s
    full = lab.full_view() if f.steady else None
    while (left := end - time.monotonic()) > 0:
        if full is not None:
            views = lab.views([n for n, node in lab.nodes.items() if node.alive()])
            f.polls += 1
            if any(v != full for v in views.values()):
                f.dips += 1
                if f.dips == 1:
                    nm = lab.names()
                    f.notes.append("first poll off the full view: " + "; ".join(
                        f"{n} {v.show(nm) if v else 'no answer'}" for n, v in views.items()
                        if v != full))
        time.sleep(min(0.5, max(0.0, left)))


def _who(lab: Lab, expected: View | dict[str, View]) -> list[str] | None:
    if isinstance(expected, dict):
        return list(expected)
    return None  # every running node


def _marks(lab: Lab) -> dict[str, int]:
    return {n: len(node.daemon.log()) for n, node in lab.nodes.items()}


def _count_doubles(lab: Lab, f: Fault, marks: dict[str, int], tasks_before: int) -> None:
    """The paused host's llama-server may finish, after it resumes, a request that was
    already retried elsewhere: the tasks it finished generating from the pause until the
    views agreed again that no client got from it, bounded by the requests retried away from
    it.  (An 8-token task takes well under the seconds the views take to agree after
    SIGCONT, so a resumed task has finished by then.)"""
    host = lab.nodes[f.paused]  # type: ignore[index]
    finished = lab.finished_tasks(f.paused) - tasks_before  # type: ignore[arg-type]
    assert lab.outcomes_path is not None, "the driver is not running"
    answered = sum(1 for r in read_outcomes(lab.outcomes_path)
                   if r.get("node") == host.node_id and r["t1"] >= f.t_apply)
    pattern = re.compile(rf"upstream {re.escape(host.node_id)}\S* for \S+ failed before "
                         r"responding \(.*\); trying")
    local = re.compile(r"upstream \S+ for \S+ failed before responding \(.*\); trying")
    retried = 0
    for name, node in lab.nodes.items():
        text = node.daemon.log()[marks.get(name, 0):]
        retried += len((local if name == f.paused else pattern).findall(text))
    f.retried_away = retried
    f.executed_twice = max(0, min(retried, finished - answered))
    f.notes.append(f"{f.paused} finished {finished} task(s) from the pause on, {answered} "
                   f"answered from it; {retried} request(s) retried away from it")


# -- the outcomes -------------------------------------------------------------------------------


def phase_of(rec: dict[str, Any], faults: list[Fault]) -> str:
    """The fault during which the request *ended* (a request in flight when a fault
    begins fails, if it does, under that fault)."""
    for f in reversed(faults):
        if f.t_apply and rec["t1"] >= f.t_apply:
            return f.name if rec["t1"] < f.t_end else "after"
    return "before"


def summarize(outcomes: list[dict[str, Any]], faults: list[Fault], hang_bound_s: float
              ) -> list[dict[str, Any]]:
    """One row per phase: requests, ok, clean errors (status/type), unclean, hangs (no
    outcome, or one later than ``hang_bound_s``), the longest request."""
    rows: dict[str, dict[str, Any]] = {}
    order = ["before", *(f.name for f in faults), "after"]
    for name in order:
        rows[name] = {"phase": name, "requests": 0, "ok": 0, "errors": Counter(),
                      "unclean": 0, "hang": 0, "max_s": 0.0, "streamed": 0}
    for r in outcomes:
        row = rows[phase_of(r, faults)]
        took = r["t1"] - r["t0"]
        row["requests"] += 1
        row["streamed"] += bool(r["stream"])
        row["max_s"] = max(row["max_s"], took)
        if r["kind"] == "hang" or took > hang_bound_s:
            row["hang"] += 1
        elif r["kind"] == "ok":
            row["ok"] += 1
        elif r["kind"] == "error":
            mid = " mid-stream" if r.get("midstream") else ""
            row["errors"][f"{r.get('status')} {r.get('type')}{mid}"] += 1
        else:
            row["unclean"] += 1
    return [rows[n] for n in order if rows[n]["requests"] or n not in ("before", "after")]


def table(rows: list[dict[str, Any]], faults: list[Fault]) -> str:
    by = {f.name: f for f in faults}
    head = (f"{'phase (requests by end)':26s} {'reqs':>4s} {'ok':>4s} {'hang':>4s} {'uncl':>4s} "
            f"{'max s':>6s} {'seen s':>6s} {'agree s':>7s} {'dips':>6s}  clean errors")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = by.get(r["phase"])
        seen = f"{f.detect_s:.2f}" if f and f.detect_s is not None else "-"
        agree = f"{f.converge_s:.2f}" if f and f.converge_s is not None else "-"
        dips = f"{f.dips}/{f.polls}" if f and f.steady else "-"
        errs = ", ".join(f"{n}x {k}" for k, n in sorted(r["errors"].items())) or "none"
        lines.append(f"{r['phase']:26s} {r['requests']:4d} {r['ok']:4d} {r['hang']:4d} "
                     f"{r['unclean']:4d} {r['max_s']:6.1f} {seen:>6s} {agree:>7s} {dips:>6s}  {errs}")
    return "\n".join(lines)


def outcome_lines(outcomes: list[dict[str, Any]], faults: list[Fault], names: dict[str, str]
                  ) -> str:
    """Every request: its phase, model, streamed or not, outcome, who answered, duration."""
    out = []
    for r in sorted(outcomes, key=lambda r: r["i"]):
        what = r["kind"]
        if what != "ok":
            what += f" {r.get('status')} {r.get('type')}"
            if r.get("midstream"):
                what += " mid-stream"
        out.append(f"{r['i']:4d} {phase_of(r, faults):26s} {r['model']:6s} "
                   f"{'stream' if r['stream'] else 'plain ':6s} {what:40s} "
                   f"{names.get(r.get('node') or '', '-'):3s} {r['t1'] - r['t0']:6.2f} s")
    return "\n".join(out)


def outcomes_of(path: Path) -> list[dict[str, Any]]:
    return read_outcomes(path)
