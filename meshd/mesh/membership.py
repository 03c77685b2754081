"""Who is alive: the member table, incarnations, heartbeat timing, death reports,
the dead set, and events to listeners.

Pure logic with an injected clock: no sockets here.  ``meshd.mesh.gossip`` feeds it
what the connections see (a peer authenticated, announced, went silent, was
reported dead) and does what it answers (verify, broadcast, connect).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from meshd.nodename import clean as clean_name
from meshd.nodename import label
from meshd.states import MemberState
from meshd.units import gib

log = logging.getLogger("meshd.mesh.gossip")


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
        send_ping: Callable[[], object] | None = None,
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


# -- what a peer looks like ---------------------------------------------------------------


class DiskModel(NamedTuple):
    """A model file a peer has on disk."""

    name: str
    size_bytes: int


@dataclass(frozen=True)
class PeerView:
    """A peer as the rest of meshd sees it (frozen: hooks get snapshots, not the table)."""

    node_id: str
    addrs: tuple[str, ...]
    role: str
    serving: tuple[str, ...]
    vram_bytes: int
    available_models: tuple[DiskModel, ...]
    requested_models: tuple[str, ...]
    rtt_ms: float | None
    state: MemberState  # ALIVE, or VERIFYING while a death report about it is checked
    incarnation: int
    api: str
    versions: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # models it is starting a llama-server for (not in ``serving`` until warm)
    loading: tuple[str, ...] = ()
    # models it is set to serve but cannot run yet: waiting for VRAM, or a split worker
    waiting: tuple[str, ...] = ()
    # its [node] name, cleaned (meshd.nodename); "" when it sent none (an older meshd)
    name: str = ""

    @property
    def label(self) -> str:
        """``name (node_id)`` for logs and people, the id alone without a name."""
        return label(self.name, self.node_id)

    def essence(self) -> tuple:
        """What a PeerChanged is about: everything but RTT, state and incarnation."""
        return (self.addrs, self.role, self.serving, self.vram_bytes, self.available_models,
                self.requested_models, self.api, tuple(sorted(self.versions.items())),
                self.loading, self.waiting, self.name)


def view_from_announce(body: dict[str, Any], *,
                       state: MemberState = MemberState.ALIVE) -> PeerView:
    """A PeerView from an ANNOUNCE body; ValueError names the bad field."""

    def get(key: str, kind: type, default: Any = None) -> Any:
        value = body.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"announce field {key!r} is not a {kind.__name__}")
        return value

    models = []
    for m in get("available_models", list, []):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise ValueError("announce field 'available_models' holds a non-model")
        size = m.get("size_bytes", 0)
        models.append(DiskModel(m["name"], size if isinstance(size, int) else 0))
    return PeerView(
        node_id=get("node_id", str),
        addrs=tuple(str(a) for a in get("addrs", list, [])),
        role=get("role", str, "idle"),
        serving=tuple(str(s) for s in get("serving", list, [])),
        vram_bytes=get("vram_bytes", int, 0),
        available_models=tuple(models),
        requested_models=tuple(str(s) for s in get("requested_models", list, [])),
        rtt_ms=None,
        state=state,
        incarnation=get("incarnation", int),
        api=get("api", str, ""),
        versions=get("versions", dict, {}),
        loading=tuple(str(s) for s in get("loading", list, [])),
        waiting=tuple(str(s) for s in get("waiting", list, [])),
        name=clean_name(body.get("name")),  # untrusted text bound for logs: bounded, printable
    )


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerUp:
    node: PeerView


@dataclass(frozen=True)
class PeerChanged:
    node: PeerView
    old: PeerView


@dataclass(frozen=True)
class PeerDown:
    node_id: str
    reason: str
    name: str = field(default="", compare=False)  # its name, for log lines (PeerView.name)


@dataclass(frozen=True)
class PeerLeft:
    node_id: str
    name: str = field(default="", compare=False)


Event = PeerUp | PeerChanged | PeerDown | PeerLeft


class Verdict(enum.Enum):
    """What to do about a death report (``Membership.reported``)."""

    IGNORE = "ignore"  # not a member, or the report is older than what we know
    VERIFY = "verify"  # probe the peer ourselves, then call ``verified``
    REFUTE = "refute"  # it is about us: raise our incarnation and re-announce


@dataclass(frozen=True)
class Dead:
    incarnation: int
    reason: str
    at: float


@dataclass(frozen=True)
class Rumor:
    """A node someone else is connected to (from a MEMBERS digest)."""

    incarnation: int
    addrs: tuple[str, ...]
    via: str
    name: str = ""  # as the digest named it (cleaned), for log lines before it announces


class Membership:
    """The member table of one node.

    Rules (SWIM-like, with direct connections as the truth):

    - A peer is a member only while we hold an authenticated connection to it
      and it has announced itself (``announced``).
    - Losing that connection, or its heartbeat, removes it at once
      (``lost``) and the caller broadcasts PEER_DOWN.
    - A PEER_DOWN from someone else is *verified* before it removes anyone
      (``reported`` answers VERIFY; the caller probes and calls ``verified``):
      one broken link cannot remove a node that still answers us.
    - A removed node sits in the dead set with the incarnation it had.  Gossip
      about it (``rumor``) with that incarnation or older is stale and is not
      acted on; a higher incarnation (it refuted) makes it worth dialling; only
      its own authenticated connection makes it a member again.
    """

    def __init__(self, self_id: str, clock: IReactorTime, *, dead_set_max: int = 4096):
        self.self_id = self_id
        self._clock = clock
        self.members: dict[str, PeerView] = {}
        self.dead: dict[str, Dead] = {}
        self.rumors: dict[str, Rumor] = {}
        self._dead_set_max = dead_set_max
        self._listeners: list[Callable[[Event], None]] = []

    def add_listener(self, cb: Callable[[Event], None]) -> None:
        self._listeners.append(cb)

    def label(self, node_id: str) -> str:
        """``node_id`` for a log line: with its name while it is a member (or, before it
        announced, as a MEMBERS digest named it); the id alone otherwise."""
        view = self.members.get(node_id)
        if view is not None:
            return view.label
        rumor = self.rumors.get(node_id)
        return label(rumor.name if rumor is not None else None, node_id)

    def _emit(self, event: Event) -> None:
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:  # a listener's bug must not stop membership
                log.exception("membership listener %r failed on %r", cb, event)

    # -- direct knowledge ---------------------------------------------------------------

    def announced(self, view: PeerView) -> Event | None:
        """``view`` came over its own authenticated connection."""
        node_id = view.node_id
        old = self.members.get(node_id)
        if old is not None and view.incarnation < old.incarnation:
            return None  # an older incarnation's late frame
        dead = self.dead.pop(node_id, None)
        self.rumors.pop(node_id, None)
        if old is None:
            self.members[node_id] = view
            why = f"was removed: {dead.reason}" if dead else "new"
            log.info("peer %s up (%s): role %s, serving %s, %s VRAM, at %s", view.label, why,
                     view.role, ", ".join(view.serving) or "nothing", gib(view.vram_bytes),
                     ", ".join(view.addrs) or "?")
            event: Event = PeerUp(view)
        else:
            view = replace(view, state=old.state)
            self.members[node_id] = view
            if view.essence() == old.essence():
                return None
            log.info("peer %s changed: %s", view.label, _diff(old, view))
            event = PeerChanged(view, old)
        self._emit(event)
        return event

    def lost(self, node_id: str, reason: str) -> bool:
        """Our own connection to it is gone; True when it was a member (broadcast PEER_DOWN)."""
        view = self.members.pop(node_id, None)
        if view is None:
            return False
        self._bury(node_id, view.incarnation, reason)
        log.info("peer %s down: %s", view.label, reason)
        self._emit(PeerDown(node_id, reason, view.name))
        return True

    def left(self, node_id: str, incarnation: int) -> bool:
        """It told us it is leaving; True when it was a member."""
        view = self.members.pop(node_id, None)
        if view is None or incarnation < view.incarnation:
            if view is not None:
                self.members[node_id] = view
            return False
        self._bury(node_id, view.incarnation, "left the mesh")
        log.info("peer %s left the mesh", view.label)
        self._emit(PeerLeft(node_id, view.name))
        return True

    # -- what others tell us -------------------------------------------------------------

    def reported(self, node_id: str, incarnation: int, reporter: str, reason: str) -> Verdict:
        """``reporter`` says ``node_id`` (at ``incarnation``) is dead."""
        if node_id == self.self_id:
            log.info("%s reported us dead (%s); refuting with a higher incarnation",
                     self.label(reporter), reason)
            return Verdict.REFUTE
        view = self.members.get(node_id)
        if view is None or incarnation < view.incarnation or view.state == MemberState.VERIFYING:
            return Verdict.IGNORE
        self.members[node_id] = replace(view, state=MemberState.VERIFYING)
        log.info("peer %s reported dead by %s (%s); verifying", view.label, self.label(reporter),
                 reason)
        return Verdict.VERIFY

    def verified(self, node_id: str, alive: bool, reason: str) -> bool:
        """The outcome of our own check after a report; True when it removed the node."""
        view = self.members.get(node_id)
        if view is None:
            return False
        if alive:
            self.members[node_id] = replace(view, state=MemberState.ALIVE)
            log.info("peer %s was reported dead but answers us (%s); keeping it", view.label,
                     reason)
            return False
        return self.lost(node_id, reason)

    def rumor(self, node_id: str, incarnation: int, addrs: tuple[str, ...], via: str,
              name: str = "") -> bool:
        """``via`` is connected to ``node_id``; True when it is worth dialling now."""
        if node_id == self.self_id or node_id in self.members:
            return False
        old = self.rumors.get(node_id)
        if old is not None and old.incarnation > incarnation:
            return False
        self.rumors[node_id] = Rumor(incarnation, addrs, via, name)
        dead = self.dead.get(node_id)
        if dead is not None and incarnation <= dead.incarnation:
            return False  # stale: the same life we saw die
        return old is None or old.incarnation < incarnation or dead is not None

    def forget_rumor(self, node_id: str) -> None:
        self.rumors.pop(node_id, None)

    def _bury(self, node_id: str, incarnation: int, reason: str) -> None:
        self.dead[node_id] = Dead(incarnation, reason, self._clock.seconds())
        if len(self.dead) > self._dead_set_max:
            oldest = min(self.dead, key=lambda k: self.dead[k].at)
            del self.dead[oldest]


def _diff(old: PeerView, new: PeerView) -> str:
    parts = []
    for name in ("name", "role", "serving", "loading", "waiting", "vram_bytes",
                 "available_models", "requested_models", "addrs", "api"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            if name == "available_models":
                a, b = [m.name for m in a], [m.name for m in b]
            parts.append(f"{name} {_short(a)} -> {_short(b)}")
    return "; ".join(parts) or "versions"


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
