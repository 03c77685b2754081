#!/usr/bin/env python3
"""What the meshd API proxy costs a stream: throughput, time to first chunk, CPU.

Every figure is a ratio against a baseline measured in the same run, against
the same backend, with direct and proxied runs alternated so drift on a shared
machine hits both alike.

Part A, fast fake backend (tests/harness/fakebackend.py, 500 SSE chunks per stream):
chunks/s direct vs through the proxy at concurrency 1 and 32, the added median
time to first chunk at concurrency 1, and the proxy process's CPU seconds per
1,000 chunks (from /proc/PID/stat).

Part B, real llama-server with the real model: N streamed chat completions
direct and N through the proxy, alternated; tokens/s ratio and added median
time to first token.

Both parts run nginx (``bench/nginx_baseline.py``: proxy_buffering off,
keep-alive upstream, one worker) in front of the same backend in the same
run, alternated with the others: the second baseline, a mature proxy's cost.
``--before TREE`` adds meshd's API from another source tree (an older commit)
to the same alternation: before and after measured in one run, under the
same load.

The load generator is an asyncio protocol that only counts ``data: `` per read
(no JSON parsing); its own CPU share is printed so a client-bound result shows.

    python bench/proxy_overhead.py                 # both parts, about 1-2 minutes
    python bench/proxy_overhead.py --part a --rounds 5 --streams-32 640
    mkdir /tmp/before && git archive COMMIT | tar -x -C /tmp/before
    python bench/proxy_overhead.py --before /tmp/before
    python bench/proxy_overhead.py --part a --pin   # proxies on one CPU, the rest on the others

``--pin`` makes part A's figures repeatable on a small machine (unpinned, which
processes share a core moves the CPU per chunk by 2x between runs); part B's
llama-server needs every core, so part B is never pinned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from nginx_baseline import Nginx, on_cpus  # noqa: E402

from tests.harness.daemon import port_open  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# --pin: the proxies under test on these CPUs, the load generator and the backend on
# the others, so that where the scheduler puts whom does not decide the figures
PROXY_CPUS: set[int] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_port(port: int, timeout_s: float = 60.0) -> None:
    if not port_open(port, timeout_s):
        raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def start(argv: list[str], port: int, timeout_s: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    print(f"  started pid {proc.pid}: {' '.join(argv[:4])} ...", file=sys.stderr)
    wait_port(port, timeout_s)
    return proc


def add_pin_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--pin", action="store_true",
                        help=f"part A: {what} on the last CPU, the load generator and the "
                             "backends on the others (less scheduler noise; 2 CPUs or more)")


def pinned(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[int] | None:
    """``--pin``: the CPUs for the proxies under test (this process keeps the others);
    None without it.  Part A only: llama-server needs every core."""
    if not args.pin:
        return None
    if args.part != "a":
        parser.error("--pin is for --part a only (llama-server needs every core)")
    cpus = pin_split()
    print(f"pinned: the proxies on CPU {sorted(cpus)}, the rest on the others")
    return cpus


def pin_split() -> set[int]:
    """Confine this process (the load generator, and the backends it starts from now on)
    to all CPUs but the last; return the last, for the proxies."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    os.sched_setaffinity(0, set(cpus[:-1]))
    return {cpus[-1]}


def pin_tasks(pid: int, cpus: set[int]) -> None:
    """Confine every thread of the running process ``pid`` to ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the load generator ------------------------------------------------------------


class Dechunk:
    """The load generator's own chunked decoder, one step per chunk wholly inside a read.

    Not meshd's: the measuring tool must not change with the code it measures
    (a "before" run of an older meshd uses the same client).
    """

    __slots__ = ("left", "skip", "line", "done")

    def __init__(self) -> None:
        self.left = 0  # payload bytes to come in the current chunk
        self.skip = 0  # CRLF bytes to skip after a payload
        self.line = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        out = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self.left:
                take = min(self.left, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, end - pos)
                pos += take
                self.skip -= take
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.line += data[pos:]
                    break
                line, self.line = self.line + data[pos:nl], b""
                pos = nl + 1
                size = int(line.split(b";", 1)[0], 16)
                if not size:
                    self.done = True
                elif pos + size + 2 <= end:
                    out.append(data[pos:pos + size])
                    pos += size + 2
                else:
                    self.left = size
        return b"".join(out)


class Stream(asyncio.Protocol):
    """One streamed request on its own connection (Connection: close); counts SSE events.

    Events are counted in the de-chunked body: a proxy may place its HTTP chunk
    boundaries anywhere, even inside ``data: ``, so counting raw bytes miscounts.
    Times are taken when a read arrives, before the client decodes it: how
    many chunks a read holds (a proxy passing 500 small ones vs one it framed
    itself) must not show up as the proxy's latency.
    """

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request = request
        self.done = done
        self.t0 = time.perf_counter()
        self.t_first = 0.0
        self.t_last = 0.0
        self.events = 0
        self.tail = b""
        self.head = b""
        self.decoder: Dechunk | None = None
        self.in_body = False

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4:]
            self.in_body = True
            if b"transfer-encoding: chunked" in head:
                self.decoder = Dechunk()
        if self.decoder is not None:
            data = self.decoder.feed(data)
        buf = self.tail + data
        n = buf.count(b"data: ")
        if n:
            if not self.events:
                self.t_first = now
            self.t_last = now
            self.events += n
        self.tail = buf[-5:]

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(self)


def alternate_many(ports: list[int], request: bytes, n: int) -> list[tuple[float, float]]:
    """``n`` single streams to each port, in turn; per port the medians of tokens/s and
    of time to first token: ``[(tps, ttft_s), ...]`` in ``ports`` order."""
    runs: list[list[Stream]] = [[] for _ in ports]
    for _ in range(n):
        for i, port in enumerate(ports):
            runs[i].append(measure(port, request, 1, 1)["streams"][0])

    def tps(s: Stream) -> float:
        return s.events / (s.t_last - s.t0)

    return [(statistics.median(map(tps, r)), statistics.median(s.t_first - s.t0 for s in r))
            for r in runs]


def alternate(base_port: int, via_port: int, request: bytes, n: int) -> tuple[float, ...]:
    """:func:`alternate_many` for two ports: ``(base_tps, via_tps, base_ttft_s, via_ttft_s)``."""
    (b_tps, b_t), (v_tps, v_t) = alternate_many([base_port, via_port], request, n)
    return b_tps, v_tps, b_t, v_t


def stream_request(path: str, model: str, max_tokens: int | None, extra: str = "") -> bytes:
    tokens = f', "max_tokens": {max_tokens}' if max_tokens else ""
    body = (f'{{"model": "{model}", "stream": true{tokens}{extra}, '
            f'"messages": [{{"role": "user", "content": "Count from one to one hundred."}}]}}')
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


async def run_streams(port: int, request: bytes, total: int, concurrency: int) -> list[Stream]:
    loop = asyncio.get_running_loop()
    results: list[Stream] = []
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            done = loop.create_future()
            await loop.create_connection(lambda d=done: Stream(request, d), "127.0.0.1", port)
            results.append(await asyncio.wait_for(done, 600))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def measure(port: int, request: bytes, total: int, concurrency: int) -> dict:
    c0 = time.process_time()
    t0 = time.perf_counter()
    streams = asyncio.run(run_streams(port, request, total, concurrency))
    wall = time.perf_counter() - t0
    events = sum(s.events for s in streams)
    return {
        "wall": wall, "events": events, "streams": streams,
        "rate": events / wall,
        "ttfc": statistics.median(s.t_first - s.t0 for s in streams),
        "client_cpu": (time.process_time() - c0) / wall,
    }


# -- part A ---------------------------------------------------------------------------


class Target:
    """One way to the backend: its port and the processes whose CPU it costs."""

    def __init__(self, name: str, port: int, pids=None):
        self.name = name
        self.port = port
        self.pids = pids  # () -> [pid, ...], or None: not a proxy

    def cpu(self) -> float:
        return sum(map(cpu_seconds, self.pids())) if self.pids else 0.0


def start_proxy(tree: Path, backend_port: int, model: str) -> tuple[subprocess.Popen, int]:
    """meshd's API (``meshd.cli.static_api``) from the source tree ``tree`` in front of the backend.

    A tree from before the redesign (the CLI was ``meshd.api``'s main) runs as it was.
    """
    port = free_port()
    module = "meshd.cli.static_api" if (tree / "meshd/cli/static_api.py").exists() else "meshd.api"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--static",
         f"{model}=127.0.0.1:{backend_port}", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)}, preexec_fn=on_cpus(PROXY_CPUS))
    print(f"  started pid {proc.pid}: meshd's API from {tree}", file=sys.stderr)
    wait_port(port)
    return proc, port


def proxies(args, backend_port: int, model: str) -> tuple[list[subprocess.Popen], list[Target]]:
    """meshd (this tree, and ``--before TREE`` when given) and nginx in front of the backend."""
    procs, targets = [], []
    for name, tree in (("meshd", ROOT), ("meshd before", args.before)):
        if tree is None:
            continue
        proc, port = start_proxy(Path(tree).resolve(), backend_port, model)
        procs.append(proc)
        targets.append(Target(name, port, lambda p=proc.pid: [p]))
    nginx = Nginx(backend_port, free_port(), PROXY_CPUS)
    nginx.start(wait_port)
    targets.append(Target("nginx", nginx.port, nginx.pids))
    return [*procs, nginx], targets


def stop_all(procs: list) -> None:
    for proc in procs:
        if isinstance(proc, Nginx):
            proc.stop()
        else:
            stop(proc)


def part_a(args) -> None:
    fake_port = free_port()
    fake = start([sys.executable, "tests/harness/fakebackend.py", "--port", str(fake_port),
                  "--chunks", str(args.chunks)], fake_port)
    procs, via = proxies(args, fake_port, "fake")
    targets = [Target("direct", fake_port), *via]
    try:
        request = stream_request("/v1/chat/completions", "fake", None)
        expect = args.chunks + 1  # the chunks and [DONE]
        print(f"\nPart A: fake backend, {args.chunks} chunks per stream, {args.rounds} rounds "
              "alternated, medians")
        for concurrency, total in ((1, args.streams_1), (32, args.streams_32)):
            for t in targets:  # warm up all of them
                measure(t.port, request, concurrency, concurrency)
            runs: dict[str, list[dict]] = {t.name: [] for t in targets}
            cpu: dict[str, list[float]] = {t.name: [] for t in targets}
            for _ in range(args.rounds):
                for t in targets:
                    c0 = t.cpu()
                    r = measure(t.port, request, total, concurrency)
                    cpu[t.name].append((t.cpu() - c0) / (r["events"] / 1000))
                    runs[t.name].append(r)
            for name, rs in runs.items():
                bad = [s.events for r in rs for s in r["streams"] if s.events != expect]
                if bad:
                    raise SystemExit(f"{name}: streams with the wrong number of events: {bad[:5]}")
            rate = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
            d_rate, n_rate = rate["direct"], rate["nginx"]
            for t in via:
                client = statistics.median(r["client_cpu"] for r in runs[t.name])
                print(f"  concurrency {concurrency:2d}: via {t.name:12s} {rate[t.name]:9.0f} chunks/s, "
                      f"÷ direct {rate[t.name] / d_rate:.3f}, ÷ nginx {rate[t.name] / n_rate:.3f}; "
                      f"CPU {statistics.median(cpu[t.name]) * 1000:.1f} ms per 1,000 chunks; "
                      f"client CPU {client:.0%} of wall")
            print(f"  concurrency {concurrency:2d}: direct {d_rate:9.0f} chunks/s")
            if concurrency == 1:
                def first(rs: list[dict]) -> float:
                    return statistics.median(s.t_first - s.t0 for r in rs for s in r["streams"])

                d_t = first(runs["direct"])
                print(f"  time to first chunk, 500-chunk streams: direct {d_t * 1000:.2f} ms; added "
                      + ", ".join(f"via {t.name} {(first(runs[t.name]) - d_t) * 1000:+.2f} ms"
                                  for t in via))
                # the same with one-chunk streams: the proxy's own latency, without
                # fake + proxy + client fighting over the CPUs while 500 chunks fly
                short = stream_request("/v1/chat/completions", "fake", 1)
                firsts: dict[str, list[float]] = {t.name: [] for t in targets}
                for _ in range(args.rounds):
                    for t in targets:
                        firsts[t.name] += [s.t_first - s.t0
                                           for s in measure(t.port, short, total, 1)["streams"]]
                med = {name: statistics.median(v) for name, v in firsts.items()}
                print(f"  time to first chunk, 1-chunk streams: direct {med['direct'] * 1000:.2f} ms; "
                      "added " + ", ".join(f"via {t.name} {(med[t.name] - med['direct']) * 1000:+.2f} ms"
                                           for t in via))
    finally:
        stop_all(procs)
        stop(fake)


# -- part B ---------------------------------------------------------------------------


def part_b(args) -> None:
    from conftest import find_llama_bin_dir, find_model

    bin_dir, model = find_llama_bin_dir(), find_model()
    if not bin_dir or not model:
        print("\nPart B skipped: no llama.cpp build or model (run scripts/build-llama.sh)")
        return
    llama_port = free_port()
    llama = start([f"{bin_dir}/llama-server", "-m", model, "--host", "127.0.0.1",
                   "--port", str(llama_port), "--ctx-size", "2048", "--alias", "gemma"],
                  llama_port, timeout_s=120)
    procs, via = proxies(args, llama_port, "gemma")
    try:
        request = stream_request("/v1/chat/completions", "gemma", args.max_tokens,
                                 ', "temperature": 0, "seed": 1, "ignore_eos": true')
        for _ in range(60):  # wait for the model to load
            r = measure(llama_port, request, 1, 1)
            if r["events"] > 2:
                break
            time.sleep(1)
        for t in via:
            measure(t.port, request, 1, 1)
        results = alternate_many([llama_port] + [t.port for t in via], request, args.real_requests)
        (d_tps, d_t), rest = results[0], results[1:]
        print(f"\nPart B: llama-server + {Path(model).name}, {args.real_requests} streamed requests "
              f"each way alternated, max_tokens {args.max_tokens}, medians")
        print(f"  direct: {d_tps:.1f} tokens/s, time to first token {d_t * 1000:.2f} ms")
        for t, (tps, ttft) in zip(via, rest, strict=True):
            print(f"  via {t.name:12s}: {tps:.1f} tokens/s, ratio {tps / d_tps:.3f}; "
                  f"time to first token added {(ttft - d_t) * 1000:+.2f} ms")
    finally:
        stop_all(procs)
        stop(llama)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams-1", type=int, default=100, help="streams per round at concurrency 1")
    parser.add_argument("--streams-32", type=int, default=128,
                        help="streams per round at concurrency 32")
    parser.add_argument("--real-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="also run meshd from this source tree (an older commit: "
                             "git archive COMMIT | tar -x -C /tmp/before), alternated in the same run")
    add_pin_option(parser, "meshd's APIs and nginx")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    global PROXY_CPUS
    PROXY_CPUS = pinned(parser, args)
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
