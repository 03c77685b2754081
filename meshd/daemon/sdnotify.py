"""The systemd notify protocol (``Type=notify``), without a libsystemd dependency.

systemd learns that meshd is ready, what it is doing, that it is alive and that it
is stopping from datagrams sent to ``$NOTIFY_SOCKET`` (sd_notify(3)).  Outside
systemd the variable is unset and every call is a no-op, so the daemon code calls
the notifier unconditionally.  A failed send is logged once and never raised: the
daemon must not die because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

log = logging.getLogger("meshd.daemon.sdnotify")


class Notifier:
    """Sends sd_notify messages to ``address`` (a path, or ``@name`` for the abstract namespace)."""

    def __init__(self, address: str | None = None, *, from_environment: bool = True):
        if address is None and from_environment:
            address = os.environ.get("NOTIFY_SOCKET")
        self.address: str | bytes | None = None
        if address:
            # a leading "@" is Linux's abstract namespace: a NUL byte on the wire
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False
        # READY=1 was sent once: a reload may say RELOADING=1 and READY=1 again (before
        # that a READY=1 would end systemd's start job early)
        self.was_ready = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                log.warning(
                    "cannot notify systemd at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"),
                    e.strerror or e,
                )
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        self.was_ready = True
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(_status_field(text))

    def reloading(self, status: str | None = None, *, monotonic_usec: int | None = None) -> bool:
        """RELOADING=1 with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC when the reload began): systemd
        253+ (``Type=notify-reload``) matches the reload by it; 252 ignores the field.  The
        reload ends with :meth:`ready`."""
        if monotonic_usec is None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}"]
        if status:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        fields = ["STOPPING=1"]
        if status:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_field(text: str) -> str:
    # STATUS= is one line: a newline would start a new (bogus) assignment
    return "STATUS=" + " ".join(str(text).split())


def watchdog_interval_s(
    usec: str | int | None = None, pid: str | int | None = None, *, my_pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None for no watchdog.

    ``WATCHDOG_PID``, when set, names the process systemd watches; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    if usec is None:
        usec = os.environ.get("WATCHDOG_USEC")
    if pid is None:
        pid = os.environ.get("WATCHDOG_PID")
    my_pid = os.getpid() if my_pid is None else my_pid
    try:
        usec_value = int(usec) if usec not in (None, "") else 0
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    if usec_value <= 0:
        return None
    if pid not in (None, ""):
        try:
            if int(pid) != my_pid:
                return None
        except ValueError:
            return None
    return usec_value / 2_000_000


class WatchdogService(Service):
    """Pings systemd's watchdog at half its timeout while the service runs.

    The ping runs in the reactor thread, so a wedged reactor stops the pings and
    systemd restarts the daemon: exactly what the watchdog is for.
    """

    name = "sd-watchdog"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(
        self,
        notifier: Notifier,
        *,
        clock: IReactorTime,
        usec: str | int | None = None,
        pid: str | int | None = None,
    ):
        self.notifier = notifier
        self.interval_s = watchdog_interval_s(usec, pid)
        self._loop = LoopingCall(notifier.watchdog)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.interval_s is not None and self.notifier.enabled:
            log.info("systemd watchdog: pinging every %.1f s", self.interval_s)
            self._loop.start(self.interval_s, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()
