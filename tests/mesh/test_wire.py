"""The frame parser alone: round trips, limits, and garbage that never escapes as anything
but FrameError."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.mesh import wire


def feed_all(decoder, chunks):
    frames = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


def test_one_frame_round_trips():
    data = wire.encode(wire.FrameType.ANNOUNCE, b'{"a":1}')
    assert feed_all(wire.Decoder(), [data]) == [wire.Frame(wire.FrameType.ANNOUNCE, b'{"a":1}')]


def test_frame_split_across_reads_is_reassembled():
    data = wire.encode(7, b"x" * 100)
    frames = feed_all(wire.Decoder(), [data[i : i + 1] for i in range(len(data))])
    assert frames == [wire.Frame(7, b"x" * 100)]


def test_oversized_announced_length_is_refused_before_buffering():
    decoder = wire.Decoder(max_frame_bytes=4096)
    with pytest.raises(wire.FrameTooLarge):
        list(decoder.feed(wire.LENGTH.pack(4097)))
    assert decoder.buffered == 4


def test_zero_length_frame_is_an_error():
    with pytest.raises(wire.FrameError):
        list(wire.Decoder().feed(b"\0\0\0\0"))


def test_decoder_stays_poisoned_after_an_error():
    decoder = wire.Decoder(max_frame_bytes=4096)
    with pytest.raises(wire.FrameError):
        list(decoder.feed(b"\xff\xff\xff\xff"))
    with pytest.raises(wire.FrameError):
        list(decoder.feed(wire.encode(1, b"ok")))


def test_encode_refuses_a_frame_over_the_limit():
    with pytest.raises(wire.FrameTooLarge):
        wire.encode(1, b"x" * 4096, max_frame_bytes=4096)


def test_json_payload_that_is_not_an_object_is_a_frame_error():
    with pytest.raises(wire.FrameError):
        wire.decode_json(b"[1,2]")
    with pytest.raises(wire.FrameError):
        wire.decode_json(b"\xff\xfe")


@pytest.mark.parametrize("payload", [
    b"[" * 5000 + b"]" * 5000,  # a HELLO of nested brackets: RecursionError before
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"a":' * 600 + b"1" + b"}" * 600,  # 1.2 KB-ish, the size that crashed a HELLO
])
def test_deeply_nested_json_is_a_frame_error_not_a_recursion_error(payload):
    with pytest.raises(wire.FrameError, match="nested deeper than 64"):
        wire.decode_json(payload)


def test_json_nested_64_deep_is_accepted_and_65_is_not():
    def nested(levels):
        return b'{"a":' * levels + b"1" + b"}" * levels

    assert wire.decode_json(nested(64))["a"]
    with pytest.raises(wire.FrameError, match="nested deeper"):
        wire.decode_json(nested(65))


def test_json_nan_from_a_python_peer_is_still_accepted():
    assert wire.decode_json(b'{"rtt": NaN}')["rtt"] != 0


def test_ping_round_trips_and_ignores_trailing_bytes():
    frame = feed_all(wire.Decoder(), [wire.encode_ping(wire.FrameType.PING, 12345) + b""])[0]
    assert wire.decode_ping(frame.payload) == 12345
    assert wire.decode_ping(frame.payload + b"future") == 12345
    with pytest.raises(wire.FrameError):
        wire.decode_ping(b"\x01")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_never_raise_anything_but_frame_error(chunks):
    decoder = wire.Decoder(max_frame_bytes=4096)
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert isinstance(frame, wire.Frame)
                try:
                    frame.json()
                except wire.FrameError:
                    pass
    except wire.FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=10),
    st.integers(1, 50),
)
def test_any_frame_sequence_round_trips_under_any_chunking(frames, step):
    data = b"".join(wire.encode(t, p) for t, p in frames)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    decoded = feed_all(wire.Decoder(), chunks)
    assert [(f.type, f.payload) for f in decoded] == frames


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(), st.booleans())))
def test_json_frames_round_trip(body):
    data = wire.encode_json(wire.FrameType.ANNOUNCE, body)
    (frame,) = feed_all(wire.Decoder(), [data])
    assert frame.json() == body


# -- CLOSE: a code beside the reason, and the older peers' text ----------------------------------


def close_frame(body: dict) -> wire.Frame:
    data = wire.encode_json(wire.FrameType.CLOSE, body)
    (frame,) = feed_all(wire.Decoder(), [data])
    return frame


def test_close_with_a_code_is_classified_by_the_code_not_the_words():
    body = wire.encode_close_body("duplicate connection, token revoked", wire.CloseCode.TIMEOUT)
    close = wire.decode_close(close_frame(body).payload)
    assert close == wire.Close("duplicate connection, token revoked", wire.CloseCode.TIMEOUT)


def test_close_body_carries_the_reason_and_the_code_as_plain_json():
    body = wire.encode_close_body("x" * 600, wire.CloseCode.TOKEN_REVOKED)
    assert body == {"reason": "x" * wire.MAX_REASON_CHARS, "code": "token-revoked"}


@pytest.mark.parametrize("reason, code", [
    ("refused: token abc123 was revoked", wire.CloseCode.TOKEN_REVOKED),
    ("refused: token abc123 expired 2 h ago", wire.CloseCode.TOKEN_EXPIRED),
    ("refused: token abc123 was for one use and has been used", wire.CloseCode.TOKEN_USED),
    ("refused: token abc123 was not issued by this node for this mesh",
     wire.CloseCode.TOKEN_UNKNOWN),
    ("duplicate connection (the other one is kept)", wire.CloseCode.DUPLICATE),
    ("this node is leaving the mesh", wire.CloseCode.LEAVING),
    ("no heartbeat for 6.0 s", wire.CloseCode.OTHER),
])
def test_close_without_a_code_from_an_older_peer_falls_back_to_its_words(reason, code):
    close = wire.decode_close(close_frame({"reason": reason}).payload)  # a version-1 peer's frame
    assert close == wire.Close(reason, code)


def test_close_with_a_code_from_a_newer_peer_is_other():
    close = wire.decode_close(close_frame({"reason": "was revoked", "code": "from-the-future"}).payload)
    assert close == wire.Close("was revoked", wire.CloseCode.OTHER)


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "(unreadable reason)"),
    (b"{}", "(no reason given)"),
    (b'{"reason": "x", "code": 7}', "x"),
])
def test_an_odd_close_body_still_closes(payload, reason):
    close = wire.decode_close(payload)
    assert close.reason == reason and close.code is wire.CloseCode.OTHER


def test_token_refusals_are_the_codes_that_end_a_token_for_good():
    assert wire.TOKEN_REFUSALS == {wire.CloseCode.TOKEN_UNKNOWN, wire.CloseCode.TOKEN_REVOKED,
                                   wire.CloseCode.TOKEN_EXPIRED, wire.CloseCode.TOKEN_USED}
