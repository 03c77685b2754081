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

The load generator is an asyncio protocol that only counts ``data: `` per read
(no JSON parsing); its own CPU share is printed so a client-bound result shows.

    python bench/proxy_overhead.py                 # both parts, about 1-2 minutes
    python bench/proxy_overhead.py --part a --rounds 5 --streams-32 640
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

from nginx_baseline import Nginx  # noqa: E402

from meshd.serving.proxy import ChunkedDecoder  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def start(argv: list[str], port: int, timeout_s: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    print(f"  started pid {proc.pid}: {' '.join(argv[:4])} ...", file=sys.stderr)
    wait_port(port, timeout_s)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the load generator ------------------------------------------------------------


class Stream(asyncio.Protocol):
    """One streamed request on its own connection (Connection: close); counts SSE events.

    Events are counted in the de-chunked body: a proxy may place its HTTP chunk
    boundaries anywhere, even inside ``data: ``, so counting raw bytes miscounts.
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
        self.decoder: ChunkedDecoder | None = None
        self.in_body = False

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4:]
            self.in_body = True
            if b"transfer-encoding: chunked" in head:
                self.decoder = ChunkedDecoder()
        if self.decoder is not None:
            data = self.decoder.feed(data)
        buf = self.tail + data
        n = buf.count(b"data: ")
        if n:
            now = time.perf_counter()
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


def part_a(args) -> None:
    fake_port, proxy_port, nginx_port = free_port(), free_port(), free_port()
    fake = start([sys.executable, "tests/harness/fakebackend.py", "--port", str(fake_port),
                  "--chunks", str(args.chunks)], fake_port)
    proxy = start([sys.executable, "-m", "meshd.cli.static_api", "--static", f"fake=127.0.0.1:{fake_port}",
                   "--listen", f"127.0.0.1:{proxy_port}"], proxy_port)
    nginx = Nginx(fake_port, nginx_port)
    nginx.start(wait_port)
    try:
        request = stream_request("/v1/chat/completions", "fake", None)
        expect = args.chunks + 1  # the chunks and [DONE]
        print(f"\nPart A: fake backend, {args.chunks} chunks per stream, {args.rounds} rounds "
              "alternated, medians")
        for concurrency, total in ((1, args.streams_1), (32, args.streams_32)):
            for port in (proxy_port, fake_port, nginx_port):  # warm up all three
                measure(port, request, concurrency, concurrency)
            direct, proxied, viangx, cpu, ngx_cpu = [], [], [], [], []
            for _ in range(args.rounds):
                direct.append(measure(fake_port, request, total, concurrency))
                c0 = cpu_seconds(proxy.pid)
                r = measure(proxy_port, request, total, concurrency)
                cpu.append((cpu_seconds(proxy.pid) - c0) / (r["events"] / 1000))
                proxied.append(r)
                c0 = sum(map(cpu_seconds, nginx.pids()))
                r = measure(nginx_port, request, total, concurrency)
                ngx_cpu.append((sum(map(cpu_seconds, nginx.pids())) - c0) / (r["events"] / 1000))
                viangx.append(r)
            for r in direct + proxied + viangx:
                bad = [s.events for s in r["streams"] if s.events != expect]
                if bad:
                    raise SystemExit(f"streams with the wrong number of events: {bad[:5]}")
            d_rate = statistics.median(r["rate"] for r in direct)
            p_rate = statistics.median(r["rate"] for r in proxied)
            print(f"  concurrency {concurrency:2d}: direct {d_rate:9.0f} chunks/s, "
                  f"via proxy {p_rate:9.0f} chunks/s, ratio {p_rate / d_rate:.3f}; "
                  f"proxy CPU {statistics.median(cpu) * 1000:.1f} ms per 1,000 chunks; "
                  f"client CPU {statistics.median(r['client_cpu'] for r in proxied):.0%} of wall")
            n_rate = statistics.median(r["rate"] for r in viangx)
            print(f"  concurrency {concurrency:2d}: via nginx {n_rate:9.0f} chunks/s, ratio "
                  f"{n_rate / d_rate:.3f}; meshd / nginx {p_rate / n_rate:.3f}; nginx CPU "
                  f"{statistics.median(ngx_cpu) * 1000:.1f} ms per 1,000 chunks")
            if concurrency == 1:
                def first(runs: list[dict]) -> float:
                    return statistics.median(s.t_first - s.t0 for r in runs for s in r["streams"])

                d_t, p_t, n_t = first(direct), first(proxied), first(viangx)
                print(f"  time to first chunk, concurrency 1: direct {d_t * 1000:.2f} ms, "
                      f"via proxy {p_t * 1000:.2f} ms, added {(p_t - d_t) * 1000:.2f} ms; "
                      f"via nginx added {(n_t - d_t) * 1000:.2f} ms")
                # the same with one-chunk streams: the proxy's own latency, without
                # fake + proxy + client fighting over the CPUs while 500 chunks fly
                short = stream_request("/v1/chat/completions", "fake", 1)
                d_s, p_s, n_s = [], [], []
                for _ in range(args.rounds):
                    d_s += [s.t_first - s.t0 for s in measure(fake_port, short, total, 1)["streams"]]
                    p_s += [s.t_first - s.t0 for s in measure(proxy_port, short, total, 1)["streams"]]
                    n_s += [s.t_first - s.t0 for s in measure(nginx_port, short, total, 1)["streams"]]
                d_t, p_t, n_t = statistics.median(d_s), statistics.median(p_s), statistics.median(n_s)
                print(f"  time to first chunk, 1-chunk streams: direct {d_t * 1000:.2f} ms, "
                      f"via proxy {p_t * 1000:.2f} ms, added {(p_t - d_t) * 1000:.2f} ms; "
                      f"via nginx added {(n_t - d_t) * 1000:.2f} ms")
    finally:
        nginx.stop()
        stop(proxy)
        stop(fake)


# -- part B ---------------------------------------------------------------------------


def part_b(args) -> None:
    from conftest import find_llama_bin_dir, find_model

    bin_dir, model = find_llama_bin_dir(), find_model()
    if not bin_dir or not model:
        print("\nPart B skipped: no llama.cpp build or model (run scripts/build-llama.sh)")
        return
    llama_port, proxy_port = free_port(), free_port()
    llama = start([f"{bin_dir}/llama-server", "-m", model, "--host", "127.0.0.1",
                   "--port", str(llama_port), "--ctx-size", "2048", "--alias", "gemma"],
                  llama_port, timeout_s=120)
    proxy = start([sys.executable, "-m", "meshd.cli.static_api", "--static", f"gemma=127.0.0.1:{llama_port}",
                   "--listen", f"127.0.0.1:{proxy_port}"], proxy_port)
    nginx_port = free_port()
    nginx = Nginx(llama_port, nginx_port)
    nginx.start(wait_port)
    try:
        request = stream_request("/v1/chat/completions", "gemma", args.max_tokens,
                                 ', "temperature": 0, "seed": 1, "ignore_eos": true')
        for _ in range(60):  # wait for the model to load
            r = measure(llama_port, request, 1, 1)
            if r["events"] > 2:
                break
            time.sleep(1)
        measure(proxy_port, request, 1, 1)
        measure(nginx_port, request, 1, 1)
        (d_tps, d_t), (p_tps, p_t), (n_tps, n_t) = alternate_many(
            [llama_port, proxy_port, nginx_port], request, args.real_requests)
        print(f"\nPart B: llama-server + {Path(model).name}, {args.real_requests} streamed requests "
              f"each way alternated, max_tokens {args.max_tokens}, medians")
        print(f"  tokens/s: direct {d_tps:.1f}, via proxy {p_tps:.1f}, ratio {p_tps / d_tps:.3f}; "
              f"via nginx {n_tps:.1f}, ratio {n_tps / d_tps:.3f}")
        print(f"  time to first token: direct {d_t * 1000:.2f} ms, via proxy {p_t * 1000:.2f} ms, "
              f"added {(p_t - d_t) * 1000:.2f} ms; via nginx added {(n_t - d_t) * 1000:.2f} ms")
    finally:
        nginx.stop()
        stop(proxy)
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
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
