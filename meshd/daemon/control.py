"""The control API: JSON over HTTP on a UNIX socket, for ``meshctl``.

Only processes that can open the socket (root and the ``meshd`` group: mode
0660) can reach it, so it needs no authentication of its own.  The resource
translates HTTP into calls on a ``ControlTarget`` (the node) and the node's
answers back into JSON; it holds no state.  Status codes carry meshctl's exit
codes: 409 is a refusal (exit 3), 501 a command this daemon does not support,
400 bad arguments (exit 2).

Endpoints::

    GET  /status            GET  /peers           GET  /gpus
    GET  /models[?catalog=1]
    GET  /explain?model=M[&client=ID]
    POST /leave             POST /reload          POST /drop {"model"}
    POST /token {"ttl_s", "once"}                  POST /token/revoke {"id"}
    POST /join {"token"}    POST /download {"name"}
    POST /serve {"model"}   (meshctl serve: lifts a mesh-wide drop)
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from meshd import jsonbounds
from meshd.config import LISTEN_BACKLOG
from meshd.errors import BadRequest, Refused  # noqa: F401 - re-exported for the control target
from meshd.httpbounds import BoundedSite

log = logging.getLogger("meshd.daemon.control")

SOCKET_MODE = 0o660
SOCKET_GROUP = "meshd"
# a control request body is a handful of fields; anything bigger is a mistake, refused
# with 413 before it is read (meshd.httpbounds)
MAX_BODY_BYTES = 64 * 1024
DEFAULT_TOKEN_TTL_S = 24 * 3600.0
# the longest-lived invite token: 10 years (a token is a key; it should not outlive its mesh)
MAX_TOKEN_TTL_S = 10 * 365 * 24 * 3600.0
# calls whose first argument goes into the log line
LOGGED_ARGS = {"drop", "download", "revoke_token", "serve_model"}


class ControlSocketError(Exception):
    """The control socket cannot be set up (another daemon owns it, a file is in the way)."""


class ControlTarget(Protocol):
    """What the control API calls on the node.  Any method may raise ``Refused``;
    one the node lacks answers 501.  Methods may return a value or a Deferred."""

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def model_table(self, catalog: bool) -> dict[str, Any]: ...

    def gpus(self) -> dict[str, Any]: ...

    def leave(self) -> defer.Deferred: ...

    def reload(self) -> defer.Deferred | dict[str, Any]: ...

    def drop(self, model: str) -> Any: ...

    def serve_model(self, model: str) -> Any: ...

    def make_token(self, ttl_s: float, once: bool) -> dict[str, Any]: ...

    def revoke_token(self, token_id: str) -> Any: ...

    def join(self, token: str) -> defer.Deferred: ...

    def download(self, name: str) -> defer.Deferred[dict[str, Any]]: ...

    def explain(self, model: str, client_id: str) -> dict[str, Any]: ...


# -- argument parsing, one function per endpoint ---------------------------------
# Each returns (method name on the target, positional args, keyword args).

Call = tuple[str, tuple, dict]


def _flag(args: dict[bytes, list[bytes]], name: str) -> bool:
    value = (args.get(name.encode()) or [b""])[-1].decode().lower()
    return value in ("1", "true", "yes", "on")


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{key!r}: expected a non-empty string")
    return value.strip()


def _query(args: dict[bytes, list[bytes]], name: str, *, required: bool = True) -> str:
    value = (args.get(name.encode()) or [b""])[-1].decode("utf-8", "replace").strip()
    if required and not value:
        raise BadRequest(f"{name!r}: expected a non-empty query parameter ?{name}=...")
    return value


def _explain_args(q: dict[bytes, list[bytes]]) -> Call:
    return "explain", (_query(q, "model"),), {"client_id": _query(q, "client", required=False)}


def _token_args(body: dict[str, Any]) -> Call:
    ttl = body.get("ttl_s", DEFAULT_TOKEN_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TOKEN_TTL_S:
        raise BadRequest(f"'ttl_s': expected a number of seconds above 0 and at most "
                         f"{MAX_TOKEN_TTL_S:.0f} (10 years)")
    once = body.get("once", False)
    if not isinstance(once, bool):
        raise BadRequest("'once': expected true or false")
    return "make_token", (), {"ttl_s": float(ttl), "once": once}


ROUTES: dict[tuple[bytes, str], Callable[[dict, dict], Call]] = {
    (b"GET", "status"): lambda q, b: ("status", (), {}),
    (b"GET", "peers"): lambda q, b: ("peers", (), {}),
    (b"GET", "gpus"): lambda q, b: ("gpus", (), {}),
    (b"GET", "models"): lambda q, b: ("model_table", (), {"catalog": _flag(q, "catalog")}),
    (b"GET", "explain"): lambda q, b: _explain_args(q),
    (b"POST", "leave"): lambda q, b: ("leave", (), {}),
    (b"POST", "reload"): lambda q, b: ("reload", (), {}),
    (b"POST", "drop"): lambda q, b: ("drop", (_string(b, "model"),), {}),
    (b"POST", "serve"): lambda q, b: ("serve_model", (_string(b, "model"),), {}),
    (b"POST", "token"): lambda q, b: _token_args(b),
    (b"POST", "token/revoke"): lambda q, b: ("revoke_token", (_string(b, "id"),), {}),
    (b"POST", "join"): lambda q, b: ("join", (_string(b, "token"),), {}),
    (b"POST", "download"): lambda q, b: ("download", (_string(b, "name"),), {}),
}


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(value: Any) -> bytes:
    if value is None:
        value = {"ok": True}
    return json.dumps(value, default=_json_default, indent=1).encode() + b"\n"


class ControlResource(Resource):
    """Every control endpoint, dispatched from one table (``ROUTES``)."""

    isLeaf = True

    def __init__(self, target: ControlTarget):
        super().__init__()
        self.target = target

    def render(self, request: server.Request):
        request.setHeader(b"content-type", b"application/json")
        path = request.path.decode("utf-8", "replace").strip("/")
        method = request.method
        route = ROUTES.get((method, path))
        if route is None:
            if any(p == path for (_, p) in ROUTES):
                return self._error(request, 405, f"{method.decode()} not allowed on /{path}")
            return self._error(request, 404, f"no such control endpoint: /{path}")
        try:
            body = self._body(request) if method == b"POST" else {}
            name, args, kwargs = route(request.args or {}, body)
        except BadRequest as e:
            return self._error(request, 400, str(e))
        func = getattr(self.target, name, None)
        if func is None:
            return self._error(request, 501, f"this meshd does not support {name}")
        if method == b"POST":
            # the argument names what is acted on, except a token, which is a secret
            what = f" ({args[0]})" if args and name in LOGGED_ARGS else ""
            log.info("control: %s requested%s", name, what)
        d = defer.maybeDeferred(func, *args, **kwargs)
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))
        d.addCallback(self._answer, request, gone)
        d.addErrback(self._failed, request, gone, name)
        return server.NOT_DONE_YET

    def _body(self, request: server.Request) -> dict[str, Any]:
        raw = request.content.read(MAX_BODY_BYTES + 1) if request.content else b""
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest("request body too large")
        if not raw.strip():
            return {}
        try:
            body = jsonbounds.loads(raw, max_bytes=MAX_BODY_BYTES)
        except jsonbounds.JsonRefused as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _answer(self, result: Any, request: server.Request, gone: list[bool]) -> None:
        if gone:
            return
        try:
            payload = encode(result)
        except (TypeError, ValueError) as e:
            log.error("control: cannot encode the answer as JSON: %s", e)
            request.setResponseCode(500)
            payload = encode({"error": "meshd produced an answer it cannot encode"})
        request.write(payload)
        request.finish()

    def _failed(
        self, failure: Failure, request: server.Request, gone: list[bool], name: str
    ) -> None:
        if failure.check(Refused):
            code, reason = 409, failure.value.reason
            log.info("control: %s refused: %s", name, reason)
        elif failure.check(BadRequest):
            code, reason = 400, str(failure.value)
        elif failure.check(NotImplementedError):
            code, reason = 501, f"this meshd does not support {name}"
        else:
            code, reason = 500, f"{name} failed: {failure.getErrorMessage()}"
            log.error(
                "control: %s failed", name, exc_info=(failure.type, failure.value, failure.tb)
            )
        if gone:
            return
        request.setResponseCode(code)
        request.write(encode({"error": reason}))
        request.finish()

    @staticmethod
    def _error(request: server.Request, code: int, reason: str) -> bytes:
        request.setResponseCode(code)
        return encode({"error": reason})


def _error_body(status: int, message: str, code: str) -> bytes:
    return encode({"error": message})


class ControlSite(BoundedSite):
    """The control API's Site: a body over ``MAX_BODY_BYTES`` is refused (413) before it
    is read, never spooled to a temporary file; no per-request access log."""

    def __init__(self, root: Resource, *, reactor: Any = None):
        super().__init__(root, max_body_bytes=MAX_BODY_BYTES, error_body=_error_body,
                         what="control socket", reactor=reactor)


def make_site(target: ControlTarget, *, reactor: Any = None) -> server.Site:
    return ControlSite(ControlResource(target), reactor=reactor)


# -- the socket ------------------------------------------------------------------


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a daemon that died; refuse when a live one answers."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlSocketError(
                f"cannot check the existing socket {path}: {e.strerror}"
            ) from None
    else:
        raise ControlSocketError(f"another meshd is already listening on {path}")
    finally:
        probe.close()
    log.info("removing stale control socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _set_group(path: str) -> None:
    """Give the socket to the ``meshd`` group, so its members can run meshctl."""
    try:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return
    if os.stat(path).st_gid == gid:
        return
    try:
        os.chown(path, -1, gid)
    except OSError as e:
        log.warning("cannot give %s to group %s: %s", path, SOCKET_GROUP, e.strerror)


def listen_control(path: str, target: ControlTarget, *, reactor) -> defer.Deferred:
    """Serve the control API on the UNIX socket ``path``; fires with the IListeningPort.

    Stopping the port removes the socket file (Twisted's UNIX port unlinks it).
    Fails with ControlSocketError when another live daemon answers on ``path``.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(path)
    except ControlSocketError as e:
        return defer.fail(e)
    except OSError as e:
        return defer.fail(ControlSocketError(f"cannot prepare {path}: {e.strerror or e}"))
    # Twisted binds, then chmods to ``mode``: until the chmod the umask applies,
    # which under systemd (0022) leaves the socket writable by its owner only.
    # a deep accept queue: a UNIX connect to a full one fails at once (EAGAIN)
    endpoint = UNIXServerEndpoint(reactor, path, backlog=LISTEN_BACKLOG, mode=SOCKET_MODE,
                                  wantPID=False)
    d = endpoint.listen(make_site(target, reactor=reactor))

    def listening(port: IListeningPort) -> IListeningPort:
        _set_group(path)
        return port

    return d.addCallback(listening)


class ControlService(Service):
    """The control socket while the daemon runs; stopping it removes the socket file.

    A socket that cannot be set up fails the start with ``StartupError`` naming
    ``[node] control_socket`` and why, in one line."""

    name = "control"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, path: str, target: ControlTarget, *, reactor: Any):
        self.path = path
        self.target = target
        self.reactor = reactor
        self.port: Any = None  # the IListeningPort

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        super().startService()
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        from meshd.daemon.tree import first_line
        from meshd.errors import StartupError

        try:
            self.port = await listen_control(self.path, self.target, reactor=self.reactor)
        except Exception as e:
            raise StartupError(f"[node] control_socket: {first_line(e)}") from None
        log.info("control socket on %s", self.path)

    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
