"""A chunked upstream body passed to the client in its own framing (issue 13, part 5).

The decoder's ``frame`` must hand on the upstream's bytes with only the size
lines parsed, whatever the read boundaries, always ending on a chunk
boundary; the API must use it only for clients that read chunked framing and
keep everything else (the error event, HTTP/1.0, HEAD, holding, backpressure,
keep-alive, metrics) as it was.  In memory: StringTransport on both sides.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from meshd.serving import api as api_module
from meshd.serving.proxy import ChunkedDecoder, UpstreamError
from tests.serving.test_api import SSE_HEAD, chat, memory_api, sse

WIRE = (b"5\r\nhello\r\n7;ext=1\r\n, world\r\n1\r\n!\r\n"
        + sse(0) + b"0\r\nTrailer: x\r\n\r\n")
PAYLOAD = b'hello, world!data: {"n": 0}\n\n'


def at_boundary(client: ChunkedDecoder) -> bool:
    """Whether a client decoding what was written so far stands between two chunks."""
    return not (client._left or client._crlf or client._line)


def frame_all(parts: list[bytes], switch_at: int = 0) -> tuple[bytes, int, ChunkedDecoder]:
    """Feed ``parts`` (decoded for the first ``switch_at``, framed after); what a client
    reading it all decodes, the payload count, and the decoder."""
    dec, client = ChunkedDecoder(), ChunkedDecoder()
    got, counted = b"", 0
    for i, part in enumerate(parts):
        if i < switch_at:
            payload = dec.feed(part)
            counted += len(payload)
            written = b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""
        else:
            pieces, n = dec.frame(part)
            counted += n
            written = b"".join(pieces)
        got += client.feed(written)
        assert at_boundary(client), (parts, i)
    return got, counted, dec


# -- the decoder's frame ----------------------------------------------------------------------


def test_whole_chunks_in_one_read_are_passed_as_the_same_bytes_less_the_last_chunk():
    dec = ChunkedDecoder()
    pieces, n = dec.frame(WIRE)
    assert pieces == [WIRE[: WIRE.index(b"0\r\nTrailer")]]
    assert n == len(PAYLOAD) and dec.done


def test_a_read_of_whole_chunks_only_is_handed_on_as_it_is_not_copied():
    body = sse(0) + sse(1)
    pieces, _ = ChunkedDecoder().frame(body)
    assert pieces[0] is body


def test_chunk_boundaries_split_anywhere_across_two_or_three_reads():
    for a in range(1, len(WIRE)):
        got, n, dec = frame_all([WIRE[:a], WIRE[a:]])
        assert got == PAYLOAD and n == len(PAYLOAD) and dec.done, a
        for b in range(a + 1, len(WIRE), 3):
            got, n, dec = frame_all([WIRE[:a], WIRE[a:b], WIRE[b:]])
            assert got == PAYLOAD and n == len(PAYLOAD) and dec.done, (a, b)


def test_one_byte_reads():
    got, n, dec = frame_all([WIRE[i : i + 1] for i in range(len(WIRE))])
    assert got == PAYLOAD and n == len(PAYLOAD) and dec.done


def test_a_body_decoded_at_first_can_be_framed_from_any_point_on():
    # a held answer that grew past HOLD_BYTES switches mid-body, even mid-chunk
    for a in range(1, len(WIRE)):
        got, n, dec = frame_all([WIRE[:a], WIRE[a:]], switch_at=1)
        assert got == PAYLOAD and n == len(PAYLOAD) and dec.done, a


def test_bad_framing_is_an_upstream_error_in_frame_too():
    with pytest.raises(UpstreamError, match="bad chunk size"):
        ChunkedDecoder().frame(b"zz\r\nhello\r\n")
    with pytest.raises(UpstreamError, match="negative"):
        ChunkedDecoder().frame(b"-5\r\nhello\r\n")
    with pytest.raises(UpstreamError, match="after the end"):
        ChunkedDecoder().frame(b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamError, match="too long"):
        ChunkedDecoder().frame(b"1" * 5000)


# -- through the API ----------------------------------------------------------------------------


def start_stream(channel, version: bytes = b"HTTP/1.1", method: bytes = b"POST") -> None:
    body = json.dumps(chat(stream=True)).encode()
    channel.dataReceived(b"%s /v1/chat/completions %s\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (method, version, len(body), body))


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    return head, body


def test_the_client_gets_the_upstreams_chunks_byte_for_byte():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1))
    head, body = split_response(client.value())
    assert b"Transfer-Encoding: chunked" in head
    assert body == sse(0) + sse(1)  # not one chunk of their payloads
    upstream.dataReceived(sse(2) + b"0\r\n\r\n")
    assert client.value().endswith(sse(1) + sse(2) + b"0\r\n\r\n")
    assert api.in_flight == 0


def test_a_chunk_split_across_reads_reaches_the_client_as_chunks_of_its_own():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    whole = sse(1)
    upstream.dataReceived(SSE_HEAD + sse(0) + whole[:9])
    reader = ChunkedDecoder()
    got = reader.feed(split_response(client.value())[1])
    assert at_boundary(reader)  # what came of the split chunk is a whole chunk already
    client.clear()
    upstream.dataReceived(whole[9:] + b"0\r\n\r\n")
    got += reader.feed(client.value())
    assert got == b'data: {"n": 0}\n\ndata: {"n": 1}\n\n' and reader.done


def test_a_stream_broken_mid_chunk_ends_with_the_error_event_in_valid_framing():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1)[:12])
    upstream.connectionLost(Failure(ConnectionLost("backend died")))
    reader = ChunkedDecoder()
    text = reader.feed(split_response(client.value())[1])
    assert reader.done  # the client's body ends properly: a last chunk after the event
    partial = sse(1)[len(b"12\r\n") : 12]
    assert text.startswith(b'data: {"n": 0}\n\n' + partial + b"\n\nevent: error\ndata: ")
    event = json.loads(text.rsplit(b"data: ", 1)[1])
    assert event["error"]["code"] == "upstream_error"
    assert client.disconnecting  # the connection closes after a broken stream
    assert api.metrics.requests == {("m", 502): 1}


def test_a_stream_broken_right_after_a_size_line_ends_the_same_way():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + b"12\r\n")
    upstream.connectionLost(Failure(ConnectionLost("backend died")))
    reader = ChunkedDecoder()
    text = reader.feed(split_response(client.value())[1])
    assert reader.done
    assert text.startswith(b'data: {"n": 0}\n\n\n\nevent: error\ndata: ')


def test_an_http10_client_gets_the_body_decoded():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel, version=b"HTTP/1.0")
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1)[:9])
    upstream.dataReceived(sse(1)[9:] + b"0\r\n\r\n")
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.0 200 ") and b"chunked" not in head.lower()
    assert body == b'data: {"n": 0}\n\ndata: {"n": 1}\n\n'
    assert client.disconnecting  # an HTTP/1.0 body ends with the connection


def test_head_on_a_routed_path_is_405_without_a_body_and_no_upstream_is_asked():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel, method=b"HEAD")
    head, body = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 405 ") and body == b""
    assert ups.connections == []


def test_backpressure_pauses_and_resumes_the_upstream_of_a_passed_through_stream():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.pauseProducing()
    assert upstream.transport.producerState == "paused"
    channel.resumeProducing()
    assert upstream.transport.producerState == "producing"
    upstream.dataReceived(sse(1) + b"0\r\n\r\n")
    assert split_response(client.value())[1] == sse(0) + sse(1) + b"0\r\n\r\n"


def test_a_client_gone_mid_stream_gets_no_more_writes_and_the_upstream_is_closed():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0))
    channel.connectionLost(Failure(ConnectionLost("client went away")))
    assert upstream.transport.disconnected
    upstream.dataReceived(sse(1))  # bytes already in flight: dropped, nothing raised
    assert sse(1) not in client.value()
    assert api.in_flight == 0


def test_the_connection_is_kept_alive_and_bytes_counted_after_a_passed_through_stream():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1) + b"0\r\n\r\n")
    assert api.pool.idle_count("mem") == 1 and not client.disconnecting
    assert api.metrics.response_bytes == 2 * len(b'data: {"n": 0}\n\n')
    client.clear()
    start_stream(channel)  # the same client connection, the same upstream connection
    assert len(ups.connections) == 1
    upstream.dataReceived(SSE_HEAD + sse(5) + b"0\r\n\r\n")
    assert split_response(client.value())[1] == sse(5) + b"0\r\n\r\n"


def test_a_held_chunked_answer_that_grows_past_the_hold_limit_is_framed_from_then_on(monkeypatch):
    monkeypatch.setattr(api_module, "HOLD_BYTES", 20)
    api, router, clock, ups, channel, client = memory_api()
    body = json.dumps(chat()).encode()
    channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    upstream = ups.connections[0]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + b"10\r\n" + b"a" * 16 + b"\r\n")
    assert client.value() == b""  # held: 16 bytes are under the limit
    upstream.dataReceived(b"10\r\n" + b"b" * 16 + b"\r\n10\r\n" + b"c" * 8)
    reader = ChunkedDecoder()
    got = reader.feed(split_response(client.value())[1])
    assert got == b"a" * 16 + b"b" * 16 + b"c" * 8 and at_boundary(reader)
    client.clear()
    upstream.dataReceived(b"c" * 8 + b"\r\n" + b"4\r\ndddd\r\n0\r\n\r\n")
    assert client.value() == b"8\r\n" + b"c" * 8 + b"\r\n" + b"4\r\ndddd\r\n" + b"0\r\n\r\n"
    assert api.metrics.response_bytes == 52


def test_a_small_error_body_is_still_held_and_reshaped_on_an_anthropic_path():
    api, router, clock, ups, channel, client = memory_api()
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": []}).encode()
    channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    error = json.dumps({"error": {"code": 500, "message": "boom", "type": "server_error"}})
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(error), error.encode())
    ups.connections[0].dataReceived(b"HTTP/1.1 500 Internal Server Error\r\n"
                                    b"Content-Type: application/json\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    head, answer = split_response(client.value())
    assert head.startswith(b"HTTP/1.1 500 ") and b"Content-Length" in head
    doc = json.loads(answer)
    assert doc["type"] == "error" and doc["error"]["message"] == "boom"


def test_the_served_by_headers_are_on_a_passed_through_stream():
    api, router, clock, ups, channel, client = memory_api()
    start_stream(channel)
    ups.connections[0].dataReceived(SSE_HEAD + sse(0))
    head, _ = split_response(client.value())
    assert b"X-Meshd-Node: mem" in head and b"X-Meshd-Model: m" in head

