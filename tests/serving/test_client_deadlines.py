"""Deadlines on the client side: slowloris heads and bodies, and clients that stop reading.

In memory (StringTransport, a Clock): twisted.web's idle timeout restarts on every
byte, so a head sent one byte a second would never be cut; these deadlines count
from the head's first byte and the head's end.  A client that stops reading pauses
the upstream (backpressure); past ``client_stall_timeout_s`` the upstream is closed
so llama-server stops generating.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource

from meshd.config import ApiConfig
from meshd.httpbounds import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_HEADERS, BoundedSite
from meshd.states import ForwardState
from tests.serving.test_api import SSE_HEAD, chat, memory_api, send_stream_request, sse

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def body_and_head(doc=None) -> tuple[bytes, bytes]:
    body = json.dumps(doc if doc is not None else chat()).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head, body


def trickle(channel, clock: Clock, data: bytes, every: float = 1.0) -> None:
    for i in range(len(data)):
        channel.dataReceived(data[i:i + 1])
        clock.advance(every)


def error_of(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"Connection: close" in head
    return json.loads(body)


def test_defaults():
    config = ApiConfig()
    assert (config.head_timeout_s, config.body_timeout_s) == (HEAD_TIMEOUT_S, BODY_TIMEOUT_S)
    assert (HEAD_TIMEOUT_S, BODY_TIMEOUT_S, config.client_stall_timeout_s) == (10.0, 60.0, 60.0)


def test_a_request_with_more_headers_than_the_bound_is_refused_before_any_more_are_parsed():
    def health_with(n: int) -> bytes:
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(n - 1))
        return b"GET /health HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"

    assert MAX_HEADERS == 100
    *_, channel, client = memory_api()
    channel.dataReceived(health_with(MAX_HEADERS))
    assert client.value().startswith(b"HTTP/1.1 200 ")
    *_, channel, client = memory_api()
    channel.dataReceived(health_with(MAX_HEADERS + 1))
    assert client.value().startswith(b"HTTP/1.1 400 ") and client.disconnecting


# -- slowloris ---------------------------------------------------------------------------------


def test_a_head_sent_one_byte_a_second_is_cut_at_the_head_deadline():
    api, router, clock, ups, channel, client = memory_api(head_timeout_s=10)
    head, _ = body_and_head()
    trickle(channel, clock, head[:9])
    assert client.value() == b"" and not client.disconnecting  # 9 s: not yet
    trickle(channel, clock, head[9:10])
    err = error_of(client.value(), 408)["error"]  # OpenAI's shape: the API's door
    assert err["code"] == "request_timeout" and "[api] head_timeout_s" in err["message"]
    assert client.disconnecting and api.in_flight == 0 and ups.connections == []
    assert api.metrics.requests == {("", 408): 1}
    channel.dataReceived(head[10:])  # nothing more is read
    assert ups.connections == []
    clock.advance(15)  # a client that does not read its 408 is dropped
    assert client.disconnected


def test_a_head_completed_within_its_deadline_is_served():
    api, router, clock, ups, channel, client = memory_api(head_timeout_s=10)
    trickle(channel, clock, HEALTH[:-1], every=9.5 / len(HEALTH))
    channel.dataReceived(HEALTH[-1:])
    assert client.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(100)
    assert b"408" not in client.value().split(b"\r\n")[0]
    assert b" 408 " not in client.value()


def test_a_body_trickling_is_cut_at_the_body_deadline():
    api, router, clock, ups, channel, client = memory_api(body_timeout_s=60)
    head, body = body_and_head()
    channel.dataReceived(head)
    clock.advance(5)  # the body's deadline counts from the head's end, not the first byte
    trickle(channel, clock, body[:54])
    assert client.value() == b""
    trickle(channel, clock, body[54:56])
    err = error_of(client.value(), 408)["error"]
    assert err["code"] == "request_timeout" and "[api] body_timeout_s" in err["message"]
    assert client.disconnecting and ups.connections == []


def test_a_fast_request_is_never_cut():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    clock.advance(100)  # past both deadlines: the request was read whole long ago
    upstream.dataReceived(sse(1) + b"0\r\n\r\n")
    out = client.value()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"0\r\n\r\n")
    assert b"408" not in out and not client.disconnecting


def test_a_keep_alive_second_request_gets_its_own_head_deadline():
    api, router, clock, ups, channel, client = memory_api(head_timeout_s=10)
    channel.dataReceived(HEALTH)
    assert client.value().startswith(b"HTTP/1.1 200 ")
    client.clear()
    clock.advance(30)  # quiet keep-alive: twisted.web's idle timeout's, not the head's
    assert not client.disconnecting
    trickle(channel, clock, HEALTH[:9])  # the second head starts its deadline now
    assert client.value() == b"" and not client.disconnecting
    channel.dataReceived(HEALTH[9:])
    assert client.value().startswith(b"HTTP/1.1 200 ")
    client.clear()
    trickle(channel, clock, HEALTH[:10])  # a third, trickled past its own deadline
    assert error_of(client.value(), 408)["error"]["code"] == "request_timeout"


def test_a_blank_line_after_a_body_starts_no_head_deadline():
    api, router, clock, ups, channel, client = memory_api(head_timeout_s=10)
    channel.dataReceived(HEALTH)
    client.clear()
    channel.dataReceived(b"\r\n")  # what some clients send after a request
    clock.advance(30)
    assert client.value() == b"" and not client.disconnecting
    channel.dataReceived(HEALTH)
    assert client.value().startswith(b"HTTP/1.1 200 ")


def test_pipelined_requests_are_not_cut():
    api, router, clock, ups, channel, client = memory_api(head_timeout_s=10)
    send_stream_request(channel)
    channel.dataReceived(HEALTH)  # buffered while the stream runs
    clock.advance(50)
    ups.connections[0].dataReceived(SSE_HEAD + sse(0) + b"0\r\n\r\n")
    out = client.value()
    assert out.count(b"HTTP/1.1 200 ") == 2 and b" 408 " not in out


class _Hello(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


def test_every_bounded_site_has_the_same_deadlines():
    # the console and the control socket are BoundedSites with the defaults
    clock = Clock()
    site = BoundedSite(_Hello(), max_body_bytes=1024, what="test", reactor=clock,
                       error_body=lambda s, m, c: json.dumps({"error": m, "code": c}).encode())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(client)
    trickle(channel, clock, HEALTH[:int(HEAD_TIMEOUT_S)])
    err = error_of(client.value(), 408)
    assert err["code"] == "request_timeout" and "head deadline" in err["error"]
    assert client.disconnecting


# -- a client that stops reading ---------------------------------------------------------------


def test_a_stalled_readers_upstream_is_aborted_after_the_stall_timeout_and_not_before():
    api, router, clock, ups, channel, client = memory_api(client_stall_timeout_s=60,
                                                          stream_idle_timeout_s=1000)
    send_stream_request(channel)
    (fwd,) = api.forwards
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.pauseProducing()  # our client's socket buffer is full
    assert upstream.paused
    clock.advance(59)
    assert not upstream.transport.disconnected and not client.disconnected
    clock.advance(1)
    assert upstream.transport.disconnected  # llama-server sees its client go: it stops
    assert client.disconnected  # aborted: its buffer would never drain
    assert fwd.state is ForwardState.DONE and api.in_flight == 0
    assert router.finished and api.metrics.requests == {("m", 499): 1}


def test_a_reader_that_resumes_in_time_is_not_cut():
    api, router, clock, ups, channel, client = memory_api(client_stall_timeout_s=60,
                                                          stream_idle_timeout_s=1000)
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    for _ in range(3):  # each pause gets the whole timeout again
        channel.pauseProducing()
        clock.advance(59)
        channel.resumeProducing()
        upstream.dataReceived(sse(1))
    clock.advance(900)  # long after the last pause: no stall deadline left behind
    assert not upstream.transport.disconnected and not client.disconnected
    upstream.dataReceived(b"0\r\n\r\n")
    assert client.value().endswith(b"0\r\n\r\n")
    assert api.metrics.requests == {("m", 200): 1}


def test_a_stream_that_ends_while_paused_leaves_no_stall_deadline():
    api, router, clock, ups, channel, client = memory_api(client_stall_timeout_s=60)
    send_stream_request(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.pauseProducing()
    upstream.dataReceived(b"0\r\n\r\n")  # the whole answer is in our client's buffer
    clock.advance(120)
    assert not client.disconnected and api.metrics.requests == {("m", 200): 1}



def test_a_client_that_goes_away_while_paused_leaves_no_deadline_behind():
    api, router, clock, ups, channel, client = memory_api()
    send_stream_request(channel)
    (fwd,) = api.forwards
    ups.connections[0].dataReceived(SSE_HEAD + sse(0))
    channel.pauseProducing()
    assert fwd.stall is not None
    channel.connectionLost(Failure(ConnectionDone()))
    assert fwd.stall is None and fwd.state is ForwardState.DONE
    assert clock.getDelayedCalls() == []
