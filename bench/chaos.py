"""The chaos run, long form: a 4-node mesh of real llama-servers and a passive client in
network namespaces, a bounded stream of ``openai`` SDK requests through the client, and
every fault of issue 12 in turn.

    sudo .venv/bin/python bench/chaos.py [--json FILE] [--requests-table]

Needs root, ``ip netns`` and ``iptables``; ``MESHD_LLAMA_BIN_DIR`` and ``MESHD_TEST_MODEL``
(or the caches ``scripts/build-llama.sh`` fills).  Hosts a, c serve ``m-one`` and b, d
``m-two`` (the same Gemma GGUF under two names); the client ``cl`` joins with a reusable
token.  Faults, each applied, held under traffic, removed, with the views waited for
(bounded) and timed both ways: kill -9 a host and start it again; SIGSTOP a whole node
(meshd and its llama-server); SIGSTOP a llama-server alone; a silent cut (iptables DROP)
between the client and a host; 200 ms delay each way on every mesh connection (the
relay); 5 % random loss on every link; a partition {a, b, client} | {c, d} and its heal;
a clean restart; one node leaving.

Prints a table (per phase: requests, ok, hangs, unclean failures, the longest request,
how long until every node saw the fault and agreed again after it, the clean errors by
status and type), the executed-twice count, and with ``--requests-table`` every
request's outcome.  Pass: no hang past the bound, nothing unclean, no view outside its
bound (the script exits non-zero otherwise).  Figures: BENCHMARKS.md, docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.chaoslab import API, LLAMA, TIMING, Lab, LabError  # noqa: E402
from tests.harness.chaosrun import Fault, outcome_lines, run, summarize, table  # noqa: E402

HOSTS = {"a": "m-one", "b": "m-two", "c": "m-one", "d": "m-two"}
# a request ends (answer or clean error) within: its first host's first-byte deadline,
# the retry's, the stream-idle deadline and connects, plus generation: stated bound
HANG_BOUND_S = 2 * API["first_byte_timeout_s"] + API["stream_idle_timeout_s"] + 10.0


def faults(hold_s: float) -> list[Fault]:
    both = {"a", "b", "cl"}

    def partition_views(lab: Lab) -> dict:
        ids = {n: lab.nodes[n].node_id for n in lab.nodes}
        from tests.harness.chaoslab import View

        left = View.of([ids["a"], ids["b"]], {"m-one": [ids["a"]], "m-two": [ids["b"]]})
        right = View.of([ids["c"], ids["d"]], {"m-one": [ids["c"]], "m-two": [ids["d"]]})
        return {n: left if n in both else right for n in lab.nodes}

    return [
        Fault("kill -9 a, restart it", apply=lambda lab: lab.kill9("a"),
              during=lambda lab: lab.full_view(without=["a"]),
              remove=lambda lab, _: lab.restart("a"), hold_s=hold_s, converge_bound_s=90),
        Fault("SIGSTOP node b", apply=lambda lab: lab.sigstop_node("b"),
              during=lambda lab: {n: lab.full_view(without=["b"]) for n in ("a", "c", "d", "cl")},
              remove=lambda lab, pids: lab.sigcont(pids), hold_s=hold_s, paused="b"),
        Fault("SIGSTOP llama-server c", apply=lambda lab: lab.sigstop_llama("c"),
              during=lambda lab: lab.full_view(cold=["c"]),
              remove=lambda lab, pid: lab.sigcont([pid]), hold_s=hold_s, paused="c",
              converge_bound_s=90),
        Fault("cut cl-d (DROP)", apply=lambda lab: lab.cut("cl", "d"),
              remove=lambda lab, _: lab.heal(), hold_s=2 * hold_s, steady=True),
        Fault("200 ms delay", apply=lambda lab: lab.delay(True),
              remove=lambda lab, _: lab.delay(False), hold_s=2 * hold_s, steady=True),
        Fault("5 % loss", apply=lambda lab: lab.loss(0.05),
              remove=lambda lab, _: lab.loss(None), hold_s=2 * hold_s, steady=True),
        Fault("partition ab+cl | cd",
              apply=lambda lab: lab.partition(["a", "b", "cl"], ["c", "d"]),
              during=partition_views, remove=lambda lab, _: lab.heal(), hold_s=hold_s,
              converge_bound_s=60),
        Fault("restart d (SIGTERM)", apply=lambda lab: lab.restart("d"),
              hold_s=1.0, converge_bound_s=90),
        Fault("c leaves", apply=lambda lab: lab.leave("c"),
              during=lambda lab: lab.full_view(without=["c"]),
              after=lambda lab: lab.full_view(without=["c"]), hold_s=hold_s),
    ]


def main() -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold-s", type=float, default=10.0, help="traffic under each fault")
    parser.add_argument("--json", type=Path, help="write every figure and outcome here")
    parser.add_argument("--requests-table", action="store_true", help="print every request")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import find_llama_bin_dir, find_model  # the caches, or the env vars

    bin_dir = os.environ.get("MESHD_LLAMA_BIN_DIR") or find_llama_bin_dir()
    gguf = os.environ.get("MESHD_TEST_MODEL") or find_model()
    if not bin_dir or not gguf:
        print("needs llama-server and the Gemma GGUF: scripts/build-llama.sh, ./dev setup")
        return 2
    base = Path(tempfile.mkdtemp(prefix="meshd-chaos-"))
    lab = Lab(base, hosts=HOSTS, llama_bin_dir=str(bin_dir), gguf=str(gguf))
    plan = faults(args.hold_s)
    ok = True
    t_start = time.monotonic()
    try:
        lab.build()
        lab.start()
        setup_s = time.monotonic() - t_start
        print(f"mesh of 4 hosts + client warm in {setup_s:.1f} s", file=sys.stderr)
        out, stop = base / "outcomes.jsonl", base / "stop"
        driver = lab.driver(out, stop, models=["m-one", "m-two"], max_requests=5000,
                            max_s=1500, request_timeout_s=HANG_BOUND_S + 30)
        time.sleep(args.hold_s)  # a quiet baseline
        try:
            run(lab, plan, log=lambda s: print(s, file=sys.stderr))
        except LabError as e:
            ok = False
            print(f"FAILED: {e}", file=sys.stderr)
        stop.touch()
        driver.wait(HANG_BOUND_S + 60)
        outcomes = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        names = lab.names()
    finally:
        lab.close()
    rows = summarize(outcomes, plan, HANG_BOUND_S)
    print(f"settings: mesh {TIMING}; api {API}; llama {LLAMA}")
    print(f"{len(outcomes)} requests (2 at a time, max_tokens 8, models and streaming "
          f"alternating) in {time.monotonic() - t_start:.0f} s; hang bound {HANG_BOUND_S:g} s")
    print(table(rows, plan))
    for f in plan:
        if f.paused:
            print(f"executed twice ({f.name}): {f.executed_twice} ({'; '.join(f.notes)})")
        elif f.notes:
            print(f"{f.name}: {'; '.join(f.notes)}")
    if args.requests_table:
        print(outcome_lines(outcomes, plan, names))
    hangs = sum(r["hang"] for r in rows)
    unclean = sum(r["unclean"] for r in rows)
    twice = sum(f.executed_twice or 0 for f in plan)
    print(f"hangs {hangs}, unclean failures {unclean}, executed twice {twice}; "
          f"longest detection {max((f.detect_s or 0) for f in plan):.2f} s, longest "
          f"convergence {max((f.converge_s or 0) for f in plan):.2f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"mesh": TIMING, "api": API, "llama": LLAMA},
            "hang_bound_s": HANG_BOUND_S,
            "phases": [{"name": f.name, "detect_s": f.detect_s, "converge_s": f.converge_s,
                        "t_apply": f.t_apply, "t_remove": f.t_remove, "t_end": f.t_end,
                        "executed_twice": f.executed_twice, "retried_away": f.retried_away,
                        "polls": f.polls, "dips": f.dips, "notes": f.notes} for f in plan],
            "rows": [{**r, "errors": dict(r["errors"])} for r in rows],
            "outcomes": outcomes}, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"kept {base}", file=sys.stderr)
    return 0 if ok and not hangs and not unclean else 1


if __name__ == "__main__":
    raise SystemExit(main())
