"""Log set-up: one event per line on stderr, for journald or a terminal.

Twisted's own log events are bridged into the standard library so that one
level setting and one format cover everything.  Under systemd (``JOURNAL_STREAM``
set) the timestamp is left to journald; in a terminal each line carries one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.logger import (
    ILogObserver,
    LogLevel,
    STDLibLogObserver,
    globalLogBeginner,
)
from zope.interface import implementer


@implementer(ILogObserver)
class _TwistedFilter:
    """Drop Twisted's chatty informational lines ("Starting factory ...")."""

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level < LogLevel.warn and not event.get("log_failure"):
            return
        self._observer(event)

    def __init__(self, observer: Callable[[dict[str, Any]], None]):
        self._observer = observer


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    stream = stream or sys.stderr
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    globalLogBeginner.beginLoggingTo(
        # a cast: mypy does not read zope's @implementer
        [cast(ILogObserver, _TwistedFilter(STDLibLogObserver(name="twisted")))],
        discardBuffer=True,
        redirectStandardIO=False,
    )
