"""The API's deadlines on an upstream: first response byte, and silence once it began.

In memory (StringTransport both sides, a Clock): an upstream that accepted the
request and says nothing is the test's doing, exactly, with no waiting.  Why these
deadlines are long and last resorts: see ``meshd.serving.api`` (a hung llama-server
is found by its /health first).
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from meshd.config import ApiConfig
from meshd.serving.api import ApiServer
from meshd.serving.routing import Upstream
from meshd.states import ForwardState
from tests.serving.test_api import (
    SSE_HEAD,
    MemoryUpstreams,
    Router,
    chat,
    memory_api,
    send_stream_request,
    sse,
)

FIRST_BYTE_S = 300.0  # the defaults
IDLE_S = 120.0
JSON_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def client_channel(api: ApiServer):
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    return channel, client


def post(channel, path: bytes = b"/v1/chat/completions", doc=None) -> None:
    body = json.dumps(doc if doc is not None else chat()).encode()
    channel.dataReceived(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)


def two_upstreams(**config):
    clock = Clock()
    first, second = MemoryUpstreams(), MemoryUpstreams()
    router = Router({"m": [Upstream(name="a", endpoint=first.endpoint, pool_key="a"),
                           Upstream(name="b", endpoint=second.endpoint, pool_key="b")]})
    api = ApiServer(router, ApiConfig(**config), reactor=clock)
    return api, router, clock, first, second


def error_of(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    return json.loads(body)


def test_defaults_are_long_last_resorts():
    config = ApiConfig()
    assert (config.first_byte_timeout_s, config.stream_idle_timeout_s) == (FIRST_BYTE_S, IDLE_S)


# -- before the first byte -------------------------------------------------------------------


def test_an_upstream_silent_past_the_first_byte_deadline_fails_over_to_the_next():
    api, router, clock, first, second = two_upstreams()
    channel, client = client_channel(api)
    post(channel)
    (silent,) = first.connections
    clock.advance(FIRST_BYTE_S - 1)
    assert second.connections == [] and not silent.transport.disconnected
    clock.advance(1)
    assert silent.transport.disconnected  # abandoned, not left holding a slot
    assert [name for name, _ in router.failed] == ["a"]
    assert "first_byte_timeout_s" in router.failed[0][1]
    (answering,) = second.connections
    assert answering.transport.value().startswith(b"POST /v1/chat/completions ")
    answering.dataReceived(JSON_OK)
    assert client.value().startswith(b"HTTP/1.1 200 ")
    assert b"X-Meshd-Node: b" in client.value()
    assert api.metrics.failovers == 1 and api.in_flight == 0


def test_the_failover_gets_a_first_byte_deadline_of_its_own_and_then_504():
    api, router, clock, first, second = two_upstreams(first_byte_timeout_s=5)
    channel, client = client_channel(api)
    post(channel)
    clock.advance(5)
    assert len(second.connections) == 1 and client.value() == b""
    clock.advance(5)
    err = error_of(client.value(), 504)["error"]
    assert err["code"] == "upstream_timeout" and err["type"] == "server_error"
    assert "did not answer" in err["message"] and "first_byte_timeout_s" in err["message"]
    assert second.connections[0].transport.disconnected
    assert api.in_flight == 0 and router.started == router.finished == ["a", "b"]
    assert api.metrics.requests == {("m", 504): 1}


def test_a_lone_silent_upstream_is_a_504_in_anthropics_shape_on_v1_messages():
    api, router, clock, ups, channel, client = memory_api(first_byte_timeout_s=5)
    post(channel, b"/v1/messages", chat(max_tokens=5))
    clock.advance(5)
    body = error_of(client.value(), 504)
    assert body["type"] == "error" and body["error"]["type"] == "timeout_error"
    assert "first_byte_timeout_s" in body["error"]["message"]


def test_a_relay_hangs_up_on_a_silent_upstream_so_the_requesting_node_fails_over():
    clock = Clock()
    ups = MemoryUpstreams()
    router = Router({"m": [Upstream(name="mem", endpoint=ups.endpoint, pool_key="mem")]})
    api = ApiServer(router, ApiConfig(first_byte_timeout_s=5), reactor=clock, relay=True)
    channel, client = client_channel(api)
    post(channel)
    clock.advance(5)
    assert client.value() == b"" and client.disconnecting
    assert api.in_flight == 0


def test_an_answer_within_the_deadline_is_not_cut_and_leaves_no_timer_behind():
    api, router, clock, ups, channel, client = memory_api(first_byte_timeout_s=5)
    post(channel)
    (fwd,) = api.forwards
    clock.advance(4.9)
    ups.connections[0].dataReceived(JSON_OK)
    assert client.value().startswith(b"HTTP/1.1 200 ")
    assert fwd.deadline is None
    clock.advance(1000)
    assert router.failed == []


def test_64_requests_queued_for_a_slot_within_the_deadline_all_get_their_stream():
    # llama-server sends nothing until a slot takes the request: a queue looks like
    # silence, and must not be cut while it is shorter than the deadline
    api, router, clock, ups, channel, client = memory_api()
    clients = [client_channel(api) for _ in range(64)]
    for ch, _ in clients:
        send_stream_request(ch)
    assert len(ups.connections) == 64
    for i, upstream in enumerate(ups.connections):
        clock.advance((FIRST_BYTE_S - 1) / 64)  # the queue drains one by one, the last at 299 s
        upstream.dataReceived(SSE_HEAD + sse(i) + b"0\r\n\r\n")
    for i, (_, cl) in enumerate(clients):
        assert cl.value().startswith(b"HTTP/1.1 200 "), i
        assert b'data: {"n": %d}' % i in cl.value() and b"event: error" not in cl.value()
    assert router.failed == [] and api.in_flight == 0
    assert api.metrics.requests == {("m", 200): 64}


# -- after the first byte ---------------------------------------------------------------------


def test_a_stream_silent_past_the_idle_deadline_ends_with_the_sse_error_event():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    (fwd,) = api.forwards
    for i in range(1, 4):  # chunks keep coming: each restarts the count
        clock.advance(IDLE_S - 1)
        upstream.dataReceived(sse(i))
    assert fwd.state is ForwardState.STREAMING
    clock.advance(IDLE_S - 1)
    assert b"event: error" not in client.value()
    clock.advance(1)
    out = client.value()
    assert b'data: {"n": 3}' in out
    event = out[out.index(b"event: error\ndata: ") + len(b"event: error\ndata: "):]
    event = event[: event.index(b"\n\n")]
    err = json.loads(event)["error"]
    assert err["code"] == "upstream_timeout" and "stream_idle_timeout_s" in err["message"]
    assert out.endswith(b"0\r\n\r\n")  # the body ended cleanly after the event
    assert upstream.transport.disconnected
    assert fwd.state is ForwardState.DONE and api.in_flight == 0
    assert router.failed == []  # a stream that began is never retried
    assert api.metrics.requests == {("m", 504): 1}


def test_a_held_answer_whose_body_goes_silent_is_a_clean_504():
    api, router, clock, ups, channel, client = memory_api(stream_idle_timeout_s=10)
    post(channel)
    ups.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 10\r\n\r\n{\"a\"")
    clock.advance(10)
    err = error_of(client.value(), 504)["error"]
    assert err["code"] == "upstream_timeout"
    assert ups.connections[0].transport.disconnected and api.in_flight == 0


def test_a_partial_head_then_silence_is_a_504_not_a_retry():
    api, router, clock, first, second = two_upstreams(first_byte_timeout_s=5)
    channel, client = client_channel(api)
    post(channel)
    first.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
    clock.advance(5)
    assert error_of(client.value(), 504)["error"]["code"] == "upstream_timeout"
    assert second.connections == [] and router.failed == []


def test_silence_while_our_client_is_not_reading_is_not_the_upstreams():
    api, router, clock, ups, channel, client = memory_api(stream_idle_timeout_s=10,
                                                          client_stall_timeout_s=1000)
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.pauseProducing()  # our client's socket buffer is full
    for _ in range(10):
        clock.advance(10)
    assert b"event: error" not in client.value() and not upstream.transport.disconnected
    channel.resumeProducing()
    clock.advance(9)
    upstream.dataReceived(sse(1) + b"0\r\n\r\n")
    assert client.value().endswith(b"0\r\n\r\n") and b"event: error" not in client.value()
    assert api.metrics.requests == {("m", 200): 1}


def test_a_client_that_goes_away_cancels_the_deadline():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    (fwd,) = api.forwards
    ups.connections[0].dataReceived(SSE_HEAD + sse(0))
    assert fwd.deadline is not None and fwd.deadline.active()
    channel.connectionLost(Failure(ConnectionDone()))
    assert fwd.deadline is None and fwd.state is ForwardState.DONE
