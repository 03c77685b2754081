"""The daemon's reactor: Twisted's epoll reactor, dispatching events without a log context.

Twisted's ``EPollReactor.doPoll`` runs every read and write event inside
``log.callWithLogger``, which pushes a legacy-logging context (the
selectable's log prefix, for ``log.msg`` lines that name their "system") and
pops it again: a dict copy and four Python calls per event, about a tenth of
what a proxied chunk costs meshd.  meshd writes its logs through the standard
library, whose lines do not show that context (``meshd.logs``), so its own
process dispatches events directly.  Everything else is Twisted's: a failing
handler is still logged and its connection still closed (by
``_doReadOrWrite``, which is unchanged).

:func:`install` is called by the daemon and ``meshd.cli.static_api`` for their
own processes only; tests keep whatever reactor they run.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet import epollreactor


class EPollReactor(epollreactor.EPollReactor):
    def doPoll(self, timeout: float | None) -> None:  # noqa: N802 - Twisted's name
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:  # gone meanwhile: an earlier event closed it
                dispatch(selectable, fd, event)

    doIteration = doPoll


def install() -> bool:
    """Make :class:`EPollReactor` the global reactor; False (and nothing changed) when a
    reactor is installed already (a test's, or one something imported first)."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())
    return True
