"""The console's resources, with no socket: status JSON, SSE framing, coalescing, clients.

Time is a ``task.Clock``; requests are ``DummyRequest``s (the event stream and
the chat proxy) or go through ``treq.testing.StubTreq`` (plain answers).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from meshd.config import ApiConfig, Config, ConsoleConfig
from meshd.console import server as console

GB = 2**30


# -- a node to show ------------------------------------------------------------------


@dataclass
class FakeBackend:
    pid: int | None = 4242
    state: str = "ready"


@dataclass
class FakeServed:
    name: str
    size_bytes: int
    backend: FakeBackend = field(default_factory=FakeBackend)
    state: str = "warm"


@dataclass
class FakeDisk:
    name: str
    size_bytes: int


@dataclass
class FakePeer:
    node_id: str
    serving: tuple = ()
    available_models: tuple = ()


class FakeMesh:
    def __init__(self):
        self.listeners = []
        self.peer_list = []

    def add_listener(self, cb):
        self.listeners.append(cb)

    def peers(self):
        return list(self.peer_list)


class FakeDownloads:
    def __init__(self):
        self.listeners = []


class FakeDownloader:
    def __init__(self):
        self.downloads = FakeDownloads()


class FakeNode:
    def __init__(self, clock):
        self.clock = clock
        self.node_id = "selfnode"
        self.served = {"tiny": FakeServed("tiny", 2 * GB)}
        self.mesh = FakeMesh()
        self.downloader = FakeDownloader()
        self.status_listeners = []
        self.state = "running"
        self.rebalancer = None

    def add_status_listener(self, cb):
        self.status_listeners.append(cb)

    def add_membership_listener(self, cb):
        self.mesh.add_listener(cb)

    def status(self):
        return {
            "node_id": self.node_id, "state": self.state, "uptime_s": self.clock.seconds(),
            "vram_bytes": 8 * GB, "peers": [],
            "models": [{"name": n, "state": m.state, "hosts": [self.node_id]}
                       for n, m in self.served.items()],
            "downloads": [],
        }


def make_config(console_listen="127.0.0.1:3131", api_key="", api_listen="127.0.0.1:9337"):
    return Config(console=ConsoleConfig(enabled=True, listen=console_listen),
                  api=ApiConfig(listen=api_listen, api_key=api_key))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def node(clock):
    return FakeNode(clock)


def make_feed(node, clock, config=None, measured=0, max_clients=console.MAX_CLIENTS):
    calls = []

    def measure(pids):
        calls.append(pids)
        return measured

    vram = console.VramUse(node, clock=clock, measure=measure)
    feed = console.StatusFeed(node, config or make_config(), clock=clock, vram=vram,
                              max_clients=max_clients)
    feed.measure_calls = calls
    return feed


def events(request: DummyRequest) -> list[tuple[str, str]]:
    """The SSE stream written so far as (event, data) pairs; comments as ("comment", text)."""
    out = []
    text = b"".join(request.written).decode()
    for block in text.split("\n\n"):
        if not block:
            continue
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append(("comment", line[1:].strip()))
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((event, "\n".join(data)))
    return out


def statuses(request):
    return [json.loads(d) for e, d in events(request) if e == "status"]


# -- the status document ----------------------------------------------------------------


def test_status_is_the_nodes_status_plus_a_console_key(node, clock):
    doc = make_feed(node, clock).status()
    assert {k: v for k, v in doc.items() if k != "console"} == node.status()
    assert doc["console"]["chat"] is True
    assert doc["console"]["api_key_required"] is False


def test_vram_used_falls_back_to_the_model_size_when_nvml_measures_nothing(node, clock):
    used = make_feed(node, clock, measured=0).status()["console"]["vram_used"]
    assert used["selfnode"] == {"bytes": 2 * GB, "source": "model size"}


def test_vram_used_is_nvml_when_it_measures_our_llama_server(node, clock):
    feed = make_feed(node, clock, measured=3 * GB)
    assert feed.status()["console"]["vram_used"]["selfnode"] == {"bytes": 3 * GB, "source": "nvml"}
    assert feed.measure_calls == [[4242]]


def test_vram_measurement_is_cached_for_a_few_seconds(node, clock):
    feed = make_feed(node, clock, measured=GB)
    feed.status()
    feed.status()
    assert len(feed.measure_calls) == 1
    clock.advance(console.VRAM_CACHE_S)
    feed.status()
    assert len(feed.measure_calls) == 2


def test_vram_used_of_a_peer_is_the_size_of_the_model_it_serves(node, clock):
    node.mesh.peer_list = [
        FakePeer("busy", serving=("big",), available_models=(FakeDisk("big", 5 * GB),
                                                            FakeDisk("other", GB))),
        FakePeer("idle", available_models=(FakeDisk("big", 5 * GB),)),
    ]
    used = make_feed(node, clock).status()["console"]["vram_used"]
    assert used["busy"] == {"bytes": 5 * GB, "source": "model size"}
    assert used["idle"] == {"bytes": 0, "source": "none"}


def test_vram_used_of_a_split_is_each_nodes_share_of_the_model(node, clock):
    from meshd.placement.election import RUN, Decision

    node.served = {"big": FakeServed("big", 10 * GB)}
    node.mesh.peer_list = [FakePeer("worker", serving=("big",),
                                    available_models=(FakeDisk("big", 10 * GB),))]
    node.rebalancer = types.SimpleNamespace(decision=Decision(
        "big", RUN, "split", host="selfnode", shares=(("selfnode", 0.7), ("worker", 0.3))))
    used = make_feed(node, clock).status()["console"]["vram_used"]
    assert used["selfnode"] == {"bytes": 7 * GB, "source": "model size"}
    assert used["worker"] == {"bytes": 3 * GB, "source": "model size"}


def test_nothing_served_uses_no_vram(node, clock):
    node.served = {}
    used = make_feed(node, clock).status()["console"]["vram_used"]
    assert used["selfnode"] == {"bytes": 0, "source": "none"}


def test_api_status_answers_the_status_as_json(node, clock):
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock))
    treq = StubTreq(c.root)
    r = treq.get("http://127.0.0.1:3131/api/status").result
    assert r.code == 200
    assert r.headers.getRawHeaders(b"content-type") == [b"application/json"]
    doc = json.loads(treq.content(r).result)
    assert doc["node_id"] == "selfnode" and "console" in doc


def test_the_page_is_served_at_root_and_names_no_other_host(node, clock):
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock))
    treq = StubTreq(c.root)
    r = treq.get("http://127.0.0.1:3131/").result
    assert r.code == 200
    html = treq.content(r).result.decode()
    assert "/api/events" in html and "/v1/chat/completions" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external asset
    assert treq.get("http://127.0.0.1:3131/nothing").result.code == 404


def test_a_foreign_host_header_is_refused_on_a_loopback_console(node, clock):
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock))
    treq = StubTreq(c.root)
    r = treq.get("http://127.0.0.1:3131/api/status", headers={"Host": "evil.example:3131"}).result
    assert r.code == 421
    for host in ("localhost:3131", "127.0.0.1:3131", "[::1]:3131"):
        r = treq.get("http://127.0.0.1:3131/api/status", headers={"Host": host}).result
        assert r.code == 200, host


# -- the event stream ----------------------------------------------------------------------


def open_stream(feed) -> DummyRequest:
    request = DummyRequest([])
    assert feed.add_client(request)
    return request


def test_a_new_stream_gets_the_status_at_once_as_one_sse_event(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/event-stream; charset=utf-8"]
    raw = b"".join(request.written).decode()
    assert raw.startswith("retry: 3000\nevent: status\ndata: {")
    assert raw.endswith("}\n\n")
    assert raw.count("\n\n") == 1  # one event, its JSON on one data line
    assert statuses(request)[0]["node_id"] == "selfnode"


def test_sse_frames_multi_line_data_as_several_data_lines():
    assert console._sse("x", "a\nb") == b"event: x\ndata: a\ndata: b\n\n"


def test_a_burst_of_changes_becomes_one_event(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    clock.advance(1)
    for state in ("loading", "restarting", "warm", "loading"):
        node.served["tiny"].state = state
        feed.changed()
    clock.advance(0)
    assert [s["models"][0]["state"] for s in statuses(request)] == ["warm", "loading"]


def test_events_are_at_least_the_minimum_interval_apart(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    node.state = "a"
    feed.changed()
    clock.advance(0)
    node.state = "b"
    feed.changed()
    clock.advance(console.MIN_INTERVAL_S / 2)
    assert [s["state"] for s in statuses(request)] == ["running", "a"]
    clock.advance(console.MIN_INTERVAL_S / 2)
    assert [s["state"] for s in statuses(request)] == ["running", "a", "b"]


def test_a_change_that_changes_nothing_sends_nothing(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    feed.changed()
    clock.advance(1)
    node.state = "x"
    feed.changed()
    clock.advance(1)
    node.state = "x"
    feed.changed()
    clock.advance(1)
    assert [s["state"] for s in statuses(request)] == ["running", "x"]


def test_a_second_stream_does_not_hide_a_change_from_the_first(node, clock):
    feed = make_feed(node, clock)
    first = open_stream(feed)
    clock.advance(1)
    node.state = "changed"
    second = open_stream(feed)
    clock.advance(1)
    assert [s["state"] for s in statuses(first)] == ["running", "changed"]
    assert statuses(second)[0]["state"] == "changed"


def test_every_change_point_of_the_node_pushes_an_event(node, clock):
    feed = make_feed(node, clock)
    feed.watch()
    request = open_stream(feed)
    changes = [
        lambda: node.status_listeners[0](),
        lambda: node.mesh.listeners[0]("PeerUp"),
        lambda: node.downloader.downloads.listeners[0]("tiny"),
    ]
    for i, fire in enumerate(changes):
        node.state = f"s{i}"
        fire()
        clock.advance(1)
    assert [s["state"] for s in statuses(request)] == ["running", "s0", "s1", "s2"]


def test_status_is_rechecked_while_someone_watches(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    node.state = "quietly changed"
    clock.advance(console.REFRESH_S)
    assert statuses(request)[-1]["state"] == "quietly changed"


def test_keep_alive_comments_between_events(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    clock.advance(console.KEEPALIVE_S)
    assert events(request)[-1] == ("comment", "keep-alive")
    clock.advance(console.KEEPALIVE_S)
    assert [e for e in events(request) if e[0] == "comment"] == [("comment", "keep-alive")] * 2


def test_a_client_that_goes_away_is_dropped_and_the_timers_stop(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    other = open_stream(feed)
    request.processingFailed(Failure(ConnectionError("gone")))
    assert feed.clients == [other]
    other.processingFailed(Failure(ConnectionError("gone")))
    assert feed.clients == []
    assert clock.getDelayedCalls() == []
    written = len(request.written)
    feed.changed()
    clock.advance(console.KEEPALIVE_S * 2)
    assert len(request.written) == written


def test_streams_beyond_the_limit_get_503(node, clock):
    feed = make_feed(node, clock, max_clients=2)
    open_stream(feed)
    open_stream(feed)
    c = console.Console(node, make_config(), reactor=clock, feed=feed)
    r = StubTreq(c.root).get("http://127.0.0.1:3131/api/events").result
    assert r.code == 503
    assert r.headers.getRawHeaders(b"retry-after") == [b"10"]


def test_stop_ends_every_stream(node, clock):
    feed = make_feed(node, clock)
    request = open_stream(feed)
    feed.stop()
    assert request.finished == 1
    assert feed.clients == [] and clock.getDelayedCalls() == []
    assert not feed.add_client(DummyRequest([]))


# -- the chat proxy --------------------------------------------------------------------------


class FakeTransport:
    def __init__(self):
        self.stopped = False

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        self.stopped = True


class FakeResponse:
    def __init__(self, code, headers, chunks, end=True):
        self.code = code
        self.headers = Headers(headers)
        self.chunks = chunks
        self.end = end
        self.transport = FakeTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        for c in self.chunks:
            protocol.dataReceived(c)
        if self.end:
            protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    def __init__(self, response=None):
        self.requests = []
        self.response = response
        self.d = None

    def request(self, method, uri, headers=None, body=None):
        self.requests.append((method, uri, headers))
        self.d = defer.Deferred()
        if self.response is not None:
            self.d.callback(self.response)
        return self.d


class ProxiedRequest(DummyRequest):
    """DummyRequest loops on a registered producer; a real Request just remembers it."""

    producer = None

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def chat_request(body=b'{"model":"tiny","stream":true}', headers=None):
    request = ProxiedRequest([b"chat", b"completions"])
    request.method = b"POST"
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:3131"])
    for k, v in (headers or {}).items():
        request.requestHeaders.setRawHeaders(k, [v])
    from io import BytesIO

    request.content = BytesIO(body)
    return request


def render(c, request):
    result = c.root.children[b"v1"].render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request


def test_chat_is_forwarded_to_the_local_api_and_streamed_back(node, clock):
    sse = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
    agent = FakeAgent(FakeResponse(200, {b"content-type": [b"text/event-stream"]}, sse))
    c = console.Console(node, make_config(api_listen="0.0.0.0:9400"), reactor=clock,
                        feed=make_feed(node, clock), agent=agent)
    request = render(c, chat_request())
    method, uri, headers = agent.requests[0]
    assert (method, uri) == (b"POST", b"http://127.0.0.1:9400/v1/chat/completions")
    assert not headers.hasHeader(b"authorization")  # the console adds no key of its own
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert b"".join(request.written) == b"".join(sse)
    assert request.finished == 1


def test_chat_passes_the_browsers_api_key_through(node, clock):
    agent = FakeAgent(FakeResponse(200, {b"content-type": [b"application/json"]}, [b"{}"]))
    c = console.Console(node, make_config(api_key="sekrit"), reactor=clock,
                        feed=make_feed(node, clock), agent=agent)
    request = render(c, chat_request(headers={b"authorization": b"Bearer sekrit"}))
    assert agent.requests[0][2].getRawHeaders(b"authorization") == [b"Bearer sekrit"]
    assert request.responseCode == 200


def test_chat_with_a_wrong_api_key_is_refused_by_the_console_itself(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(api_key="sekrit"), reactor=clock,
                        feed=make_feed(node, clock), agent=agent)
    request = render(c, chat_request(headers={b"authorization": b"Bearer guess"}))
    assert request.responseCode == 401
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    assert json.loads(b"".join(request.written))["error"]["code"] == "invalid_api_key"
    assert agent.requests == []


@pytest.mark.parametrize("body", [b"{nope", b"[" * 50_000, b"\xff\xfe", b""])
def test_chat_with_a_body_that_is_not_json_is_refused_by_the_console_itself(node, clock, body):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    request = render(c, chat_request(body))
    assert request.responseCode == 400
    err = json.loads(b"".join(request.written))["error"]
    assert err["code"] == "invalid_json" and "not valid JSON" in err["message"]
    assert agent.requests == []  # no connection to the API for it


def test_a_browser_that_goes_away_stops_the_upstream(node, clock):
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]}, [b"data: 1\n\n"],
                            end=False)
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=FakeAgent(response))
    request = render(c, chat_request())
    assert request.producer is response.transport  # a paused browser pauses the API
    request.processingFailed(Failure(ConnectionError("gone")))
    assert response.transport.stopped
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert request.finished == 0  # never finish a request whose connection is gone


def test_a_browser_gone_before_the_api_answered_cancels_the_request(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    request = render(c, chat_request())
    request.processingFailed(Failure(ConnectionError("gone")))
    assert agent.d.called  # cancelled
    agent.d.addErrback(lambda _: None)


def test_an_unreachable_api_is_a_502(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    request = render(c, chat_request())
    agent.d.errback(ConnectionRefusedError("refused"))
    assert request.responseCode == 502
    assert json.loads(b"".join(request.written))["error"]["code"] == "api_unreachable"


@pytest.mark.parametrize("headers,code", [
    ({b"content-type": b"text/plain"}, 415),
    ({b"origin": b"http://evil.example"}, 403),
])
def test_chat_refuses_what_another_web_page_could_send(node, clock, headers, code):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    request = render(c, chat_request(headers=headers))
    assert request.responseCode == code
    assert agent.requests == []


def test_chat_from_the_consoles_own_origin_is_forwarded(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    render(c, chat_request(headers={b"origin": b"http://127.0.0.1:3131"}))
    assert len(agent.requests) == 1


def test_chat_is_off_on_a_network_console_when_the_api_has_no_key(node, clock):
    config = make_config(console_listen="0.0.0.0:3131")
    feed = make_feed(node, clock, config=config)
    assert feed.status()["console"]["chat"] is False
    agent = FakeAgent()
    c = console.Console(node, config, reactor=clock, feed=feed, agent=agent)
    request = render(c, chat_request())
    assert request.responseCode == 403
    assert agent.requests == []


def test_chat_is_on_for_a_network_console_when_the_api_has_a_key(node, clock):
    config = make_config(console_listen="0.0.0.0:3131", api_key="k")
    assert console.chat_policy(config) == (True, None)
    assert make_feed(node, clock, config=config).status()["console"]["api_key_required"]


def test_ipv6_api_address_is_bracketed(node, clock):
    c = console.Console(node, make_config(api_listen="[::]:9337"), reactor=clock,
                        feed=make_feed(node, clock), agent=FakeAgent())
    assert c.api_url(b"/v1/models") == b"http://[::1]:9337/v1/models"


# -- the body is checked before it is read --------------------------------------------------


def exchange(c, data: bytes):
    """Bytes into the console's Site over an in-memory transport: (transport, channel)."""
    from twisted.internet.testing import StringTransport

    channel = c.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport, channel


def _chat_head(extra: bytes, host: bytes = b"127.0.0.1:3131") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host
            + b"\r\nContent-Type: application/json\r\n" + extra)


def _answer(transport) -> tuple[bytes, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, json.loads(body)


GIB_HEAD = b"Content-Length: %d\r\n\r\n" % (1 << 30)


def test_an_unauthenticated_gigabyte_post_is_refused_401_before_it_is_read(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(api_key="sekrit"), reactor=clock,
                        feed=make_feed(node, clock), agent=agent)
    transport, channel = exchange(c, _chat_head(GIB_HEAD) + b"x" * 200_000)
    head, body = _answer(transport)
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"WWW-Authenticate: Bearer" in head
    assert body["error"]["code"] == "invalid_api_key"
    assert channel.requests[0].content.getvalue() == b""  # nothing kept, in memory or on disk
    assert agent.requests == []
    clock.advance(10)
    assert transport.disconnecting


def test_a_gigabyte_post_is_refused_413_before_it_is_read(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    transport, channel = exchange(c, _chat_head(GIB_HEAD) + b"x" * 200_000)
    head, body = _answer(transport)
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert body["error"]["code"] == "body_too_large"
    assert channel.requests[0].content.getvalue() == b""
    assert agent.requests == []


def test_a_chunked_post_is_cut_off_at_the_bound_with_413(node, clock):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    piece = b"z" * 65536
    data = _chat_head(b"Transfer-Encoding: chunked\r\n\r\n")
    data += b"%x\r\n%s\r\n" % (len(piece), piece) * (console.MAX_CHAT_BODY_BYTES // len(piece) + 4)
    transport, channel = exchange(c, data)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert len(channel.requests[0].content.getvalue()) <= console.MAX_CHAT_BODY_BYTES
    assert agent.requests == []


@pytest.mark.parametrize("extra, host, status", [
    (b"Origin: http://evil.example\r\n", b"127.0.0.1:3131", 403),
    (b"", b"evil.example", 421),
])
def test_a_post_another_web_page_could_send_is_refused_before_its_body(node, clock, extra,
                                                                       host, status):
    agent = FakeAgent()
    c = console.Console(node, make_config(), reactor=clock, feed=make_feed(node, clock),
                        agent=agent)
    transport, channel = exchange(c, _chat_head(extra + GIB_HEAD, host=host))
    assert transport.value().startswith(b"HTTP/1.1 %d " % status), transport.value()[:80]
    assert channel.requests[0].content.getvalue() == b""
    assert agent.requests == []


def test_a_post_within_the_bound_is_forwarded_through_the_site(node, clock):
    sse = [b"data: [DONE]\n\n"]
    agent = FakeAgent(FakeResponse(200, {b"content-type": [b"text/event-stream"]}, sse))
    c = console.Console(node, make_config(api_key="sekrit"), reactor=clock,
                        feed=make_feed(node, clock), agent=agent)
    body = b'{"model":"tiny","stream":true}'
    transport, _ = exchange(c, _chat_head(b"Authorization: Bearer sekrit\r\n"
                                          b"Content-Length: %d\r\n\r\n" % len(body)) + body)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert agent.requests[0][:2] == (b"POST", b"http://127.0.0.1:9337/v1/chat/completions")
