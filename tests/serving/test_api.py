"""The API server: error shapes, streaming, backpressure, failover, limits, drain.

Two kinds of test: over real loopback sockets against tests/harness/fakebackend.py
(running in a thread), and in memory (StringTransport on both sides, a Clock)
where a producer's state or a timeout must be observed exactly.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from meshd.config import ApiConfig
from meshd.serving.api import ApiServer
from meshd.serving.proxy import ChunkedDecoder, UpstreamError
from meshd.serving.routing import NotReady, UnknownModel, Upstream
from meshd.states import ForwardState, IllegalMove
from tests.conftest import free_port
from tests.harness.fakebackend import FakeBackend
from tests.harness.promtext import Scrape

MIB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------


class Router:
    """A fixed table of upstreams that records what the API told it."""

    def __init__(self, table: dict[str, list[Upstream]], not_ready: set[str] = frozenset()):
        self.table = table
        self.not_ready = set(not_ready)
        self.failed: list[tuple[str, str]] = []
        self.started: list[str] = []
        self.finished: list[str] = []
        self.client_ids: list[str] = []

    def models(self):
        return [{"id": m, "object": "model", "owned_by": "test"} for m in sorted(self.table)]

    def upstreams(self, model, client_id):
        self.client_ids.append(client_id)
        if model in self.not_ready:
            raise NotReady(model, "loading", retry_after_s=7)
        if model not in self.table:
            raise UnknownModel(model, list(self.table))
        return list(self.table[model])

    def upstream_failed(self, upstream, reason):
        self.failed.append((upstream.name, reason))

    def request_started(self, upstream):
        self.started.append(upstream.name)

    def request_finished(self, upstream):
        self.finished.append(upstream.name)


def tcp_upstream(name: str, port: int) -> Upstream:
    return Upstream(name=name, endpoint=lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                    pool_key=f"{name}:{port}")


@pytest.fixture
def fake():
    backend = FakeBackend(chunks=5)
    backend.start()
    yield backend
    if backend.gate is not None:
        backend.gate.set()
    backend.stop()


@pytest.fixture
def fake2():
    backend = FakeBackend(chunks=5)
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture
def serve():
    """serve(router, **api_config) -> (ApiServer, base URL) on a loopback port."""
    ports = []
    servers = []

    def start(router, **config):
        api = ApiServer(router, ApiConfig(**config), reactor=reactor)
        port = reactor.listenTCP(0, api.site, interface="127.0.0.1")
        ports.append(port)
        servers.append(api)
        return api, f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for api in servers:
        api.pool.close()
    for port in ports:
        port.stopListening()


_pool = HTTPConnectionPool(reactor, persistent=False)


def post(url, doc=None, *, data=None, headers=None):
    body = data if data is not None else json.dumps(doc).encode()
    headers = {"Content-Type": ["application/json"], **(headers or {})}
    return treq.post(url, data=body, headers=headers, pool=_pool)


def get(url, headers=None):
    return treq.get(url, headers=headers or {}, pool=_pool)


async def error_of(response, status: int) -> dict:
    """The response has ``status`` and an OpenAI-shaped error body; returns its "error"."""
    body = await response.json()
    assert response.code == status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err


def raw_exchange(port: int, data_parts: list[bytes], read_timeout_s: float = 10.0) -> bytes:
    """Blocking: send parts (stopping if the server closes) and read until the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s)
    try:
        for part in data_parts:
            try:
                s.sendall(part)
            except OSError:
                break
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except OSError:
                break
            if not got:
                break
            out += got
        return out
    finally:
        s.close()


def chat(model="m", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# -- request errors ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_models_lists_router_models_in_openai_list_shape(serve):
    _, url = serve(Router({"b": [], "a": []}))
    r = await get(url + "/v1/models")
    assert r.code == 200
    body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_health_answers_200_json_even_with_an_api_key(serve):
    _, url = serve(Router({}), api_key="sekrit")
    r = await get(url + "/health")
    assert r.code == 200
    assert (await r.json())["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(serve):
    _, url = serve(Router({}))
    err = await error_of(await post(url + "/v1/chat/completions", data=b'{"model": '), 400)
    assert err["code"] == "invalid_json"


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_is_400_not_a_500(serve):
    # a few KB of brackets made json.loads raise RecursionError: a 500 HTML page before
    _, url = serve(Router({}))
    body = b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    err = await error_of(await post(url + "/v1/chat/completions", data=body), 400)
    assert err["code"] == "invalid_json" and "deep" in err["message"]


@pytest_twisted.ensureDeferred
async def test_json_that_is_not_an_object_is_400(serve):
    _, url = serve(Router({}))
    await error_of(await post(url + "/v1/chat/completions", ["model", "m"]), 400)


@pytest_twisted.ensureDeferred
async def test_missing_model_is_400(serve):
    _, url = serve(Router({}))
    err = await error_of(await post(url + "/v1/completions", {"prompt": "x"}), 400)
    assert "model" in err["message"]


@pytest_twisted.ensureDeferred
async def test_non_string_model_is_400(serve):
    _, url = serve(Router({}))
    await error_of(await post(url + "/v1/completions", {"model": 3}), 400)


@pytest_twisted.ensureDeferred
async def test_missing_api_key_is_401(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}), api_key="sekrit")
    err = await error_of(await post(url + "/v1/chat/completions", chat()), 401)
    assert err["code"] == "invalid_api_key"
    assert fake.requests == 0


@pytest_twisted.ensureDeferred
async def test_wrong_api_key_is_401(serve):
    _, url = serve(Router({}), api_key="sekrit")
    r = await get(url + "/v1/models", headers={"Authorization": ["Bearer sekriT"]})
    await error_of(r, 401)


@pytest_twisted.ensureDeferred
async def test_right_api_key_is_served(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}), api_key="sekrit")
    r = await post(url + "/v1/chat/completions", chat(),
                   headers={"Authorization": ["Bearer sekrit"]})
    assert r.code == 200
    assert (await r.json())["object"] == "chat.completion"


@pytest_twisted.ensureDeferred
async def test_unknown_model_is_404_listing_served_models(serve):
    _, url = serve(Router({"alpha": [], "beta": []}))
    err = await error_of(await post(url + "/v1/chat/completions", chat("gamma")), 404)
    assert err["code"] == "model_not_found"
    assert "alpha" in err["message"] and "beta" in err["message"]


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_openai_shaped_404(serve):
    _, url = serve(Router({}))
    err = await error_of(await get(url + "/v2/nothing"), 404)
    assert "/v2/nothing" in err["message"]


@pytest_twisted.ensureDeferred
async def test_not_ready_is_503_with_retry_after(serve):
    _, url = serve(Router({"m": []}, not_ready={"m"}))
    r = await post(url + "/v1/chat/completions", chat())
    err = await error_of(r, 503)
    assert err["code"] == "model_not_ready"
    assert r.headers.getRawHeaders("Retry-After") == ["7"]


@pytest_twisted.ensureDeferred
async def test_client_id_is_the_user_field_else_the_peer_address(serve, fake):
    router = Router({"m": [tcp_upstream("a", fake.port)]})
    _, url = serve(router)
    assert (await post(url + "/v1/chat/completions", chat(user="alice"))).code == 200
    assert (await post(url + "/v1/chat/completions", chat())).code == 200
    assert router.client_ids == ["alice", "127.0.0.1"]


# -- body limit --------------------------------------------------------------------------


def _head(extra: bytes) -> bytes:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra


@pytest_twisted.ensureDeferred
async def test_20mib_body_with_content_length_is_413_and_the_server_keeps_serving(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    port = int(url.rsplit(":", 1)[1])
    body = b"x" * (20 * MIB)
    parts = [_head(b"Content-Length: %d\r\n\r\n" % len(body))] + [
        body[i : i + MIB] for i in range(0, len(body), MIB)]
    answer = await threads.deferToThread(raw_exchange, port, parts)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    err = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_too_large"
    assert fake.requests == 0
    r = await post(url + "/v1/chat/completions", chat())
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_20mib_chunked_body_is_413_and_the_server_keeps_serving(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}), max_body_bytes=MIB)
    port = int(url.rsplit(":", 1)[1])
    piece = b"y" * (256 * 1024)
    parts = [_head(b"Transfer-Encoding: chunked\r\n\r\n")]
    parts += [b"%x\r\n%s\r\n" % (len(piece), piece)] * 80 + [b"0\r\n\r\n"]
    answer = await threads.deferToThread(raw_exchange, port, parts)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert fake.requests == 0
    assert (await post(url + "/v1/chat/completions", chat())).code == 200


@pytest_twisted.ensureDeferred
async def test_oversized_body_with_expect_100_continue_gets_413_without_100(serve):
    _, url = serve(Router({}), max_body_bytes=1000)
    port = int(url.rsplit(":", 1)[1])
    parts = [_head(b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")]
    answer = await threads.deferToThread(raw_exchange, port, parts, 10.0)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"100 Continue" not in answer


@pytest_twisted.ensureDeferred
async def test_a_wrong_api_key_is_refused_before_the_body_is_read(serve, fake):
    # the head alone: a 401 comes back without the 10 MB the head announces being sent
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}), api_key="sekrit")
    port = int(url.rsplit(":", 1)[1])
    answer = await threads.deferToThread(
        raw_exchange, port, [_head(b"Authorization: Bearer wrong\r\nContent-Length: 10000000\r\n\r\n")])
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert b"WWW-Authenticate: Bearer" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_api_key"
    assert fake.requests == 0
    # the right key, through x-api-key as Anthropic's SDK sends it, still gets in
    r = await post(url + "/v1/chat/completions", chat(), headers={"x-api-key": ["sekrit"]})
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_oversized_body_on_an_anthropic_path_is_413_in_anthropics_shape(serve):
    _, url = serve(Router({}), max_body_bytes=1000)
    port = int(url.rsplit(":", 1)[1])
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n")
    answer = await threads.deferToThread(raw_exchange, port, [head, b"x" * 5000])
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert doc["type"] == "error" and doc["error"]["type"] == "request_too_large", doc
    assert "max_body_bytes" in doc["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_body_under_the_limit_is_forwarded_whole(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}), max_body_bytes=MIB)
    doc = chat(padding="z" * (MIB - 200))
    r = await post(url + "/v1/chat/completions", doc)
    assert r.code == 200
    await r.content()
    assert json.loads(fake.bodies[-1]) == doc


# -- streaming and upstream failures ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_non_stream_is_passed_through_with_the_upstream_status_and_body(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    r = await post(url + "/v1/chat/completions", chat(max_tokens=3))
    assert r.code == 200
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == "t0 t1 t2 "


@pytest_twisted.ensureDeferred
async def test_first_chunk_arrives_before_the_backend_produced_the_last(serve, fake):
    import threading

    fake.gate = threading.Event()
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    r = await post(url + "/v1/chat/completions", chat(stream=True))
    assert r.code == 200
    assert r.headers.getRawHeaders("Content-Type")[0].startswith("text/event-stream")
    pieces = []
    first = defer.Deferred()

    def got(data):
        pieces.append(data)
        if not first.called:
            first.callback(None)

    done = treq.collect(r, got)
    await first.addTimeout(10, reactor)  # a proxy that buffers the stream never gets here
    # the backend is still holding its last chunk back: what we have came through live
    assert b"data: " in pieces[0]
    assert b"[DONE]" not in b"".join(pieces)
    assert fake.streams_done == 0
    fake.gate.set()
    await done
    text = b"".join(pieces)
    assert text.count(b"data: ") == 6  # 5 chunks and [DONE]
    assert text.rstrip().endswith(b"data: [DONE]")


@pytest_twisted.ensureDeferred
async def test_non_stream_backend_failing_midway_is_502(serve, fake):
    fake.mode = "break"
    router = Router({"m": [tcp_upstream("a", fake.port)]})
    _, url = serve(router)
    err = await error_of(await post(url + "/v1/chat/completions", chat()), 502)
    assert err["code"] == "upstream_error"
    assert fake.requests == 1  # not sent again
    assert router.started == router.finished == ["a"]


@pytest_twisted.ensureDeferred
async def test_stream_broken_after_first_byte_ends_with_sse_error_event(serve, fake):
    fake.mode = "break"
    fake.break_after = 2
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    r = await post(url + "/v1/chat/completions", chat(stream=True))
    assert r.code == 200
    text = (await r.content()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert sum(e.startswith("data: {") for e in events) == 2
    assert events[-1].startswith("event: error\ndata: ")
    err = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert err["code"] == "upstream_error" and err["message"]


@pytest_twisted.ensureDeferred
async def test_failover_when_the_first_upstream_refuses(serve, fake):
    router = Router({"m": [tcp_upstream("dead", free_port()), tcp_upstream("live", fake.port)]})
    _, url = serve(router)
    r = await post(url + "/v1/chat/completions", chat())
    assert r.code == 200
    await r.json()
    assert [name for name, _ in router.failed] == ["dead"]
    assert router.started == ["dead", "live"]
    assert sorted(router.finished) == ["dead", "live"]


@pytest_twisted.ensureDeferred
async def test_failover_when_the_first_upstream_closes_before_responding(serve, fake, fake2):
    fake.mode = "close"
    router = Router({"m": [tcp_upstream("a", fake.port), tcp_upstream("b", fake2.port)]})
    _, url = serve(router)
    r = await post(url + "/v1/chat/completions", chat(stream=True))
    assert r.code == 200
    assert (await r.content()).count(b"data: ") == 6
    assert (fake.requests, fake2.requests) == (1, 1)
    assert [name for name, _ in router.failed] == ["a"]


@pytest_twisted.ensureDeferred
async def test_upstream_failing_after_its_first_byte_is_not_retried(serve, fake, fake2):
    fake.mode = "break"
    router = Router({"m": [tcp_upstream("a", fake.port), tcp_upstream("b", fake2.port)]})
    _, url = serve(router)
    r = await post(url + "/v1/chat/completions", chat(stream=True))
    text = await r.content()
    assert b"event: error" in text
    assert (fake.requests, fake2.requests) == (1, 0)
    assert router.failed == []  # it was reachable: not a routing failure


@pytest_twisted.ensureDeferred
async def test_no_reachable_upstream_is_503_with_retry_after(serve):
    router = Router({"m": [tcp_upstream("x", free_port()), tcp_upstream("y", free_port())]})
    _, url = serve(router)
    r = await post(url + "/v1/chat/completions", chat())
    err = await error_of(r, 503)
    assert r.headers.getRawHeaders("Retry-After")
    assert "x" not in err["message"] or "reachable" in err["message"]
    assert [name for name, _ in router.failed] == ["x", "y"]


@pytest_twisted.ensureDeferred
async def test_retries_at_most_once(serve):
    router = Router({"m": [tcp_upstream(n, free_port()) for n in "xyz"]})
    _, url = serve(router)
    await error_of(await post(url + "/v1/chat/completions", chat()), 503)
    assert router.started == ["x", "y"]


@pytest_twisted.ensureDeferred
async def test_backends_that_accept_then_close_give_502(serve, fake, fake2):
    fake.mode = fake2.mode = "close"
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port), tcp_upstream("b", fake2.port)]}))
    await error_of(await post(url + "/v1/chat/completions", chat()), 502)
    assert (fake.requests, fake2.requests) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_keep_alive_upstream_connection_is_reused(serve, fake):
    api, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    for _ in range(3):
        r = await post(url + "/v1/chat/completions", chat(max_tokens=2))
        await r.content()
    assert api.pool.idle_count(f"a:{fake.port}") == 1


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_by_model_and_status(serve, fake):
    _, url = serve(Router({"m": [tcp_upstream("a", fake.port)]}))
    await (await post(url + "/v1/chat/completions", chat())).content()
    await (await post(url + "/v1/chat/completions", chat("nope"))).content()
    text = (await (await get(url + "/metrics")).text())
    scrape = Scrape(text)  # prometheus_client's own parser: the text is well-formed
    assert scrape.value("meshd_api_requests_total", model="m", status="200", route="local") == 1
    assert scrape.value("meshd_api_requests_total", model="", status="404", route="none") == 1
    assert scrape.value("meshd_api_in_flight", hop="served") == 0
    assert scrape.families["meshd_api_in_flight"].type == "gauge"
    assert scrape.value("meshd_api_time_to_first_byte_seconds_count", model="m") == 1
    assert scrape.value("meshd_api_request_duration_seconds_count", model="m") == 1


# -- in memory: backpressure, disconnects, drain -------------------------------------------------


class MemoryUpstreams:
    """An endpoint factory whose connections are in-memory transports the test drives."""

    def __init__(self):
        self.connections = []

    def endpoint(self):
        outer = self

        class Endpoint:
            def connect(self, factory):
                proto = factory.buildProtocol(None)
                transport = StringTransportWithDisconnection()
                transport.protocol = proto
                proto.makeConnection(transport)
                outer.connections.append(proto)
                return defer.succeed(proto)

        return Endpoint()


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def sse(i: int) -> bytes:
    payload = b'data: {"n": %d}\n\n' % i
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def memory_api(**config):
    clock = Clock()
    ups = MemoryUpstreams()
    router = Router({"m": [Upstream(name="mem", endpoint=ups.endpoint, pool_key="mem")]})
    api = ApiServer(router, ApiConfig(**config), reactor=clock)
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    return api, router, clock, ups, channel, client


def send_stream_request(channel) -> None:
    body = json.dumps(chat(stream=True)).encode()
    channel.dataReceived(_head(b"Content-Length: %d\r\n\r\n" % len(body)) + body)


def test_chunk_reaches_the_client_before_the_upstream_sends_the_next():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    assert upstream.transport.value().startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    upstream.dataReceived(SSE_HEAD + sse(0))
    assert b'data: {"n": 0}' in client.value()
    client.clear()
    upstream.dataReceived(sse(1))
    assert b'data: {"n": 1}' in client.value()


class CountingTransport(StringTransport):
    """A client's transport that counts the writes it got (each a ``send()`` on a socket)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


def counting_api() -> tuple[MemoryUpstreams, CountingTransport, Any]:
    api, router, clock, ups, _, _ = memory_api()
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    return ups, client, channel


@pytest.mark.parametrize("end", [False, True])
def test_what_one_upstream_read_brings_leaves_in_one_send(end):
    # the head, the first chunks and (when in the same read) the body's end: one write,
    # not one each; what a later read brings is written as it comes
    ups, client, channel = counting_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1) + (b"0\r\n\r\n" if end else b""))
    assert client.writes == 1
    out = client.value()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b'data: {"n": 1}' in out
    assert out.endswith(b"0\r\n\r\n") is end
    if not end:
        upstream.dataReceived(sse(2))
        assert client.writes == 2 and client.value().endswith(sse(2))


@pytest.mark.parametrize("close", [False, True])
def test_a_later_read_that_ends_the_body_leaves_with_the_end_in_one_send(close):
    # the last token's chunk and the body's end (the terminating chunk, written by
    # the finish) used to be two sends; the client's connection closing after it too
    ups, client, channel = counting_api()
    if close:
        body = json.dumps(chat(stream=True)).encode()
        channel.dataReceived(_head(b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                                   % len(body)) + body)
    else:
        send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    assert client.writes == 1
    upstream.dataReceived(sse(1) + b"0\r\n\r\n")
    assert client.writes == 2
    assert client.value().endswith(sse(1) + b"0\r\n\r\n")
    assert client.disconnecting is close


def test_a_body_of_known_length_ends_in_one_send_with_what_its_last_read_brings():
    ups, client, channel = counting_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 10\r\n\r\n01234")
    writes = client.writes
    upstream.dataReceived(b"56789")
    assert client.writes == writes + 1 and client.value().endswith(b"56789")


def test_a_head_alone_in_its_read_leaves_at_once():
    # llama-server's head may come long before its first token: it is not held for it
    ups, client, channel = counting_api()
    send_stream_request(channel)
    ups.connections[0].dataReceived(SSE_HEAD)
    assert client.writes == 1 and client.value().startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_held_answer_to_a_closing_client_is_sent_before_the_close():
    ups, client, channel = counting_api()
    body = json.dumps(chat(stream=True)).encode()
    channel.dataReceived(_head(b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
                         + body)
    ups.connections[0].dataReceived(SSE_HEAD + sse(0) + b"0\r\n\r\n")
    assert client.writes == 1 and client.value().endswith(b"0\r\n\r\n")
    assert client.disconnecting


@pytest.mark.parametrize("length", [b"-5", b"+5", b"5x", b"9" * 5000])
def test_an_upstream_content_length_that_is_not_digits_is_a_502(length):
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhello")
    assert client.value().startswith(b"HTTP/1.1 502 "), client.value()[:80]
    assert b"bad Content-Length" in client.value()


def test_a_forward_moves_sent_streaming_done_as_its_stream_arrives_and_ends():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    (fwd,) = api.forwards
    assert fwd.state is ForwardState.SENT
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    assert fwd.state is ForwardState.STREAMING
    upstream.dataReceived(b"0\r\n\r\n")
    assert fwd.state is ForwardState.DONE and api.forwards == set()


def test_a_non_stream_answer_is_held_and_a_forward_refuses_a_move_its_table_lacks():
    api, router, clock, ups, channel, client = memory_api()
    body = json.dumps(chat()).encode()
    channel.dataReceived(_head(b"Content-Length: %d\r\n\r\n" % len(body)) + body)
    (fwd,) = api.forwards
    ups.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 10\r\n\r\n{}")
    assert fwd.state is ForwardState.HOLDING and client.value() == b""
    with pytest.raises(IllegalMove, match="from holding to streaming"):
        fwd._move(ForwardState.STREAMING)


def test_client_that_stops_reading_pauses_the_upstream_and_resumes_it():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    # what the client's TCP transport does when its send buffer is full / drained
    channel.pauseProducing()
    assert upstream.transport.producerState == "paused"
    channel.resumeProducing()
    assert upstream.transport.producerState == "producing"


def test_client_disconnect_closes_the_upstream_connection():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.disconnected  # aborted, not left to finish
    assert router.started == router.finished == ["mem"]
    assert api.in_flight == 0


def test_client_disconnect_before_the_upstream_answers_closes_the_upstream():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    channel.connectionLost(Failure(ConnectionDone()))
    assert ups.connections[0].transport.disconnected
    assert router.finished == ["mem"]


def test_drain_waits_for_an_open_stream_and_fires_when_it_ends():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    d = api.drain(30)
    clock.advance(10)
    assert not d.called
    upstream.dataReceived(sse(1) + b"0\r\n\r\n")
    assert not d.called, "the drain ends after the turn that sent the answer's end"
    clock.advance(0)
    assert d.called and d.result == 0
    assert client.value().endswith(b"0\r\n\r\n")


def test_drain_waits_until_the_clients_took_the_rest_of_their_answers():
    api, router, clock, ups, channel, client = memory_api()
    left = [5000]
    api.site.unsent = lambda: left[0]  # a slow client's bytes still in meshd's transport
    d = api.drain(30)
    clock.advance(1)
    assert not d.called
    left[0] = 0
    clock.advance(0.1)
    assert d.called and d.result == 0


def test_drain_cuts_off_what_slow_clients_did_not_take_at_the_timeout(caplog):
    api, router, clock, ups, channel, client = memory_api()
    api.site.unsent = lambda: 5000
    d = api.drain(5)
    with caplog.at_level(logging.WARNING, logger="meshd.serving.api"):
        clock.advance(5.1)
    assert d.called and d.result == 0
    assert "5000 bytes of finished answers" in caplog.text


def test_drain_fires_at_the_timeout_with_the_requests_still_running():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    ups.connections[0].dataReceived(SSE_HEAD + sse(0))
    d = api.drain(5)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    assert d.called and d.result == 1


def test_drain_with_nothing_in_flight_fires_at_once():
    api, *_ = memory_api()
    d = api.drain(5)
    assert d.called and d.result == 0


def test_draining_server_refuses_new_requests_with_503():
    api, router, clock, ups, channel, client = memory_api()
    api.drain(5)
    send_stream_request(channel)
    assert client.value().startswith(b"HTTP/1.1 503 ")
    assert ups.connections == []


def test_upstream_connect_timeout_fails_over_to_the_next_upstream():
    clock = Clock()
    ups = MemoryUpstreams()

    class Hanging:
        def connect(self, factory):
            return defer.Deferred()

    router = Router({"m": [Upstream(name="slow", endpoint=Hanging, pool_key="slow"),
                           Upstream(name="mem", endpoint=ups.endpoint, pool_key="mem")]})
    api = ApiServer(router, ApiConfig(connect_timeout_s=3), reactor=clock)
    channel = api.site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    send_stream_request(channel)
    assert ups.connections == []
    clock.advance(3)
    assert [name for name, _ in router.failed] == ["slow"]
    assert len(ups.connections) == 1


def test_stale_pooled_connection_is_retried_on_a_fresh_one_without_failover():
    api, router, clock, ups, channel, client = memory_api()
    body = json.dumps(chat()).encode()
    request = _head(b"Content-Length: %d\r\n\r\n" % len(body)) + body
    channel.dataReceived(request)
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    ups.connections[0].dataReceived(ok)
    assert api.pool.idle_count("mem") == 1
    client.clear()
    channel.dataReceived(request)
    # the pooled connection turns out closed by the upstream before it answered
    ups.connections[0].transport.loseConnection()
    assert len(ups.connections) == 2
    ups.connections[1].dataReceived(ok)
    assert client.value().startswith(b"HTTP/1.1 200 ")
    assert router.failed == []


# -- the chunked decoder --------------------------------------------------------------------


def test_chunked_decoder_gives_the_same_payload_whatever_the_read_boundaries():
    wire = (b"5\r\nhello\r\n7;ext=1\r\n, world\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\n")
    for cut in range(1, len(wire)):
        dec = ChunkedDecoder()
        out = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert out == b"hello, world!" and dec.done, cut
    dec = ChunkedDecoder()
    out = b"".join(dec.feed(wire[i : i + 1]) for i in range(len(wire)))
    assert out == b"hello, world!" and dec.done


def test_chunked_decoder_rejects_a_bad_size_line():
    with pytest.raises(UpstreamError):
        ChunkedDecoder().feed(b"zz\r\nhello\r\n")



@pytest_twisted.ensureDeferred
async def test_a_connection_to_an_upstream_is_made_without_twisteds_factory_log_lines():
    # "Starting factory <OneShotFactory>" and "Stopping factory" for every upstream
    # connection cost a thousand streams opened at once a noticeable share of their setup
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogPublisher

    from meshd.serving.proxy import ConnectionPool

    server = Factory.forProtocol(Protocol)
    server.noisy = False
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        up = Upstream(name="local", pool_key="k",
                      endpoint=lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        conn = await ConnectionPool(reactor).connect(up)
        assert conn.upstream is up and conn.transport is not None
        lost = defer.Deferred()
        conn.connectionLost = lambda reason=None: lost.callback(None)
        conn.transport.loseConnection()
        await lost
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    assert [e for e in events if "factory" in str(e.get("log_format", "")).lower()] == []
