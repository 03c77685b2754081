"""Who is alive: the member table, incarnations, heartbeat timing, death reports,
the dead set, and events to listeners.

Pure logic with an injected clock: no sockets here.  ``meshd.mesh`` feeds it
what the connections see (a peer authenticated, announced, went silent, was
reported dead) and does what it answers (verify, broadcast, connect).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

log = logging.getLogger("meshd.mesh")


class Heartbeat:
    """Liveness of one connection: ping every ``interval_s``, dead after ``timeout_s`` of silence.

    Only one side of a connection pings (``send_ping`` given); the other answers
    each PING with a PONG, so an idle pair exchanges two tiny frames per
    interval.  *Any* frame received counts as life (``traffic_seen``); the
    deadline is one timer that is pushed back, not a poll.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval_s: float,
        timeout_s: float,
        *,
        on_timeout: Callable[[float], None],
        send_ping: Callable[[], None] | None = None,
    ):
        self._clock = clock
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._send_ping = send_ping
        self._deadline: IDelayedCall | None = None
        self._ticker: IDelayedCall | None = None
        self.last_seen = clock.seconds()

    @property
    def running(self) -> bool:
        return self._deadline is not None

    def start(self) -> None:
        self.last_seen = self._clock.seconds()
        self._deadline = self._clock.callLater(self.timeout_s, self._expired)
        if self._send_ping is not None:
            self._ticker = self._clock.callLater(self.interval_s, self._tick)

    def traffic_seen(self) -> None:
        self.last_seen = self._clock.seconds()
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.timeout_s)

    def stop(self) -> None:
        for call in (self._deadline, self._ticker):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._ticker = None

    def _tick(self) -> None:
        self._ticker = self._clock.callLater(self.interval_s, self._tick)
        assert self._send_ping is not None
        self._send_ping()

    def _expired(self) -> None:
        silent = self._clock.seconds() - self.last_seen
        self.stop()
        self._on_timeout(silent)
