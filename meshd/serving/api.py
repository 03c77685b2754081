"""The client HTTP API (OpenAI, Anthropic, llama.cpp): routes each request by its model.

What a reader needs to know:

- The paths it forwards, and where each names its model, are one table,
  :data:`meshd.serving.routes.ROUTES`.  The body is read whole (bounded by
  ``[api] max_body_bytes``: 413 as soon as Content-Length or the bytes read so far
  pass it, never buffered first), its model found, and the
  :class:`~meshd.serving.routing.Router` names the upstreams.
- Errors meshd makes take the shape of the path's API (``routes.Shape``): OpenAI's
  on OpenAI and llama.cpp paths, Anthropic's on ``/v1/messages``; an upstream's
  error on an Anthropic path is put in Anthropic's shape too.
- Every forwarded answer says who made it: ``X-Meshd-Node`` (the node whose
  llama-server answered: after a failover, the one that finally did) and
  ``X-Meshd-Model``.  The requesting node sets them from the upstream it chose, so a
  tunnelled answer needs nothing from the far end.
- ``[api] api_key``: ``Authorization: Bearer KEY`` (OpenAI SDKs) or ``x-api-key:
  KEY`` (Anthropic's SDK).
- The client id handed to the router (host selection is sticky per client) is
  the body's OpenAI ``user`` field when it is a string, else the client's IP
  address.  The API key is not used: every client shares the same one.
- Failover: the request goes to the first upstream; if connecting fails or the
  upstream closes before sending any response byte, the router hears
  ``upstream_failed`` and the same body goes once to the next upstream.  Once
  an upstream has sent a byte the request is never sent again.  When every try
  failed before a byte: 503 + Retry-After if no upstream could be reached
  (nothing is serving right now), 502 if one accepted the request and then
  failed (a backend fault).
- Deadlines (``[api] first_byte_timeout_s``, ``stream_idle_timeout_s``): an
  upstream that accepted the request and sends no byte within the first is
  treated like one that closed before responding (failover, else 504
  ``upstream_timeout``); a response that began and then stays silent for the
  second ends as a broken one does (an SSE ``error`` event, or a 504 when our
  client has no head yet).  Last resorts: llama-server sends nothing before the
  first token, so a request queued for a busy slot looks like a hang; a hung
  llama-server is found by its /health (``meshd.backends.supervisor``), and its
  restart cuts these connections long before.  Silence while our client is not
  reading (the upstream paused by backpressure) is not the upstream's.
- A client that does not read for ``[api] client_stall_timeout_s`` while the
  upstream is paused for it has both connections closed: llama-server stops
  generating when its client goes away, so a never-reading client does not hold
  a slot to ``max_tokens``.  Its head and body have deadlines too
  (``head_timeout_s``, ``body_timeout_s``: ``meshd.httpbounds``).
- Responses: ``text/event-stream`` is passed through as it arrives, with the
  upstream connection registered as the producer of our client's connection (a
  client that stops reading pauses the upstream socket; one that goes away
  closes it).  Any other response is held until it ends (up to
  ``HOLD_BYTES``) so a backend that dies mid-way becomes a clean 502; longer
  ones are passed through after that.  A stream that breaks after its first
  byte ends with an SSE ``error`` event and the connection closes.
- A chunked body passed through goes to a client that reads chunked framing
  (HTTP/1.1) in the upstream's own framing, only its size lines parsed
  (:func:`write_framed`): through a tunnel neither node decodes and re-frames
  a chunk.  An HTTP/1.0 client gets it decoded.
- ``GET /metrics``: the daemon's Prometheus registry (``meshd.metrics``).  Each
  request is counted when it ends, by model (one the router knew, else ``""``),
  status and route (``local``, ``tunnel``, ``failover``, ``none``), with its time
  to first byte, duration, bytes and SSE events; a relay counts as ``hop="relayed"``.
- Drain (SIGTERM): :meth:`ApiServer.drain` refuses new requests with 503 and
  fires once every in-flight request ended or the timeout passed.
- A ``relay`` server is the far end of tunnels (``meshd.serving.tunnel``): where the
  API would answer 503 or 502 before any upstream byte (draining, the model not
  served here, its llama-server down), it hangs up instead, so the requesting
  node's API sees "closed before any response" and fails over or retries on a
  fresh tunnel, as it would for a dead host, rather than relaying an error.
  The requesting node names the model in an ``X-Meshd-Model`` request header,
  which a relay reads first: the body of a llama.cpp path may name none.

``python -m meshd.cli.static_api --static MODEL=HOST:PORT --listen HOST:PORT`` runs
the API alone in front of fixed upstreams (benchmarks, debugging).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface import implementer

from meshd import jsonbounds
from meshd import metrics as metricsmod
from meshd.config import ApiConfig
from meshd.httpbounds import (
    BoundedChannel,
    BoundedRequest,
    BoundedSite,
    Refusal,
    api_key_matches,
)
from meshd.metrics import ApiMeter, ApiMetrics, Hop, RouteKind
from meshd.serving import routes
from meshd.serving.proxy import ConnectionPool, UpstreamConnection, request_head
from meshd.serving.routes import ModelFrom, Route, Shape
from meshd.serving.routing import NotReady, Router, UnknownModel, Upstream
from meshd.states import FORWARD_MOVES, ForwardState, check_move

log = logging.getLogger("meshd.serving.api")

# request headers passed on to the upstream (the rest are ours: auth, hop-by-hop)
FORWARDED_HEADERS = (b"content-type", b"accept")
# response headers naming who answered; the model one also tells a relay the model
NODE_HEADER = b"X-Meshd-Node"
MODEL_HEADER = b"X-Meshd-Model"
# non-streamed responses up to this size are held until complete (clean 502 on failure)
HOLD_BYTES = 4 * 1024 * 1024
# a drain with no request left looks this often whether the clients took the rest
FLUSH_CHECK_S = 0.05
KEY_REFUSED = "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)"
# attempts per request: the first upstream and one failover
MAX_ATTEMPTS = 2


# -- errors -------------------------------------------------------------------


def send_error(request: server.Request, shape: Shape, status: int, message: str, type_: str,
               code: str | None, headers: dict[bytes, bytes] | None = None) -> None:
    body = routes.error_body(shape, status, message, type_, code)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(body)
    request.finish()


def write_framed(request: server.Request, pieces: list[bytes], payload: int) -> None:
    """Write body bytes that are already in chunked framing, past ``Request.write``.

    The one place meshd writes around twisted.web's Request.  Why: an
    upstream's chunked body passed on as it came (``ChunkedDecoder.frame``)
    must not be framed a second time, and ``Request.write`` frames every call
    as one chunk of its own.  What keeps the Request's own bookkeeping right:

    - only after the head went out through ``Request.write`` and the Request
      chose chunked framing for this response (``request.chunked``: an
      HTTP/1.1 client, no Content-Length, not HEAD, a status with a body);
    - every call ends on a chunk boundary (``frame`` guarantees it), so a later
      ``Request.write`` (the SSE error event) and ``Request.finish`` (the last
      chunk, ``0\r\n\r\n``) still make a valid body;
    - nothing is written once the client went away (the Request drops its
      channel then) or after ``finish``, as ``Request.write`` would not;
    - ``sentLength`` counts the payload bytes, as ``Request.write`` does.

    No encoder (gzip) is ever set on the API's requests, so none is bypassed.
    """
    channel = request.channel
    if channel is None or request.finished:
        return
    request.sentLength += payload
    channel.writeSequence(pieces)  # sent at once where it can be (BoundedChannel)


def send_json(request: server.Request, status: int, doc: Any) -> None:
    body = json.dumps(doc).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


# -- metrics ------------------------------------------------------------------


def route_of(up: Upstream) -> RouteKind:
    """``local`` for this node's llama-server (or a static upstream), ``tunnel`` for a peer's."""
    return RouteKind.TUNNEL if up.pool_key.startswith("tunnel:") else RouteKind.LOCAL


# a stream's events go to the counter this many at a time (and the rest at its end):
# an increment per chunk would cost the proxy more than the count itself
EVENTS_BATCH = 32


# -- the HTTP server side ------------------------------------------------------


class ApiSite(BoundedSite):
    """The API's site: bodies bounded by ``[api] max_body_bytes`` before they are read
    (``meshd.httpbounds``), refusals in the shape of the path's API, counted."""

    def __init__(self, root: resource.Resource, api: ApiServer, reactor: IReactorTime):
        super().__init__(root, max_body_bytes=api.config.max_body_bytes,
                         error_body=self._openai_error, what="API", reactor=reactor,
                         head_timeout_s=api.config.head_timeout_s,
                         body_timeout_s=api.config.body_timeout_s,
                         before_body=self._key_before_body)
        self.api = api

    def _key_before_body(self, request: server.Request, method: bytes,
                         path: bytes) -> Refusal | None:
        """A missing or wrong API key is refused before the body is read: a stranger
        must not make the API hold ``max_body_bytes`` for it (``handle`` checks again
        for requests without a body)."""
        key = self.api.api_key
        if not key or path == b"/health" or api_key_matches(request, key):
            return None
        return Refusal(401, KEY_REFUSED, "invalid_api_key", ((b"WWW-Authenticate", b"Bearer"),))

    @staticmethod
    def _openai_error(status: int, message: str, code: str) -> bytes:
        return routes.error_body(Shape.OPENAI, status, message, "invalid_request_error", code)

    def too_large(self, what: str) -> Refusal:
        return Refusal(413, f"request body too large ({what} exceeds [api] max_body_bytes = "
                            f"{self.max_body_bytes})", "request_too_large")

    def refusal_body(self, path: bytes, refusal: Refusal) -> bytes:
        route = routes.route_of(path)
        shape = route.shape if route is not None else Shape.OPENAI
        return routes.error_body(shape, refusal.status, refusal.message,
                                 "invalid_request_error", refusal.code)

    def deadline_name(self, key: str) -> str:
        return f"[api] {key}"

    def cut(self, channel: http.HTTPChannel, part: str, delay: float) -> None:
        self.api.metrics.request_done("", 408, 0)
        super().cut(channel, part, delay)

    def refused(self, request: server.Request, refusal: Refusal) -> None:
        self.api.metrics.request_done("", refusal.status, 0)
        # a wrong key is the client's business (and a stranger's flood): not a warning
        say = log.info if refusal.status == 401 else log.warning
        say("refused a request from %s: %s", _peer_host(request), refusal.message)


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, api: ApiServer):
        super().__init__()
        self.api = api

    def render(self, request: server.Request):
        return self.api.handle(request)


class ApiServer:
    """The API: ``site`` to listen with, ``in_flight`` and ``drain()`` for shutdown.

    ``relay``: the far end of tunnels (see the module docstring), whose
    channels ``meshd.serving.tunnel`` builds from ``site`` over each tunnel.
    """

    def __init__(self, router: Router, config: ApiConfig, *, reactor: IReactorTime | None = None,
                 pool: ConnectionPool | None = None, relay: bool = False,
                 metrics: ApiMetrics | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = cast(IReactorTime, default_reactor)
        self.router = router
        self.config = config
        self.reactor: IReactorTime = reactor
        self.pool = pool or ConnectionPool(self.reactor, config.connect_timeout_s)
        # the daemon's registry (meshd.metrics), or one of its own (a lone API, tests)
        hop = Hop.RELAYED if relay else Hop.SERVED
        if metrics is None:
            metrics = ApiMetrics(metricsmod.CollectorRegistry(auto_describe=False))
            metrics.registry.register(metricsmod.InFlight(lambda: [(hop, self)]))
        self.registry = metrics.registry
        self.metrics = ApiMeter(metrics, hop)
        self.forwards: set[Forward] = set()
        self.relay = relay
        self.draining = False
        self._drain_waiters: list[defer.Deferred[int]] = []
        self._flush_check: IDelayedCall | None = None
        self._flush_waited = False  # logged that the drain waits for slow clients
        self.api_key = config.api_key.encode()  # [api] api_key; a reload may change it
        self.site = ApiSite(_Root(self), self, reactor)

    @property
    def in_flight(self) -> int:
        return len(self.forwards)

    def use_api_key(self, key: str) -> None:
        """``[api] api_key`` changed by a reload (``meshd.daemon.reload``): every request
        from now on is checked against ``key``; one in flight was checked as it came in
        and runs on."""
        self.config = dataclasses.replace(self.config, api_key=key)
        self.api_key = key.encode()

    # -- shutdown --------------------------------------------------------------

    def drain(self, timeout_s: float) -> defer.Deferred[int]:
        """Refuse new requests; fire with the number still running once none is and every
        answer has left (a slow client's rest is in this process until its socket takes
        it), or at the timeout."""
        self.draining = True
        d: defer.Deferred[int] = defer.Deferred()
        self._drain_waiters.append(d)
        call = self.reactor.callLater(timeout_s, self._drain_timeout, d)
        d.addBoth(_cancel_call, call)
        if not self.forwards:
            self._drained()
        return d

    def _drain_timeout(self, d: defer.Deferred[int]) -> None:
        if d in self._drain_waiters:
            self._drain_waiters.remove(d)
            if self.forwards:
                log.warning("drain timeout: %d request(s) still running", len(self.forwards))
            else:
                log.warning("drain timeout: %d bytes of finished answers not yet taken by "
                            "their clients are cut off", self.site.unsent())
            d.callback(len(self.forwards))

    def forward_done(self, fwd: Forward) -> None:
        self.forwards.discard(fwd)
        if not self.forwards and self._drain_waiters and self._flush_check is None:
            # not in this call: the read that ended the last answer still holds its
            # writes (sent when that read is handled), and the stop must not run first
            self._flush_check = self.reactor.callLater(0, self._flush_checked)

    def _drained(self) -> None:
        """No request runs: once the clients have taken what is left of their answers
        (checked every FLUSH_CHECK_S: the transports tell no one when they empty), the
        drain is over."""
        if self.forwards or not self._drain_waiters:
            return
        unsent = self.site.unsent()
        if unsent:
            if not self._flush_waited:
                self._flush_waited = True
                log.info("waiting for clients to read the last %d bytes of their answers", unsent)
            self._flush_check = self.reactor.callLater(FLUSH_CHECK_S, self._flush_checked)
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        self.pool.close()
        for d in waiters:
            d.callback(0)

    def _flush_checked(self) -> None:
        self._flush_check = None
        self._drained()

    # -- requests --------------------------------------------------------------

    def handle(self, request: server.Request):
        path = request.path
        if path == b"/health":
            return self._json(request, 200, {"status": "draining" if self.draining else "ok"})
        route = routes.route_of(path)
        shape = route.shape if route is not None else Shape.OPENAI
        # a request with a body had its key checked before the body was read
        checked = cast(BoundedRequest, request).head_checked
        if self.api_key and not checked and not api_key_matches(request, self.api_key):
            return self._error(request, shape, 401, KEY_REFUSED,
                               "invalid_request_error", "invalid_api_key",
                               {b"WWW-Authenticate": b"Bearer"})
        method = request.method
        if route is not None:
            if method != route.method.encode():
                return self._error(request, shape, 405, f"{route.path} takes {route.method}",
                                   "invalid_request_error", "method_not_allowed",
                                   {b"Allow": route.method.encode()})
            return self._forward(request, route)
        if path == b"/v1/models" and method == b"GET":
            return self._json(request, 200, {"object": "list", "data": self.router.models()})
        if path.startswith(b"/v1/models/") and method == b"GET":
            return self._model(request, path[len(b"/v1/models/"):])
        if path == b"/metrics" and method == b"GET":
            request.setHeader(b"Content-Type", metricsmod.CONTENT_TYPE_LATEST.encode())
            return metricsmod.render(self.registry)
        self.metrics.request_done("", 404, 0)
        why = routes.not_routed_reason(path)
        return self._error(request, shape, 404,
                           f"Invalid URL ({method.decode(errors='replace')} "
                           f"{request.uri.decode(errors='replace')})"
                           + (f": meshd does not route it ({why})" if why else ""),
                           "invalid_request_error", "not_found")

    def _model(self, request: server.Request, raw_id: bytes) -> bytes:
        """``GET /v1/models/{id}``: the entry ``/v1/models`` lists for it, from the mesh's table."""
        model_id = unquote(raw_id.decode(errors="replace"))
        listed = self.router.models()
        for entry in listed:
            if entry.get("id") == model_id:
                return self._json(request, 200, entry)
        e = UnknownModel(model_id, [str(m.get("id")) for m in listed])
        return self._error(request, Shape.OPENAI, 404, str(e), e.type, e.code)

    def _json(self, request: server.Request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(doc).encode()

    def _error(self, request: server.Request, shape: Shape, status: int, message: str,
               type_: str, code: str | None, headers: dict[bytes, bytes] | None = None) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        return routes.error_body(shape, status, message, type_, code)

    def hang_up(self, request: server.Request, model: str, status: int, reason: str):
        """A relay's answer to a request it cannot serve: close the connection unanswered."""
        log.info("not relaying a request for %s (%s): closing the tunnel", model or "?", reason)
        self.metrics.request_done(model, status, 0)
        request.channel.loseConnection()
        return server.NOT_DONE_YET

    def _model_of(self, request: server.Request, route: Route, body: bytes) -> tuple[str, str]:
        """The model a request names and its client id; raises :class:`BadRequest`."""
        if self.relay:
            # the requesting node routed it: the model it chose, whatever the body says
            chosen = request.getHeader(MODEL_HEADER)
            if chosen:
                return chosen.decode(errors="replace"), _peer_host(request)
        if route.model_from is ModelFrom.FORM:
            # twisted.web parsed the multipart form into args (query arguments too)
            form: dict[bytes, list[bytes]] = request.args or {}
            values = form.get(b"model") or [b""]
            model = values[0].decode(errors="replace").strip()
            if not model:
                raise BadRequest("request body must be a multipart form with a 'model' field",
                                 "missing_model")
            return model, _peer_host(request)
        try:
            doc = jsonbounds.loads(body)  # depth-bounded: nested brackets are a 400, not a 500
        except ValueError as e:
            raise BadRequest(f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(doc, dict):
            raise BadRequest("request body must be a JSON object", "missing_model")
        named = doc.get("model")
        if route.model_from is ModelFrom.BODY_OR_ONLY and named in (None, ""):
            named = self._only_model(route)
        if not isinstance(named, str) or not named:
            raise BadRequest("request body must be a JSON object with a string 'model'",
                             "missing_model")
        user = doc.get("user")
        return named, user if isinstance(user, str) and user else _peer_host(request)

    def _only_model(self, route: Route) -> str:
        """The model of a llama.cpp path whose body names none: the mesh's only one."""
        names = sorted(str(m.get("id")) for m in self.router.models())
        if len(names) == 1:
            return names[0]
        served = ", ".join(names) if names else "none"
        raise BadRequest(f"{route.path} names no 'model' and this mesh serves "
                         f"{len(names)} models ({served}): name one in the body's \"model\"",
                         "missing_model")

    def _forward(self, request: server.Request, route: Route):
        shape = route.shape
        if self.draining:
            if self.relay:
                return self.hang_up(request, "", 503, "this node is shutting down")
            request.setHeader(b"Connection", b"close")
            self.metrics.request_done("", 503, 0)
            return self._error(request, shape, 503, "this node is shutting down", "server_error",
                               "shutting_down", {b"Retry-After": b"1"})
        body = cast(BoundedRequest, request).content.getvalue()
        try:
            model, client_id = self._model_of(request, route, body)
        except BadRequest as e:
            self.metrics.request_done("", 400, 0)
            return self._error(request, shape, 400, e.message, "invalid_request_error", e.code)
        try:
            upstreams = self.router.upstreams(model, client_id)
        except UnknownModel as e:
            if self.relay:
                return self.hang_up(request, "", 404, str(e))
            self.metrics.request_done("", 404, 0)
            return self._error(request, shape, 404, str(e), e.type, e.code)
        except NotReady as e:
            if self.relay:
                return self.hang_up(request, model, 503, str(e))
            self.metrics.request_done(model, 503, 0)
            return self._error(request, shape, 503, str(e), e.type, e.code,
                               {b"Retry-After": b"%d" % e.retry_after_s})
        if not upstreams:
            if self.relay:
                return self.hang_up(request, model, 503, "no host ready")
            self.metrics.request_done(model, 503, 0)
            return self._error(request, shape, 503, f"model {model!r} has no host ready",
                               "server_error", "model_not_ready", {b"Retry-After": b"5"})
        headers = []
        for name in FORWARDED_HEADERS:
            value = request.getHeader(name)
            if value:
                headers.append((name, value))
        if not request.getHeader(b"content-type"):
            headers.append((b"content-type", b"application/json"))
        headers.append((MODEL_HEADER, model.encode()))
        head = request_head(b"POST", request.uri, headers, len(body))
        fwd = Forward(self, request, model, head, body, upstreams[:MAX_ATTEMPTS], shape=shape)
        self.forwards.add(fwd)
        fwd.start()
        return server.NOT_DONE_YET


class BadRequest(Exception):
    """A routed request that names no usable model: 400 with ``code``."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


def _cancel_call(result, call):
    if call.active():
        call.cancel()
    return result


def _peer_host(request: server.Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or str(peer)


# -- one forwarded request --------------------------------------------------------


class Forward:
    """One routed request: tries upstreams, then relays the response (a ResponseSink).

    Its progress is one :class:`~meshd.states.ForwardState` (moves in
    ``FORWARD_MOVES``)::

        connecting --connected--> sent --SSE head--> streaming ---------------> done
                                  sent --other head--> holding --ends--------> done
                                                       holding --past HOLD_BYTES--> relaying --> done
        sent --failed before any byte--> connecting (the next upstream, or a fresh
                                         connection for a stale pooled one)
        any --answered, failed, or the client went away--> done
    """

    def __init__(self, api: ApiServer, request: server.Request, model: str, head: bytes,
                 body: bytes, upstreams: list[Upstream], *, shape: Shape = Shape.OPENAI):
        self.api = api
        self.request = request
        self.model = model
        self.shape = shape  # of the errors this request's client reads
        self.head = head
        self.body = body
        self.upstreams = upstreams
        self.index = -1
        self.upstream: Upstream | None = None
        self.state = ForwardState.CONNECTING
        # what the current state holds: the pending connection (CONNECTING), the
        # connection (SENT and after), the held body (HOLDING)
        self.connecting: defer.Deferred[tuple[UpstreamConnection, bool]] | None = None
        self.conn: UpstreamConnection | None = None
        self.hold: list[bytes] = []
        self.hold_size = 0
        self.reused = False  # the connection came from the pool (it may have gone stale)
        self.reached_any = False  # some upstream accepted the connection: 502, not 503
        self.status = 0
        self.length: int | None = None
        self.nbytes = 0
        self.arrived = api.reactor.seconds()  # for the histograms: the reactor's clock
        # a stream's events: its counter's inc (set at an SSE head), seen, and counted so far
        self.events_inc: Callable[[float], None] | None = None
        self.events = 0
        self.events_counted = 0
        # the one pending deadline: first byte (SENT), silence (after the head)
        self.deadline: IDelayedCall | None = None
        self.last_byte = 0.0  # reactor time of the last response byte
        # the channel whose writes wait for read_ends: kept, since a Request that
        # finished during the read (the body's end) has dropped its channel
        self.holding: BoundedChannel | None = None
        # pending while our client does not read (the upstream paused for it)
        self.stall: IDelayedCall | None = None
        self._seconds = api.reactor.seconds
        request.notifyFinish().addErrback(self._client_lost)

    @property
    def done(self) -> bool:
        return self.state is ForwardState.DONE

    def _move(self, new: ForwardState) -> None:
        check_move("forward", FORWARD_MOVES, self.state, new)
        self.state = new

    def _current(self) -> Upstream:
        assert self.upstream is not None, "no upstream tried yet"
        return self.upstream

    def start(self) -> None:
        self._try_next()

    @property
    def route(self) -> RouteKind:
        """How this request reached (or tries to reach) a llama-server: the route label."""
        if self.upstream is None:
            return RouteKind.NONE
        return RouteKind.FAILOVER if self.index > 0 else route_of(self.upstream)

    # -- upstream attempts --------------------------------------------------------

    def _try_next(self) -> None:
        self.index += 1
        self.upstream = self.upstreams[self.index]
        self.api.router.request_started(self.upstream)
        self._connect(fresh=False)

    def _connect(self, fresh: bool) -> None:
        self._disarm()
        if self.state is not ForwardState.CONNECTING:
            self._move(ForwardState.CONNECTING)
        pool = self.api.pool
        up = self._current()
        d = pool.connect(up).addCallback(lambda c: (c, False)) if fresh else pool.acquire(up)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, result: tuple[UpstreamConnection, bool]) -> None:
        self.connecting = None
        conn, self.reused = result
        self.reached_any = True
        if self.done:
            conn.abort()
            return
        self._move(ForwardState.SENT)
        self.conn = conn
        self._arm(self.api.config.first_byte_timeout_s, self._first_byte_timed_out)
        self.api.metrics.sent_body(self.route, len(self.body))
        conn.send(self.head, self.body, self)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.done:
            return
        if failure.check(defer.TimeoutError, defer.CancelledError):
            reason = f"no connection within {self.api.pool.connect_timeout_s:g} s"
        else:
            reason = failure.getErrorMessage()
        self._upstream_down(f"cannot connect: {reason}")

    def _upstream_down(self, reason: str, timed_out: bool = False) -> None:
        up = self._current()
        self.api.router.request_finished(up)
        self.api.router.upstream_failed(up, reason)
        self.api.metrics.upstream_error(self.model, route_of(up))
        if self.index + 1 < len(self.upstreams):
            log.warning("upstream %s for %s failed before responding (%s); trying %s",
                        up.name, self.model, reason, self.upstreams[self.index + 1].name)
            self.api.metrics.failover(self.model)
            self._try_next()
            return
        log.warning("upstream %s for %s failed before responding: %s", up.name, self.model, reason)
        if self.api.relay:
            self._finished(502 if self.reached_any else 503, upstream_done=True)
            self.request.channel.loseConnection()
            return
        if timed_out:
            self._fail_before_head(504, f"the backend for {self.model!r} did not answer: {reason}",
                                   "upstream_timeout")
        elif self.reached_any:
            self._fail_before_head(502, f"the backend for {self.model!r} failed: {reason}",
                                   "upstream_error")
        else:
            self._fail_before_head(503, f"no host for {self.model!r} is reachable: {reason}",
                                   "model_not_ready", {b"Retry-After": b"5"})

    # -- deadlines ---------------------------------------------------------------------

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        self._disarm()
        self.deadline = self.api.reactor.callLater(delay, fn)

    def _disarm(self) -> None:
        call, self.deadline = self.deadline, None
        if call is not None and call.active():
            call.cancel()

    def _first_byte_timed_out(self) -> None:
        self.deadline = None
        if self.state is not ForwardState.SENT:
            return
        conn, self.conn = self.conn, None
        started = conn is not None and conn.started  # part of a head came
        if conn is not None:
            conn.abort()
        reason = (f"no response within {self.api.config.first_byte_timeout_s:g} s "
                  "([api] first_byte_timeout_s)")
        if started:
            self._failed_after_start(reason, 504, "upstream_timeout")
        else:
            self._upstream_down(reason, timed_out=True)

    def _idle_check(self) -> None:
        self.deadline = None
        if self.state not in (ForwardState.HOLDING, ForwardState.STREAMING,
                              ForwardState.RELAYING):
            return
        limit = self.api.config.stream_idle_timeout_s
        now = self._seconds()
        conn = self.conn
        if conn is not None and conn.paused:
            # our client is not reading: the silence is not the upstream's
            self.last_byte = now
        silent = now - self.last_byte
        if silent < limit - 0.001:
            self._arm(limit - silent, self._idle_check)
            return
        self.conn = None
        if conn is not None:
            conn.abort()
        self._failed_after_start(
            f"no data for {limit:g} s ([api] stream_idle_timeout_s)", 504, "upstream_timeout")

    def client_paused(self) -> None:
        """Our client stopped reading: it has ``client_stall_timeout_s`` to start again."""
        if self.stall is None and not self.done:
            self.stall = self.api.reactor.callLater(self.api.config.client_stall_timeout_s,
                                                    self._client_stalled)

    def client_resumed(self) -> None:
        call, self.stall = self.stall, None
        if call is not None and call.active():
            call.cancel()

    def _client_stalled(self) -> None:
        self.stall = None
        if self.done:
            return
        log.info("client of %s has not read for %g s ([api] client_stall_timeout_s); closing "
                 "it and the upstream %s", self.model, self.api.config.client_stall_timeout_s,
                 self.upstream.name if self.upstream else "-")
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()  # llama-server stops generating once its client is gone
        request = self.request
        request.unregisterProducer()
        self._finished(499)
        # its buffer will not drain: no close that waits for it
        cast(Any, request.channel.transport).abortConnection()

    # -- ResponseSink ---------------------------------------------------------------

    def response_head(self, status: int, headers: dict[bytes, bytes], length: int | None) -> None:
        self.status = status
        self.length = length
        self.last_byte = self._seconds()
        self.api.metrics.first_byte(self.model, self.route, self.last_byte - self.arrived)
        self._arm(self.api.config.stream_idle_timeout_s, self._idle_check)
        ctype = headers.get(b"content-type", b"application/octet-stream")
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", ctype)
        up = self._current()  # the upstream that answered: after a failover, the last one
        request.setHeader(NODE_HEADER, (up.node_id or up.name).encode())
        request.setHeader(MODEL_HEADER, self.model.encode())
        if ctype.startswith(b"text/event-stream"):
            self._move(ForwardState.STREAMING)
            self.events_inc = self.api.metrics.sse_counter(self.model, self.route)
            request.setHeader(b"Cache-Control", b"no-cache")
            self._send_head()
            request.write(b"")  # the head goes out now: clients wait for it
            self._pass_framing()
        else:
            self._move(ForwardState.HOLDING)

    def _send_head(self) -> None:
        if self.length is not None:
            self.request.setHeader(b"Content-Length", b"%d" % self.length)
        # the upstream connection produces for our client's connection: when
        # our client's socket buffer fills, twisted.web pauses it
        if self.conn is not None:
            self.request.registerProducer(_ClientPace(self, self.conn), True)

    def _pass_framing(self) -> None:
        """When our client reads chunked framing (twisted.web chose it at the head's
        write) and the upstream's body is chunked, its chunks are written on in the
        upstream's own framing (``response_framed``), not decoded and framed again.
        An HTTP/1.0 client, a Content-Length body or a HEAD request keeps the
        decoded path (``response_data`` through ``Request.write``)."""
        if self.request.chunked and self.conn is not None:
            self.conn.pass_framing()

    def _take_hold(self) -> bytes:
        held, self.hold, self.hold_size = self.hold, [], 0
        return b"".join(held)

    def response_data(self, data: bytes) -> None:
        self.last_byte = self._seconds()
        if self.state is not ForwardState.HOLDING:
            self.nbytes += len(data)
            if self.events_inc is not None:
                self._saw_events(data)
            self.request.write(data)
            return
        self.hold.append(data)
        self.hold_size += len(data)
        if self.hold_size > HOLD_BYTES:
            self._move(ForwardState.RELAYING)
            self._send_head()
            self.response_data(self._take_hold())
            self._pass_framing()

    def response_framed(self, pieces: list[bytes], payload: int) -> None:
        # only after _pass_framing: STREAMING or RELAYING, to a chunked client
        self.nbytes += payload
        self.last_byte = self._seconds()
        if self.events_inc is not None:  # size lines hold no blank line
            self._saw_events(*pieces)
        write_framed(self.request, pieces, payload)

    def _saw_events(self, *data: bytes) -> None:
        """Count the server-sent events that end in ``data`` (each ends with a blank line)."""
        for d in data:
            self.events += d.count(b"\n\n")
        if self.events - self.events_counted >= EVENTS_BATCH:
            self._count_events()

    def _count_events(self) -> None:
        if self.events_inc is not None and self.events > self.events_counted:
            self.events_inc(self.events - self.events_counted)
            self.events_counted = self.events

    def read_begins(self) -> None:
        channel = self.request.channel
        if isinstance(channel, BoundedChannel):
            self.holding = channel
            channel.hold_writes()

    def read_ends(self) -> None:
        channel, self.holding = self.holding, None
        if channel is not None:
            channel.send_held()

    def response_end(self) -> None:
        request = self.request
        if self.state is ForwardState.HOLDING:
            body = self._take_hold()
            body = routes.reshape_error(self.shape, self.status, body) or body
            self.length = len(body)
            self._send_head()
            self.nbytes += len(body)
            request.write(body)
        self.conn = None
        request.unregisterProducer()
        request.finish()
        self._finished(self.status)

    def response_failed(self, reason: str, started: bool) -> None:
        self.conn = None
        if self.done:
            return
        if not started:
            if self.reused:
                # a pooled keep-alive connection the upstream had closed: not
                # the upstream's fault, and it never saw the request
                log.debug("stale pooled connection to %s: %s", self._current().name, reason)
                self._connect(fresh=True)
                return
            self._upstream_down(reason)
            return
        self._failed_after_start(reason, 502, "upstream_error")

    def _failed_after_start(self, reason: str, status: int, code: str) -> None:
        """The upstream sent a byte, then broke or went silent: never retried."""
        self._disarm()
        up = self._current()
        self.api.router.request_finished(up)
        self.api.metrics.upstream_error(self.model, route_of(up))
        log.warning("upstream %s for %s failed mid-response: %s", up.name, self.model, reason)
        request = self.request
        if self.state in (ForwardState.SENT, ForwardState.HOLDING):  # our client has no head yet
            self._take_hold()
            self._respond_error(status, f"the backend for {self.model!r} failed mid-response: "
                                f"{reason}", "server_error", code)
            self._finished(status, upstream_done=True)
            return
        request.unregisterProducer()
        if self.state is ForwardState.STREAMING:
            event = routes.error_body(self.shape, status, f"the backend failed mid-stream: {reason}",
                                      "server_error", code)
            request.write(b"\n\nevent: error\ndata: " + event + b"\n\n")
            request.channel.persistent = False
            request.finish()
        else:
            request.loseConnection()
        self._finished(status, upstream_done=True)

    # -- endings ----------------------------------------------------------------------

    def _fail_before_head(self, status: int, message: str, code: str,
                          headers: dict[bytes, bytes] | None = None) -> None:
        self._respond_error(status, message, "server_error", code, headers)
        self._finished(status, upstream_done=True)

    def _respond_error(self, status: int, message: str, type_: str, code: str,
                       headers: dict[bytes, bytes] | None = None) -> None:
        request = self.request
        # headers set from the upstream's head must not leak into the error
        request.responseHeaders.removeHeader(b"Content-Length")
        send_error(request, self.shape, status, message, type_, code, headers)

    def _client_lost(self, failure: Failure) -> None:
        if self.done:
            return
        log.info("client of %s went away; closing the upstream %s", self.model,
                 self.upstream.name if self.upstream else "-")
        connecting, self.connecting = self.connecting, None
        conn, self.conn = self.conn, None
        # done first: cancelling a pending connect runs its errback at once, which
        # must see the client's end, not an unreachable host to blame and answer 503
        self._finished(499)
        if connecting is not None:
            connecting.cancel()
        if conn is not None:
            conn.abort()

    def _finished(self, status: int, upstream_done: bool = False) -> None:
        """Account for the end of this request; ``upstream_done``: request_finished already said."""
        if self.done:
            return
        self._disarm()
        self.client_resumed()  # no stall deadline past the end
        self._move(ForwardState.DONE)
        self._count_events()
        if self.upstream is not None and not upstream_done:
            self.api.router.request_finished(self.upstream)
        self.api.metrics.request_done(self.model, status, self.nbytes, self.route,
                                      self._seconds() - self.arrived)
        log.debug("%s %s model=%s upstream=%s status=%d %.1f ms %d bytes",
                  self.request.method.decode(), self.request.uri.decode(errors="replace"),
                  self.model, self.upstream.name if self.upstream else "-", status,
                  (self._seconds() - self.arrived) * 1000, self.nbytes)
        self.api.forward_done(self)


@implementer(IPushProducer)
class _ClientPace:
    """The upstream connection as the producer of our client's connection, telling
    the forward when our client stops and starts reading (its stall deadline)."""

    def __init__(self, fwd: Forward, conn: UpstreamConnection):
        self.fwd = fwd
        self.conn = conn

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.conn.pauseProducing()
        self.fwd.client_paused()

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.fwd.client_resumed()
        self.conn.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.fwd.client_resumed()
        self.conn.stopProducing()


def make_site(router: Router, api: ApiConfig, *,
              reactor: IReactorTime | None = None) -> server.Site:
    """The API's twisted.web Site (``.api`` is its :class:`ApiServer`)."""
    return ApiServer(router, api, reactor=reactor).site
