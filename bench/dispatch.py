#!/usr/bin/env python3
"""What the reactor's dispatch of one event costs: Twisted's epoll reactor vs ``meshd.reactor``.

One pipe kept readable, one reader that does nothing, one ``doPoll(0)`` per
event (the epoll_wait system call is in both figures), best of 5 runs of
200,000 each, in this one process: Twisted's ``EPollReactor`` wraps every
event in ``log.callWithLogger`` (a legacy-logging context pushed and popped);
``meshd.reactor.EPollReactor`` dispatches it directly.  Every read or write
event of every connection pays the difference: a proxied chunk costs one
upstream read event.

    python bench/dispatch.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import epollreactor  # noqa: E402

from meshd.reactor import EPollReactor  # noqa: E402

EVENTS = 200_000


class Idle:
    """A readable selectable whose read does nothing (the pipe stays readable)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "idle"

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        return None


def per_event_us(reactor_class: type) -> float:
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        reactor = reactor_class()
        reactor.addReader(Idle(r))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(EVENTS):
                reactor.doPoll(0)
            best = min(best, time.perf_counter() - t0)
        return best / EVENTS * 1e6
    finally:
        os.close(r)
        os.close(w)


def main() -> int:
    twisted_us = per_event_us(epollreactor.EPollReactor)
    meshd_us = per_event_us(EPollReactor)
    print(f"per event (one epoll_wait each): Twisted's EPollReactor {twisted_us:.2f} µs, "
          f"meshd.reactor {meshd_us:.2f} µs; {twisted_us - meshd_us:.2f} µs less "
          f"(ratio {meshd_us / twisted_us:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
