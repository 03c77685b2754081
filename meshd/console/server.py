"""The web console (``[console] listen``, default 127.0.0.1:3131).

``GET /`` is one static page (``meshd/console/index.html``: plain HTML, CSS
and JavaScript, no build step, nothing fetched from elsewhere).  It reads:

- ``GET /api/status``: :meth:`meshd.daemon.node.Node.status` -- the same document as
  ``meshctl status --json`` -- plus one key of its own, ``console``: whether
  chat works here (``chat``, ``chat_reason``, ``api_key_required``) and, per
  node id, what its model holds of its VRAM (``vram_used``: ``bytes`` and
  ``source``, "nvml" when NVML measured our llama-server, "model size" when the
  file size of the served model stands in for it, as it does for every peer).
- ``GET /api/events``: Server-Sent Events.  An ``event: status`` with that
  document on connect and after every change (the node's status listeners,
  membership events, download progress, and a re-check every ``REFRESH_S`` for
  what has no event, like RTT), bursts coalesced to one event per
  ``MIN_INTERVAL_S``; an event whose content equals the last one sent (ignoring
  ``uptime_s``) is not sent.  A ``: keep-alive`` comment every
  ``KEEPALIVE_S``.  At most ``MAX_CLIENTS`` streams (503 beyond); a client that
  goes away is dropped at once.
- ``GET /api/explain?model=M``: why a model is where it is (the "why?" of a
  model row): :meth:`meshd.daemon.node.Node.explain`, as ``meshctl explain M --json``.
- ``POST /v1/chat/completions`` and ``GET /v1/models``: the chat box.  These
  are forwarded to this node's own API (``[api] listen``) so the page never
  needs CORS and the API never answers CORS for anyone.  Streams pass through
  as they arrive, with backpressure (the API's connection is the producer of
  the browser's).

The API key is never a way around: the console adds no credentials of its own.
It forwards the browser's ``Authorization`` header and nothing else of the
kind, so with ``[api] api_key`` set the page asks for the key and the API checks
it as for any client; the console checks it too, from the request's head, so a
body without the key is never read.  Every check that needs only the head (Host,
key, Origin, Content-Type, chat on) is made before the body is accepted, and a
body over ``MAX_CHAT_BODY_BYTES`` is refused with 413 as it arrives
(``meshd.httpbounds``): nothing is spooled to a temporary file.  When the console listens on a non-loopback address and
the API has no key, chat is switched off (403): the proxy would otherwise open
a localhost-only, keyless API to the network.  Against other web pages in the
same browser: a POST must be ``Content-Type: application/json`` and, when the
browser sends ``Origin``, come from the console's own origin; on a loopback
listen address the ``Host`` header must name a loopback host (no DNS
rebinding).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import pages, resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from meshd import config as configmod
from meshd import jsonbounds
from meshd.config import Config
from meshd.httpbounds import BoundedSite, Refusal, api_key_matches
from meshd.states import ModelState

log = logging.getLogger("meshd.console.server")

# at most one status event per this long; a burst of changes becomes one event
MIN_INTERVAL_S = 0.25
# a comment line on every event stream this often, so proxies and browsers keep it open
KEEPALIVE_S = 15.0
# re-read the status this often while someone watches (RTT and VRAM have no events)
REFRESH_S = 5.0
# event streams open at once; more are answered 503
MAX_CLIENTS = 32
# NVML is asked what our llama-server holds at most this often
VRAM_CACHE_S = 5.0
# the chat proxy: connecting to the local API, and the biggest request body taken (a
# bigger one is refused with 413 before it is read: meshd.httpbounds)
CONNECT_TIMEOUT_S = 10.0
MAX_CHAT_BODY_BYTES = 1024 * 1024
CHAT_PATH = b"/v1/chat/completions"


# -- the status the page shows ------------------------------------------------------


class VramUse:
    """What each node's model holds of its VRAM: measured here, estimated for peers."""

    def __init__(self, node, *, clock: IReactorTime, measure: Callable[[list[int]], int] | None = None):
        self.node = node
        self.clock = clock
        if measure is None:
            from meshd.models.gpu import process_used_bytes

            measure = process_used_bytes
        self._measure: Callable[[list[int]], int] = measure
        self._cache: tuple[tuple[int, ...], float, int] | None = None

    def _measured(self, pids: list[int]) -> int:
        key = tuple(sorted(pids))
        now = self.clock.seconds()
        if self._cache and self._cache[0] == key and now - self._cache[1] < VRAM_CACHE_S:
            return self._cache[2]
        try:
            used = int(self._measure(list(key))) if key else 0
        except Exception as e:  # NVML trouble must not break the console
            log.debug("NVML: %s", e)
            used = 0
        self._cache = (key, now, used)
        return used

    def table(self) -> dict[str, dict[str, Any]]:
        node = self.node
        loaded = [m for m in node.served.values() if m.state not in (ModelState.COLD, ModelState.FAILED)]
        pids = [m.backend.pid for m in loaded if getattr(m.backend, "pid", None)]
        measured = self._measured(pids)
        out = {}
        share = self._split_shares()
        if measured > 0:
            out[node.node_id] = {"bytes": measured, "source": "nvml"}
        else:
            out[node.node_id] = {
                "bytes": int(sum((m.size_bytes or 0) * share(m.name, node.node_id)
                                 for m in loaded)),
                "source": "model size" if loaded else "none",
            }
        mesh = node.mesh
        for p in mesh.peers() if mesh is not None else ():
            sizes = {m.name: m.size_bytes for m in p.available_models}
            used = int(sum((sizes.get(name) or 0) * share(name, p.node_id) for name in p.serving))
            out[p.node_id] = {"bytes": used, "source": "model size" if p.serving else "none"}
        return out

    def _split_shares(self) -> Callable[[str, str], float]:
        """``share(model, node_id)``: the part of ``model`` a node holds, 1.0 unless this
        node's plan splits it (then each node of the split holds its share of the layers)."""
        rebalancer = self.node.rebalancer
        decision = rebalancer.decision if rebalancer is not None else None
        shares = dict(decision.shares) if decision is not None and decision.shares else {}
        model = decision.model if decision is not None else None

        def share(name: str, node_id: str) -> float:
            return shares.get(node_id, 1.0) if name == model else 1.0

        return share


def chat_policy(config: Config) -> tuple[bool, str | None]:
    """Whether the chat proxy works, and why not."""
    host, _ = configmod.parse_address(config.console.listen)
    if not configmod.is_loopback(host) and not config.api.api_key:
        return False, (
            "chat is off: the console listens on a non-loopback address and [api] api_key "
            "is not set"
        )
    return True, None


def _content_key(doc: dict[str, Any]) -> str:
    """What a status says, for telling whether it changed (uptime always does)."""
    return json.dumps({k: v for k, v in doc.items() if k != "uptime_s"}, sort_keys=True)


def status_json(doc: Any) -> str:
    """A status as JSON for the page: node names, model names and reasons come from peers,
    so ``<``, ``>`` and ``&`` are written as JSON escapes -- the same data, never markup,
    whatever reads it (the page itself puts every string on the page as text)."""
    text = json.dumps(doc)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sse(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


class StatusFeed:
    """The status document, and the event streams that follow it."""

    def __init__(self, node, config: Config, *, clock: IReactorTime,
                 vram: VramUse | None = None, max_clients: int = MAX_CLIENTS):
        self.node = node
        self.config = config
        self.clock = clock
        self.vram = vram if vram is not None else VramUse(node, clock=clock)
        self.max_clients = max_clients
        self.chat, self.chat_reason = chat_policy(config)
        self.clients: list[server.Request] = []
        self._pending: IDelayedCall | None = None  # the next coalesced push
        self._last_push: float | None = None  # when the last push was made
        self._last_key: str | None = None  # what it said, without uptime
        self._keepalive = LoopingCall(self._send_keepalive)
        self._keepalive.clock = clock
        self._refresh = LoopingCall(self.changed)
        self._refresh.clock = clock
        self._stopped = False

    # -- what is shown

    def status(self) -> dict[str, Any]:
        doc = self.node.status()
        doc["console"] = {
            "chat": self.chat,
            "chat_reason": self.chat_reason,
            "api_key_required": bool(self.config.api.api_key),
            "vram_used": self.vram.table(),
        }
        return doc

    # -- change points

    def watch(self) -> None:
        """Listen to every place the node's status changes from."""
        node = self.node
        node.add_status_listener(self.changed)
        # whichever mesh the node is in, now or after a promotion
        node.add_membership_listener(lambda _event: self.changed())
        if node.downloader is not None:
            node.downloader.downloads.listeners.append(lambda _name: self.changed())

    def changed(self) -> None:
        """Something may read differently: push a status soon (coalesced)."""
        if self._stopped or not self.clients or self._pending is not None:
            return
        now = self.clock.seconds()
        delay = 0.0
        if self._last_push is not None:
            delay = max(0.0, self._last_push + MIN_INTERVAL_S - now)
        self._pending = self.clock.callLater(delay, self._push)

    def _push(self) -> None:
        self._pending = None
        if not self.clients:
            return
        doc = self.status()
        self._last_push = self.clock.seconds()
        key = _content_key(doc)
        if key == self._last_key:
            return
        self._last_key = key
        frame = _sse("status", status_json(doc))
        for request in list(self.clients):
            request.write(frame)

    def _send_keepalive(self) -> None:
        for request in list(self.clients):
            request.write(b": keep-alive\n\n")

    # -- event stream clients

    def add_client(self, request: server.Request) -> bool:
        """Start an event stream on ``request``; False when there are too many."""
        if self._stopped or len(self.clients) >= self.max_clients:
            return False
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        doc = self.status()
        if not self.clients:
            self._last_key = _content_key(doc)
        elif _content_key(doc) != self._last_key:
            self.changed()  # the others have not seen this yet
        self.clients.append(request)
        request.notifyFinish().addBoth(lambda _: self._remove(request))
        request.write(b"retry: 3000\n" + _sse("status", status_json(doc)))
        if not self._keepalive.running:
            self._keepalive.start(KEEPALIVE_S, now=False)
            self._refresh.start(REFRESH_S, now=False)
        log.debug("console: event stream opened (%d open)", len(self.clients))
        return True

    def _remove(self, request: server.Request) -> None:
        if request in self.clients:
            self.clients.remove(request)
            log.debug("console: event stream closed (%d open)", len(self.clients))
        if not self.clients:
            self._idle()

    def _idle(self) -> None:
        for loop in (self._keepalive, self._refresh):
            if loop.running:
                loop.stop()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._last_key = None

    def stop(self) -> None:
        """End every stream (the daemon is stopping)."""
        self._stopped = True
        for request in list(self.clients):
            self.clients.remove(request)
            request.finish()
        self._idle()


# -- HTTP -----------------------------------------------------------------------------


def _json_response(request: server.Request, status: int, doc: Any) -> bytes:
    body = status_json(doc).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _error_body(status: int, message: str, code: str) -> bytes:
    return json.dumps({
        "error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()


def _error(request: server.Request, status: int, message: str, code: str) -> bytes:
    body = _error_body(status, message, code)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _refuse(request: server.Request, refusal: Refusal) -> bytes:
    for name, value in refusal.headers:
        request.setHeader(name, value)
    return _error(request, refusal.status, refusal.message, refusal.code)


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, html: bytes):
        super().__init__()
        self.html = html

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy",
                          b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
                          b"script-src 'self' 'unsafe-inline'; img-src 'self' data:")
        request.setHeader(b"X-Frame-Options", b"DENY")
        return self.html


class _Status(resource.Resource):
    isLeaf = True

    def __init__(self, feed: StatusFeed):
        super().__init__()
        self.feed = feed

    def render_GET(self, request: server.Request) -> bytes:
        return _json_response(request, 200, self.feed.status())


class _Events(resource.Resource):
    isLeaf = True

    def __init__(self, feed: StatusFeed):
        super().__init__()
        self.feed = feed

    def render_GET(self, request: server.Request) -> bytes | int:
        if not self.feed.add_client(request):
            request.setHeader(b"Retry-After", b"10")
            return _error(request, 503, "too many console event streams", "too_many_clients")
        return server.NOT_DONE_YET


class _Explain(resource.Resource):
    """``GET /api/explain?model=M``: :meth:`meshd.daemon.node.Node.explain`, the same
    document as ``meshctl explain M --json``; an unknown model is 404 with the reason."""

    isLeaf = True

    def __init__(self, node: Any):
        super().__init__()
        self.node = node

    def render_GET(self, request: server.Request) -> bytes:
        from meshd.errors import Refused

        args: dict[bytes, list[bytes]] = request.args or {}
        model = (args.get(b"model") or [b""])[-1].decode("utf-8", "replace").strip()
        client = (args.get(b"client") or [b""])[-1].decode("utf-8", "replace").strip()
        if not model:
            return _error(request, 400, "name a model: /api/explain?model=NAME", "missing_model")
        try:
            return _json_response(request, 200, self.node.explain(model, client))
        except Refused as e:
            return _error(request, 404, e.reason, "model_not_found")


class _Relay(Protocol):
    """The API's response body into the browser's request, paused when the browser is."""

    def __init__(self, request: server.Request):
        self.request = request
        self.done = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.request.unregisterProducer()
        if reason is not None and not reason.check(ResponseDone):
            log.info("console chat: the API's answer broke off: %s", reason.getErrorMessage())
            # an SSE stream says so in-band; the connection then closes
            self.request.write(_sse("error", json.dumps(
                {"error": {"message": "the answer broke off", "type": "server_error",
                           "code": "upstream_failed"}})))
        self.request.finish()

    def client_gone(self) -> None:
        if not self.done:
            self.done = True
            # deliverBody's transport is a producer (TransportProxyProducer), not the
            # ITransport that Protocol declares
            producer = cast("IPushProducer | None", self.transport)
            if producer is not None:
                producer.stopProducing()


class _ChatProxy(resource.Resource):
    """``/v1/chat/completions`` and ``/v1/models``, forwarded to this node's API."""

    isLeaf = True
    PATHS = {b"chat/completions": b"POST", b"models": b"GET"}

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def render(self, request: server.Request) -> bytes | int:
        # Site.getResourceFor sets postpath before any resource renders
        path = b"/".join(request.postpath or ())
        refusal = self.console.chat_refusal(request, request.method, path)
        if refusal is not None:
            return _refuse(request, refusal)
        method = self.PATHS[path]
        body = b""
        if method == b"POST":
            content = request.content  # None only until the body's length is known
            body = content.read(MAX_CHAT_BODY_BYTES + 1) if content is not None else b""
            if len(body) > MAX_CHAT_BODY_BYTES:
                return _error(request, 413, "request body too large", "body_too_large")
            # answered here, as the API would (its message and code): forwarding a
            # body that cannot be a request cost a connection and a second request
            try:
                jsonbounds.loads(body)
            except ValueError as e:
                return _error(request, 400, f"request body is not valid JSON: {e}",
                              "invalid_json")
        return self.console.forward(request, method, b"/v1/" + path, body)


class _Root(resource.Resource):
    def __init__(self, console: Console, html: bytes):
        super().__init__()
        self.console = console
        self.page = _Page(html)
        api = resource.Resource()
        api.putChild(b"status", _Status(console.feed))
        api.putChild(b"events", _Events(console.feed))
        api.putChild(b"explain", _Explain(console.node))
        self.putChild(b"api", api)
        self.putChild(b"v1", _ChatProxy(console))

    def getChild(self, path: bytes, request: server.Request):
        return self.page if path == b"" else pages.notFound()

    def getChildWithDefault(self, path: bytes, request: server.Request):
        if not self.console.host_allowed(request):
            return _Refused()
        return super().getChildWithDefault(path, request)


_BAD_HOST = Refusal(421, "this console answers only to its own host name", "bad_host")


class _Refused(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return _refuse(request, _BAD_HOST)


class _Site(BoundedSite):
    """The console's Site: a chat body is checked for credentials and the page's rules
    before it is read, and refused (413) past ``MAX_CHAT_BODY_BYTES``; no access log."""

    def __init__(self, console: Console, root: resource.Resource, *, reactor: Any):
        super().__init__(root, max_body_bytes=MAX_CHAT_BODY_BYTES, error_body=_error_body,
                         what="console", before_body=console.refusal_before_body,
                         reactor=reactor)


def _host_of(value: bytes) -> str:
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def load_page() -> bytes:
    return resources.files("meshd.console").joinpath("index.html").read_bytes()


class Console(service.Service):
    """The console's site, a service of the daemon's tree: started, it listens on
    ``[console] listen`` (:meth:`listen`); stopped, it ends every stream (:meth:`stop`)."""

    name = "console"  # type: ignore[assignment]  # Twisted declares it None

    def __init__(self, node, config: Config, *, reactor, feed: StatusFeed | None = None,
                 agent: IAgent | None = None):
        self.node = node
        self.config = config
        self.reactor = reactor
        self.feed = feed if feed is not None else StatusFeed(node, config, clock=reactor)
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent: IAgent = agent if agent is not None else Agent(
            reactor, connectTimeout=CONNECT_TIMEOUT_S, pool=self._pool)
        self.root = _Root(self, load_page())
        self.site = _Site(self, self.root, reactor=reactor)
        self.port: IListeningPort | None = None
        host, _ = configmod.parse_address(config.console.listen)
        self._loopback = configmod.is_loopback(host)
        self._api_key = config.api.api_key.encode()

    # -- who may ask

    def host_allowed(self, request: server.Request) -> bool:
        """On a loopback listen address the Host header must be loopback too."""
        if not self._loopback:
            return True
        host = request.getHeader(b"host")
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser on another site
        return configmod.is_loopback(_host_of(host))

    def chat_refusal(self, request: server.Request, method: bytes,
                     path: bytes) -> Refusal | None:
        """Why the chat proxy will not forward ``method`` on ``/v1/<path>``, or None;
        needs only the request's head, so it is asked before the body is read too."""
        wanted = _ChatProxy.PATHS.get(path)
        if wanted is None:
            return Refusal(404, "the console forwards only /v1/chat/completions and /v1/models",
                           "not_found")
        if method != wanted:
            return Refusal(405, f"use {wanted.decode()}", "method_not_allowed",
                           ((b"Allow", wanted),))
        feed = self.feed
        if not feed.chat:
            return Refusal(403, feed.chat_reason or "chat is off", "console_chat_off")
        if self._api_key and not api_key_matches(request, self._api_key):
            # the API would refuse it too; said here, the body is never read
            return Refusal(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           "invalid_api_key", ((b"WWW-Authenticate", b"Bearer"),))
        if method == b"POST":
            ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return Refusal(415, "send Content-Type: application/json",
                               "unsupported_media_type")
            if not self.same_origin(request):
                return Refusal(403, "cross-origin request refused", "cross_origin")
        return None

    def refusal_before_body(self, request: server.Request, method: bytes,
                            path: bytes) -> Refusal | None:
        """What refuses a request with a body before a byte of it is read: a foreign
        Host, and on the chat path everything :meth:`chat_refusal` checks."""
        if not self.host_allowed(request):
            return _BAD_HOST
        if path == CHAT_PATH:
            return self.chat_refusal(request, method, b"chat/completions")
        return None

    def same_origin(self, request: server.Request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        host = request.getHeader(b"host") or b""
        return urlsplit(origin.decode("latin-1")).netloc.lower() == host.decode("latin-1").lower()

    def use_api_key(self, key: str) -> None:
        """``[api] api_key`` changed by a reload (``meshd.daemon.reload``): the chat proxy
        asks for the new key from now on, and whether chat is on follows it."""
        self.config = self.config.replace("api", api_key=key)
        self._api_key = key.encode()
        feed = self.feed
        feed.config = self.config
        feed.chat, feed.chat_reason = chat_policy(self.config)
        feed.changed()

    # -- the chat proxy

    def api_url(self, path: bytes) -> bytes:
        host, port = configmod.parse_address(self.config.api.listen)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}".encode() + path

    def forward(self, request: server.Request, method: bytes, path: bytes, body: bytes) -> int:
        headers = Headers({b"Accept": [request.getHeader(b"accept") or b"*/*"]})
        auth = request.getHeader(b"authorization")
        if auth is not None:
            headers.setRawHeaders(b"Authorization", [auth])
        producer: IBodyProducer | None = None
        if method == b"POST":
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = FileBodyProducer(BytesIO(body))
        d = self.agent.request(method, self.api_url(path), headers, producer)
        state: dict[str, Any] = {"relay": None, "gone": False}

        def gone(_: Failure) -> None:
            state["gone"] = True
            if state["relay"] is not None:
                state["relay"].client_gone()
            elif not d.called:
                d.cancel()

        request.notifyFinish().addErrback(gone)

        def answered(response: IResponse) -> None:
            if state["gone"]:
                response.deliverBody(_Discard())
                return
            request.setResponseCode(response.code)
            for name in (b"content-type", b"retry-after", b"www-authenticate"):
                values = response.headers.getRawHeaders(name)
                if values:
                    request.setHeader(name, values[0])
            request.setHeader(b"Cache-Control", b"no-cache")
            relay = _Relay(request)
            state["relay"] = relay
            response.deliverBody(relay)

        def failed(failure: Failure) -> None:
            if state["gone"]:
                return
            log.info("console chat: the API at %s did not answer: %s",
                     self.config.api.listen, failure.getErrorMessage())
            request.write(_error(request, 502, "this node's API did not answer: "
                                 + failure.getErrorMessage(), "api_unreachable"))
            request.finish()

        d.addCallbacks(answered, failed)
        return server.NOT_DONE_YET

    # -- running

    def startService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        from meshd.daemon.tree import first_line
        from meshd.errors import StartupError

        try:
            await self.listen()
        except Exception as e:
            raise StartupError(
                f"[console] listen {self.config.console.listen}: {first_line(e)}") from None
        log.info("console on http://%s", self.config.console.listen)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        return defer.ensureDeferred(self.stop())

    async def listen(self) -> IListeningPort:
        ep = endpoints.serverFromString(
            self.reactor, configmod.tcp_endpoint(self.config.console.listen))
        self.feed.watch()
        self.port = await ep.listen(self.site)
        return self.port

    async def stop(self) -> None:
        self.feed.stop()
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
            self.port = None
        await self._pool.closeCachedConnections()


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass
