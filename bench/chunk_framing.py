#!/usr/bin/env python3
"""What one upstream read costs meshd's data path in Python, before any socket work.

A read of N SSE chunks in llama-server's framing (the fake backend's chunks),
handled two ways, best of 7 runs:

- decode and frame again (meshd before issue 13): ``ChunkedDecoder.feed`` joins
  the payloads, then twisted.web's ``toChunk`` frames them as one chunk;
- pass through (issue 13): ``ChunkedDecoder.frame`` parses the size lines
  only and hands on the read's own bytes.

This is the part of the per-read cost the pass-through changes; the rest
(the reactor, recv/send, TLS in a tunnel) is the same either way, which is
why the end-to-end benchmarks move less than this one.

    python bench/chunk_framing.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.web.http import toChunk  # noqa: E402

from meshd.serving.proxy import ChunkedDecoder  # noqa: E402
from tests.harness.fakebackend import SSE_CHUNK, _chunked  # noqa: E402


def main() -> int:
    for n in (1, 25, 500):
        wire = b"".join(_chunked((SSE_CHUNK % ("fake", i)).encode()) for i in range(n))

        def decode_and_frame(wire: bytes = wire) -> None:
            b"".join(toChunk(ChunkedDecoder().feed(wire)))

        def pass_through(wire: bytes = wire) -> None:
            ChunkedDecoder().frame(wire)

        number = max(20, 20000 // n)
        old, new = (min(timeit.repeat(f, number=number, repeat=7)) / number
                    for f in (decode_and_frame, pass_through))
        print(f"{n:4d} chunks per read ({len(wire):6d} bytes): decode + frame again "
              f"{old * 1e6:7.1f} µs, pass through {new * 1e6:6.1f} µs "
              f"({old / new:.1f}x; per 1,000 chunks {old / n * 1e6:.2f} vs {new / n * 1e6:.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
