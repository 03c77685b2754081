"""Chaos, short form: real meshd nodes with real llama-servers in network namespaces, a
stream of ``openai`` SDK requests through a passive client, and faults in turn.

Four hosts (a, c serve ``m-one``, b, d ``m-two``: the Gemma GGUF under two names) and a
client ``cl`` (``tests/harness/chaoslab.py``).  While the client's driver sends
requests, streamed and not, two at a time: SIGSTOP of a whole node (meshd and its
llama-server) and SIGCONT; SIGSTOP of one llama-server alone (meshd finds it hung and
restarts it); a partition {a, b, cl} | {c, d} by silent iptables DROP, and its heal;
kill -9 of a host.  Every wait is for a state (each node's view, from its control
socket) with a bound; nothing is slept on but the short hold of traffic under each
fault.  Pass: no request hangs past the stated bound, every failure is a clean error
(an HTTP status with OpenAI's error body, or an SSE error event), a hung llama-server
finishes nothing that was retried elsewhere (executed twice: 0; a whole node that
resumes may finish one, which is counted and printed), and every view converges within
its bound.  The long form, with every fault of issue 12, is
``bench/chaos.py`` (figures in docs/reliability.md).

Needs root, ``ip netns`` and ``iptables``; every namespace and process made here is
removed by the fixture, also when the test fails.
"""

from __future__ import annotations

import pytest

from tests.harness.chaoslab import API, Lab, View, read_outcomes
from tests.harness.chaosrun import Fault, outcome_lines, run, summarize, table
from tests.harness.meshnodes import can_netns, have_iptables

pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.timeout(420)]

HOSTS = {"a": "m-one", "b": "m-two", "c": "m-one", "d": "m-two"}
HANG_BOUND_S = 2 * API["first_byte_timeout_s"] + API["stream_idle_timeout_s"] + 10.0
HOLD_S = 3.0


@pytest.fixture
def lab(tmp_path, llama_bin_dir, gemma_model_path):
    why = can_netns() or (None if have_iptables() else "needs iptables")
    if why:
        pytest.skip(why)
    lab = Lab(tmp_path, hosts=HOSTS, llama_bin_dir=llama_bin_dir, gguf=gemma_model_path)
    try:
        lab.build()
        lab.start()
        yield lab
    finally:
        lab.close()
        for n in lab.nodes.values():
            print(f"--- {n.name} ({n.node_id}) last lines")
            print("\n".join(n.daemon.log().splitlines()[-12:]))


def partition_views(lab: Lab) -> dict[str, View]:
    ids = {n: lab.nodes[n].node_id for n in lab.nodes}
    left = View.of([ids["a"], ids["b"]], {"m-one": [ids["a"]], "m-two": [ids["b"]]})
    right = View.of([ids["c"], ids["d"]], {"m-one": [ids["c"]], "m-two": [ids["d"]]})
    return {n: left if n in ("a", "b", "cl") else right for n in lab.nodes}


def test_requests_through_faults_end_cleanly_once_and_views_converge(lab, tmp_path):
    plan = [
        Fault("SIGSTOP node b", apply=lambda lab: lab.sigstop_node("b"),
              during=lambda lab: {n: lab.full_view(without=["b"]) for n in ("a", "c", "d", "cl")},
              remove=lambda lab, pids: lab.sigcont(pids), hold_s=HOLD_S, paused="b"),
        Fault("SIGSTOP llama-server c", apply=lambda lab: lab.sigstop_llama("c"),
              during=lambda lab: lab.full_view(cold=["c"]),
              remove=lambda lab, pid: lab.sigcont([pid]), hold_s=HOLD_S, paused="c",
              converge_bound_s=90),
        Fault("partition ab+cl | cd", apply=lambda lab: lab.partition(["a", "b", "cl"], ["c", "d"]),
              during=partition_views, remove=lambda lab, _: lab.heal(), hold_s=HOLD_S,
              converge_bound_s=60),
        Fault("kill -9 d", apply=lambda lab: lab.kill9("d"),
              during=lambda lab: lab.full_view(without=["d"]),
              after=lambda lab: lab.full_view(without=["d"]), hold_s=HOLD_S),
    ]
    out, stop = tmp_path / "outcomes.jsonl", tmp_path / "stop"
    driver = lab.driver(out, stop, models=["m-one", "m-two"], max_requests=400, max_s=300,
                        request_timeout_s=HANG_BOUND_S + 30)
    lab.converge(lab.full_view(), 10, "full view before the faults")
    run(lab, plan)  # raises when a view misses its bound
    stop.touch()
    driver.wait(HANG_BOUND_S + 60)
    outcomes = read_outcomes(out)
    rows = summarize(outcomes, plan, HANG_BOUND_S)
    print(table(rows, plan))
    print(outcome_lines(outcomes, plan, lab.names()))
    for f in plan:
        print(f.name, f.notes)

    assert driver.returncode == 0
    assert len(outcomes) >= 20, "too few requests to say anything"
    assert sum(r["hang"] for r in rows) == 0, f"requests past {HANG_BOUND_S} s"
    unclean = [r for r in outcomes if r["kind"] not in ("ok", "error")]
    assert not unclean, unclean
    # a hung llama-server is killed by meshd: it never finishes what was retried away.
    # A whole node that resumes may (docs/reliability.md): counted and shown, bounded
    for f in plan:
        if f.paused:
            print(f"executed twice ({f.name}): {f.executed_twice}")
            assert f.executed_twice is not None and f.retried_away is not None
            assert f.executed_twice <= f.retried_away
    assert plan[1].executed_twice == 0, plan[1].notes
    # the mesh kept serving: every phase had answers
    for r in rows:
        if r["requests"]:
            assert r["ok"] >= 1, r
