"""``meshd.reactor``: Twisted's epoll reactor without the per-event log context.

A reactor instance driven by hand (``doPoll(0)``) over pipes: events reach their
selectables, a handler that raises is logged and its selectable disconnected as
Twisted's own reactor does it, and a selectable removed by an earlier event of
the same poll is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python import log

from meshd.reactor import EPollReactor


class Reader:
    """A minimal readable selectable over a pipe's read end."""

    def __init__(self, fd: int, action=None):
        self.fd = fd
        self.action = action
        self.reads = 0
        self.lost: list = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "reader"

    def doRead(self):  # noqa: N802 - Twisted's name
        self.reads += 1
        os.read(self.fd, 100)
        if self.action is not None:
            return self.action()
        return None

    def connectionLost(self, reason):  # noqa: N802 - Twisted's name
        self.lost.append(reason)


@pytest.fixture
def pipes():
    made = [os.pipe() for _ in range(2)]
    yield made
    for r, w in made:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def test_events_reach_their_selectables(pipes):
    reactor = EPollReactor()
    readers = [Reader(r) for r, _ in pipes]
    for reader in readers:
        reactor.addReader(reader)
    os.write(pipes[0][1], b"x")
    reactor.doPoll(0)
    assert [r.reads for r in readers] == [1, 0]
    os.write(pipes[1][1], b"y")
    os.write(pipes[0][1], b"z")
    reactor.doPoll(0)
    assert [r.reads for r in readers] == [2, 1]


def test_a_handler_that_raises_is_logged_and_its_selectable_disconnected(pipes):
    errors = []
    log.addObserver(lambda e: errors.append(e) if e.get("isError") else None)
    reactor = EPollReactor()

    def boom():
        raise RuntimeError("a bug in a protocol")

    reader = Reader(pipes[0][0], boom)
    reactor.addReader(reader)
    os.write(pipes[0][1], b"x")
    reactor.doPoll(0)
    assert reader.lost and reader.lost[0].check(RuntimeError, ConnectionLost)
    assert reader not in reactor.getReaders()
    assert any("a bug in a protocol" in str(e.get("failure", "")) for e in errors)


def test_a_selectable_removed_by_an_earlier_event_is_skipped(pipes):
    reactor = EPollReactor()
    second = Reader(pipes[1][0])

    def remove_second():
        reactor.removeReader(second)

    first = Reader(pipes[0][0], remove_second)
    reactor.addReader(first)
    reactor.addReader(second)
    os.write(pipes[0][1], b"x")
    os.write(pipes[1][1], b"y")
    reactor.doPoll(0)  # both ready in one poll, in the order they became ready
    assert first.reads == 1 and second.reads == 0 and not second.lost


def test_install_makes_it_the_global_reactor_and_leaves_an_installed_one_alone():
    code = ("import sys; from meshd import reactor as r; first = r.install(); "
            "from twisted.internet import reactor; "
            "print(first, type(reactor).__module__, r.install())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["True", "meshd.reactor", "False"]
