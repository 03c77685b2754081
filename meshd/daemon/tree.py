"""The building blocks of the daemon's service tree: ordered start and stop, listeners.

Twisted's ``MultiService`` starts its children in the order they were added but
does not wait for one to be up before starting the next, and stops them all at
once.  The daemon needs more: the API must listen before the mesh starts, and on
stop the mesh must be left before the API stops accepting, the requests drained
before the llama-servers stop.  :class:`OrderedMultiService` (after buildbot's
``AsyncMultiService``) starts children one after the other, waiting for each
(a child's ``startService`` may return a Deferred), and stops them in reverse
order, each after the one before has finished, collecting every error instead
of swallowing it or stopping half-way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure

from meshd.errors import ServiceStopErrors, StartupError

log = logging.getLogger("meshd.daemon.tree")


def first_line(e: BaseException) -> str:
    """An exception as one line for the operator."""
    text = str(e) or e.__class__.__name__
    return text.splitlines()[0]


class OrderedMultiService(service.MultiService):
    """Children started in order, each waited for; stopped in reverse, errors collected.

    ``startService`` returns a Deferred that fires once every child is up, or fails
    with the first child's failure (children after it are not started; the ones
    already started are stopped by ``stopService``, as for any stop).  A stop that
    comes while the start is still going stops the start: no further child starts.
    ``stopService`` stops only the children that are running, and fails with
    :class:`meshd.errors.ServiceStopErrors` naming every child whose stop failed,
    once all of them were asked.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start: defer.Deferred[None] | None = None
        self._halt = False

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        service.Service.startService(self)
        self._halt = False
        self._start = defer.ensureDeferred(self._start_children())
        return self._start

    async def _start_children(self) -> None:
        for child in list(self):
            if self._halt:
                return
            await defer.maybeDeferred(child.startService)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        service.Service.stopService(self)
        self._halt = True
        return defer.ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        errors: list[tuple[str, Failure]] = []
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:  # noqa: BLE001 - collected, reported together below
                errors.append((child.name or repr(child), Failure()))
        if errors:
            raise ServiceStopErrors(errors)


class CallbackService(service.Service):
    """A step of the tree that is a call, not an object: ``on_start`` / ``on_stop``
    (either may return a Deferred).  Used for the glue that has no state of its own
    (draining, cancelling downloads), so that it still has a place in the order."""

    def __init__(self, name: str, *, on_start: Callable[[], Any] | None = None,
                 on_stop: Callable[[], Any] | None = None):
        self.name = name  # type: ignore[assignment]  # Twisted declares it None
        self._on_start = on_start
        self._on_stop = on_stop

    def startService(self) -> Any:  # noqa: N802 - Twisted's name
        super().startService()
        return self._on_start() if self._on_start is not None else None

    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        super().stopService()
        return self._on_stop() if self._on_stop is not None else None


class ListenerService(service.Service):
    """Listens on ``endpoint`` with ``factory`` while running.

    A listen that fails (port in use, no permission, a socket file in the way)
    fails the start with :class:`meshd.errors.StartupError` reading ``"<what>: <why>"``
    (``what`` names the config key and address, as ``[api] listen 127.0.0.1:9337``),
    so the operator gets one line; ``announce`` is logged once listening.
    """

    def __init__(self, name: str, endpoint: Callable[[], Any], factory: Any, *, what: str,
                 announce: str = ""):
        self.name = name  # type: ignore[assignment]  # Twisted declares it None
        self._endpoint = endpoint
        self.factory = factory
        self.what = what
        self.announce = announce
        self.port: Any = None  # the IListeningPort, while listening

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        super().startService()
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        try:
            endpoint: Any = self._endpoint()  # an IStreamServerEndpoint
            self.port = await endpoint.listen(self.factory)
        except Exception as e:  # CannotListenError, a socket file in the way, ...
            raise StartupError(f"{self.what}: {first_line(e)}") from None
        if self.announce:
            log.info("%s", self.announce)

    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
