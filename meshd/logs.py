"""Log set-up: one event per line on stderr, for journald or a terminal.

Twisted's own log events are bridged into the standard library so that one
level setting and one format cover everything.  Under systemd (``JOURNAL_STREAM``
set) the timestamp is left to journald; in a terminal each line carries one.
``[log] format = "json"`` writes one JSON object a line instead, for people who
ship journald into a log store that would otherwise have to parse free text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
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


FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per event, so a log store needs no parser of its own.

    The time is always included (ISO 8601, UTC, to the microsecond) even under
    journald: a shipped line is read away from journald's own timestamp.  A
    traceback goes in ``exception`` rather than on lines of its own, which would
    each be a separate, unparseable journal entry.
    """

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exception"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False)


def printable(text: str) -> str:
    """``text`` with every character that is not printable written as its escape
    (``\\n``, ``\\x1b``, ``\\u2028``): a line stays one line, and shows no
    terminal escape sequence, whatever a peer or a client put into it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class TextFormatter(logging.Formatter):
    """One line per event for journald or a terminal.

    Log messages carry text from outside: a peer's close reason, a PEER_DOWN
    reason, a DROP's origin, a model name, a client's path.  Rather than trusting
    every one of those places to clean what it logs, the message is escaped
    here (:func:`printable`), once for all; so a peer cannot forge a log line
    with a newline, nor move an operator's cursor.  A traceback is meshd's own
    and keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        message = record.message
        safe = printable(message)
        if safe is message:
            return super().formatMessage(record)
        record.message = safe
        try:
            return super().formatMessage(record)
        finally:
            record.message = message  # another handler formats it its own way


def formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter for ``[log] format``; the config loader has refused any other value."""
    if fmt == "json":
        return JsonFormatter()
    if fmt != "text":
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    if os.environ.get("JOURNAL_STREAM"):
        return TextFormatter("%(levelname)s %(name)s: %(message)s")
    return TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# the handler setup() installed, whose format a reload changes (apply())
_handler: logging.Handler | None = None


def setup(level: str = "info", stream: IO[str] | None = None, fmt: str = "text") -> None:
    global _handler
    stream = stream or sys.stderr
    handler = _handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt))
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


def apply(level: str, fmt: str) -> None:
    """``[log] level`` and ``format`` changed by a reload: the next line is written with
    them (only the handler :func:`setup` installed is reformatted, nobody else's)."""
    logging.getLogger().setLevel(level.upper())
    if _handler is not None:
        _handler.setFormatter(formatter(fmt))
