"""Per-source penalties on the mesh port: a source that keeps failing to authenticate
is refused before TLS.

Every connection to the mesh port costs its listener a TLS handshake (about 1 ms of
CPU, in OpenSSL) before the peer can be told apart from a stranger, and meshd
answers every door on one reactor thread: a stranger sending foreign-certificate
HELLOs as fast as it can took half of each turn and doubled the latency of every
well-behaved request (BENCHMARKS.md, "Every door"). OpenSSH's answer to the same
problem is ``PerSourcePenalties``: a source address that fails to authenticate is
refused for a while, at accept, where a refusal costs almost nothing. This is
that, as a token bucket per address: a source may fail ``failures`` times in a
row, and gets one attempt back every ``refill_s`` seconds; with none left its
connections are closed as soon as they are accepted.

What counts as a failure is decided by the mesh port's factory
(``meshd.mesh.peer.server_factory``): a server-side connection that closed
before its peer proved a key of this mesh.
A member never fails that way unless it is misconfigured, and then its own
redials back off far slower than attempts come back.

The table is bounded (``max_sources``): when it is full the entry touched
longest ago goes, which at worst gives an attacker with that many addresses its
attempts back sooner.
"""

from __future__ import annotations

import collections
import logging

from twisted.internet.interfaces import IReactorTime

log = logging.getLogger(__name__)

MAX_SOURCES = 4096


class _Bucket:
    __slots__ = ("left", "at", "warned")

    def __init__(self, left: float, at: float):
        self.left = left  # attempts left (fractional while refilling)
        self.at = at  # when ``left`` was last brought up to date
        self.warned = False  # logged that it ran out (once until it is paid back in full)


class Penalties:
    """Failed authentications per source address, and whether a new connection from
    one is refused (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, *, failures: int, refill_s: float,
                 max_sources: int = MAX_SOURCES):
        self.clock = clock
        self.failures = failures
        self.refill_s = refill_s
        self.max_sources = max_sources
        self._sources: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()
        self.refused_total = 0

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    def _bucket(self, host: str) -> _Bucket | None:
        bucket = self._sources.get(host)
        if bucket is None:
            return None
        now = self.clock.seconds()
        bucket.left = min(float(self.failures), bucket.left + (now - bucket.at) / self.refill_s)
        bucket.at = now
        if bucket.left >= self.failures:  # paid back in full: forget it
            del self._sources[host]
            return None
        return bucket

    def refuses(self, host: str) -> bool:
        """Whether a connection from ``host`` is to be closed before TLS; counts it if so."""
        if not self.enabled:
            return False
        bucket = self._bucket(host)
        if bucket is None or bucket.left >= 1:
            return False
        self.refused_total += 1
        return True

    def failed(self, host: str, why: str) -> None:
        """A connection from ``host`` closed before its peer proved a key of this mesh."""
        if not self.enabled:
            return
        bucket = self._bucket(host)
        if bucket is None:
            while len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
            bucket = self._sources[host] = _Bucket(float(self.failures), self.clock.seconds())
        else:
            self._sources.move_to_end(host)
        bucket.left = max(0.0, bucket.left - 1)
        if bucket.left < 1 and not bucket.warned:
            # once until the source is paid back in full: a flood must not flood the log
            bucket.warned = True
            log.warning(
                "refusing peer connections from %s before TLS: it used up its %d attempts to "
                "authenticate (the last: %s); it gets one back every %g s ([mesh] penalty_s)",
                host, self.failures, why, self.refill_s)

    def sources(self) -> int:
        """Sources with attempts used and not yet back (the metric): entries are brought
        up to date when touched, so a source paid back since is dropped here first."""
        for host in list(self._sources):
            self._bucket(host)
        return len(self._sources)
