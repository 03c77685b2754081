"""The one retry policy: how long to wait before trying again, after each failure.

Everything in meshd that reconnects or restarts waits by this object, so the
delays an operator reads in the logs follow one rule: a first delay, doubled
after every failure up to a cap, back to the first delay once something
worked (``reset``).  Its users:

- the mesh rejoining its known nodes, and retrying the ``[mesh] join`` tokens
  (``meshd.mesh.gossip``, ``meshd.mesh.joining``): :meth:`Backoff.reconnect`;
- a passive node that found no active node to check in with
  (``meshd.passive.client``): :meth:`Backoff.reconnect`;
- a crashed llama-server or rpc-server (``meshd.backends.supervisor``): ``[llama]
  restart_min_s`` doubling to ``restart_max_s``, no jitter (one process, nobody
  to fall in step with).

``jitter`` (a fraction, e.g. 0.1 for +-10 %) spreads nodes that lost the same
peer at the same moment, so they do not all retry in lock step.  The delay for
the n-th failure is a pure function (:meth:`delay`), the shape of Twisted's
``ClientService`` ``backoffPolicy``; the object only counts failures, so tests
drive it with a ``task.Clock`` and a fixed ``random``.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable

RECONNECT_INITIAL_S = 1.0  # first retry of a lost mesh or check-in
RECONNECT_JITTER = 0.1  # +-10 %
_MAX_EXPONENT = 100  # past this the cap has long been reached (and floats stay finite)


class Backoff:
    """Delays for retrying: ``initial_s``, times ``factor`` after each failure, capped at ``max_s``."""

    def __init__(self, initial_s: float, max_s: float, *, factor: float = 2.0,
                 jitter: float = 0.0, random: Callable[[], float] | None = None):
        self.initial_s = min(initial_s, max_s)
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._random = random or _random.random
        self._failures = 0

    @classmethod
    def reconnect(cls, max_s: float, *, random: Callable[[], float] | None = None) -> Backoff:
        """The policy for reaching the mesh again: 1 s (``max_s`` if shorter), doubling up
        to ``max_s`` (``[mesh] rejoin_s``), +-10 % jitter."""
        return cls(RECONNECT_INITIAL_S, max_s, jitter=RECONNECT_JITTER, random=random)

    @property
    def failures(self) -> int:
        """Failures since the last :meth:`reset` (each :meth:`next_delay` counts one)."""
        return self._failures

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` earlier failures, before jitter."""
        return min(self.initial_s * self.factor ** min(failures, _MAX_EXPONENT), self.max_s)

    def next_delay(self) -> float:
        """The wait before the next try, and one more failure counted."""
        delay = self.delay(self._failures)
        self._failures += 1
        if not self.jitter:
            return delay
        return delay * (1 + self.jitter * (2 * self._random() - 1))

    def reset(self) -> None:
        """It worked: the next failure waits ``initial_s`` again."""
        self._failures = 0
