"""Property-based fuzzing of the parsers that read what strangers send (issue 12, "the proof").

Each door's parser is given arbitrary input in arbitrary splits and must answer
only with its own error type (a message for the operator or a clean refusal on
the wire), never another exception: an unexpected exception is a traceback in
the log per connection, or a door that answers 500 instead of refusing.

The ``fuzz-ci`` profile is derandomized so CI runs the same examples every time
(no flaky failures) and is sized to keep this file to a few seconds; set
``MESHD_FUZZ_EXAMPLES`` to run more (and ``MESHD_FUZZ_RANDOM=1`` for fresh ones).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import string
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import resource, server

from meshd import config as configmod
from meshd import httpbounds
from meshd.mesh import tokens, wire
from meshd.serving.proxy import ChunkedDecoder, UpstreamError, parse_head

settings.register_profile(
    "fuzz-ci",
    max_examples=int(os.environ.get("MESHD_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=not os.environ.get("MESHD_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
FUZZ = settings.get_profile("fuzz-ci")


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, any order)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(data[last:p])
        last = p
    parts.append(data[last:])
    return parts


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


# -- frame decoder (meshd.mesh.wire) -------------------------------------------------------------

MAX_FRAME = 4096


def frame_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that are often frames, or nearly: valid frames, wild length prefixes, noise."""
    valid = st.builds(lambda t, p: wire.encode(t, p, max_frame_bytes=MAX_FRAME),
                      st.integers(0, 255), st.binary(max_size=200))
    prefix = st.builds(lambda n, t: wire.HEADER.pack(n, t),
                       st.one_of(st.integers(0, 8), st.integers(MAX_FRAME - 2, MAX_FRAME + 2),
                                 st.integers(0, 0xFFFFFFFF)),
                       st.integers(0, 255))
    return st.lists(st.one_of(valid, prefix, st.binary(max_size=64)), max_size=12).map(b"".join)


@FUZZ
@given(frame_bytes(), cuts)
def test_frame_decoder_raises_only_frame_error_and_buffers_at_most_one_frame(data, where):
    decoder = wire.Decoder(max_frame_bytes=MAX_FRAME)
    try:
        for part in split_at(data, where):
            for frame in decoder.feed(part):
                assert isinstance(frame, wire.Frame)
                assert len(frame.payload) + 1 <= MAX_FRAME
                for decode, arg in ((wire.decode_json, frame.payload),
                                    (wire.decode_ping, frame.payload)):
                    try:
                        decode(arg)
                    except wire.FrameError:
                        pass
                close = wire.decode_close(frame.payload)  # never raises at all
                assert isinstance(close.code, wire.CloseCode) and close.reason
                assert len(close.reason) <= wire.MAX_REASON_CHARS
            # a partial frame is all that is kept: its header and less than one maximum frame
            assert decoder.buffered < wire.LENGTH.size + MAX_FRAME
    except wire.FrameError as e:
        assert str(e)
        # poisoned: a later feed raises again, it never parses what follows as frames
        try:
            list(decoder.feed(b"\x00\x00\x00\x01\x04"))
        except wire.FrameError:
            pass
        else:
            raise AssertionError("a decoder that raised parsed more frames") from None


frames = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=10)


@FUZZ
@given(frames, cuts)
def test_a_valid_frame_stream_split_anywhere_decodes_to_the_same_frames(sent, where):
    data = b"".join(wire.encode(t, p) for t, p in sent)
    decoder = wire.Decoder()
    got = [(f.type, f.payload) for part in split_at(data, where) for f in decoder.feed(part)]
    assert got == sent
    assert decoder.buffered == 0


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.integers(0, 255))
def test_json_frames_round_trip(body, frame_type):
    (frame,) = list(wire.Decoder().feed(wire.encode_json(frame_type, body)))
    assert frame.type == frame_type and frame.json() == body


@FUZZ
@given(st.text(max_size=800), st.sampled_from(list(wire.CloseCode)))
def test_close_bodies_round_trip_with_the_reason_bounded(reason, code):
    (frame,) = list(wire.Decoder().feed(
        wire.encode_json(wire.FrameType.CLOSE, wire.encode_close_body(reason, code))))
    close = wire.decode_close(frame.payload)
    assert close.code is code
    assert close.reason == (reason[: wire.MAX_REASON_CHARS] or "(no reason given)")


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["reason", "code", "x"]), json_values,
                                 max_size=3).map(lambda d: json.dumps(d).encode())))
def test_any_close_body_decodes_without_raising(payload):
    close = wire.decode_close(payload)
    assert isinstance(close.code, wire.CloseCode)
    assert close.reason and len(close.reason) <= wire.MAX_REASON_CHARS


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=8))
def test_pings_round_trip(seq, extra):
    (frame,) = list(wire.Decoder().feed(wire.encode_ping(wire.FrameType.PING, seq) + b""))
    assert wire.decode_ping(frame.payload + extra) == seq


# -- invite tokens (meshd.mesh.tokens) -----------------------------------------------------------

node_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=26, max_size=26)
addresses = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["10.0.0.1", "node.example", "a"]),
              st.integers(0, 65535)),
    st.builds(lambda p: f"[fd00::1]:{p}", st.integers(0, 65535)),
)
valid_tokens = st.builds(
    tokens.Token,
    mesh_id=st.text(max_size=30),
    token_id=st.text(alphabet="0123456789abcdef", min_size=8, max_size=64),
    issuer=node_ids,
    pin=st.binary(min_size=32, max_size=32),
    addrs=st.lists(addresses, min_size=1, max_size=4).map(tuple),
    expires_at=st.integers(0, 2**40).map(float),
    once=st.booleans(),
    key=st.binary(min_size=tokens.KEY_BYTES, max_size=tokens.KEY_BYTES),
)


def decode_or_refuse(text: Any, now: float | None = None) -> tokens.Token | None:
    """The token, or None after a TokenError with a message; any other exception fails."""
    try:
        return tokens.decode(text, now=now)
    except tokens.TokenError as e:
        assert str(e), "a token refusal without a message"
        return None


@FUZZ
@given(valid_tokens)
def test_valid_tokens_round_trip(token):
    text = tokens.encode(token)
    assert tokens.decode(text) == token
    # a token wrapped by a terminal or an e-mail is the same token
    assert tokens.decode("\n".join(text[i : i + 60] for i in range(0, len(text), 60))) == token


@FUZZ
@given(st.one_of(st.text(max_size=300), st.text(max_size=300).map(lambda t: tokens.PREFIX + t),
                 st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=300)
                 .map(lambda t: tokens.PREFIX + t),
                 st.sampled_from([None, 12, b"meshd1.", ["meshd1."]])),
       st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_arbitrary_strings_are_refused_with_a_token_error(text, now):
    assert decode_or_refuse(text, now) is None or isinstance(text, str)


@FUZZ
@given(valid_tokens, st.data())
def test_bit_flipped_or_truncated_tokens_are_refused_with_a_token_error(token, data):
    text = tokens.encode(token)
    blob = base64.urlsafe_b64decode(text[len(tokens.PREFIX):] + "=" * (-len(text) % 4))
    how = data.draw(st.sampled_from(["flip-char", "flip-bit", "truncate", "truncate-blob"]))
    if how == "flip-char":
        i = data.draw(st.integers(0, len(text) - 1))
        c = data.draw(st.characters())
        mutated = text[:i] + c + text[i + 1 :]
    elif how == "flip-bit":
        i = data.draw(st.integers(0, len(blob) * 8 - 1))
        b = bytearray(blob)
        b[i // 8] ^= 1 << (i % 8)
        mutated = tokens.PREFIX + base64.urlsafe_b64encode(bytes(b)).decode().rstrip("=")
    elif how == "truncate":
        mutated = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        cut = blob[: data.draw(st.integers(0, len(blob) - 1))]
        mutated = tokens.PREFIX + base64.urlsafe_b64encode(cut).decode().rstrip("=")
    got = decode_or_refuse(mutated, now=data.draw(st.none() | st.floats(0, 2**41)))
    assert got is None or mutated == text or got == token or how == "flip-char"


def with_checksum(body: bytes) -> str:
    """A token whose checksum matches ``body``: what gets past the checksum to the fields."""
    blob = body + hashlib.sha256(body).digest()[: tokens.CHECKSUM_BYTES]
    return tokens.PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")


token_field_values = st.one_of(
    json_values, node_ids, addresses, st.lists(st.one_of(addresses, json_scalars), max_size=3),
    st.binary(min_size=0, max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.sampled_from([10**30, -(10**30), 10**400, -(2**63), 2**63, -1, 0, 1e308, float("inf"), float("nan")]),
)


SOME_TOKEN = tokens.Token("m", "0123abcd", "a" * 26, b"p" * 32, ("10.0.0.1:7842",), 1e9, True,
                          b"k" * tokens.KEY_BYTES)


@FUZZ
# expiries beyond a float or any date the platform can show: OverflowError, OSError once
@example(SOME_TOKEN, {"e": 10**400}, [], None)
@example(SOME_TOKEN, {"e": -(10**30)}, [], 2e9)
@example(SOME_TOKEN, {"e": -(2**63)}, [], 2e9)
@given(valid_tokens, st.dictionaries(st.sampled_from(list("minpaeokx")), token_field_values,
                                     max_size=4),
       st.lists(st.sampled_from(list("minpaeok")), max_size=2),
       st.one_of(st.none(), st.floats(0, 2**41)))
def test_tokens_with_a_good_checksum_and_any_field_values_are_refused_cleanly(
        token, changes, removed, now):
    body = json.loads(base64.urlsafe_b64decode(
        (t := tokens.encode(token))[len(tokens.PREFIX):] + "=" * (-len(t) % 4))[: -tokens.CHECKSUM_BYTES])
    body.update(changes)
    for key in removed:
        body.pop(key, None)
    decode_or_refuse(with_checksum(json.dumps(body).encode()), now)


@FUZZ
@given(json_values, st.one_of(st.none(), st.floats(0, 2**41)))
def test_any_json_body_with_a_good_checksum_is_refused_cleanly(body, now):
    decode_or_refuse(with_checksum(json.dumps(body).encode()), now)


# -- the config loader (meshd.config) ------------------------------------------------------------

KNOWN = {name: list(configmod._hints(cls)) for name, cls in configmod.SECTIONS.items()}
wild_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 10**5000, [10**5000], 2**64, 1e308, -1e308, float("nan"), float("inf"),
                     0, -1, 0.0, -0.0, ""]),
    st.text(max_size=20), st.sampled_from(["127.0.0.1:1", "[::1]:9", "debug", "x\x00y", "/tmp"]),
)
wild_values = st.one_of(
    wild_scalars,
    st.lists(wild_scalars, max_size=4),
    st.dictionaries(st.text(max_size=6), wild_scalars, max_size=3),
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*KNOWN, "nosuch"]), max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            doc[name] = draw(wild_scalars)  # a section that is not a table
            continue
        keys = draw(st.lists(st.sampled_from([*KNOWN.get(name, []), "nosuch_key"]),
                             max_size=5, unique=True))
        doc[name] = {k: draw(wild_values) for k in keys}
    return doc


def check_config_error(e: configmod.ConfigError) -> None:
    assert e.problems and str(e)
    for problem in e.problems:
        assert problem.startswith("["), problem  # each names its section (and key)


@FUZZ
@given(config_documents())
def test_any_config_document_loads_or_raises_config_error(doc):
    try:
        config = configmod.from_dict(doc)
    except configmod.ConfigError as e:
        check_config_error(e)
        return
    for name in KNOWN:  # what loaded is usable: finite numbers, and it dumps again
        for value in configmod.to_dict(config)[name].values():
            for v in value if isinstance(value, list) else [value]:
                assert not isinstance(v, float) or math.isfinite(v)
    configmod.dumps(config)


@FUZZ
@given(st.sampled_from([(s, k) for s, keys in KNOWN.items() for k in keys if k != "settings"]),
       wild_values)
def test_one_bad_value_is_refused_naming_its_key(where, value):
    section, key = where
    try:
        configmod.from_dict({section: {key: value}})
    except configmod.ConfigError as e:
        check_config_error(e)
        # a cross-key check names both ("[mesh] heartbeat_timeout_s: must be at least heartbeat_s")
        assert any(p.startswith(f"[{section}]") and key in p for p in e.problems), e.problems


toml_texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(
        st.sampled_from([f"[{s}]" for s in KNOWN] + ["[policy.p]", "[[mesh]]", "[a.b.c]", "["]),
        st.builds(lambda k, v: f"{k} = {v}",
                  st.sampled_from([k for keys in KNOWN.values() for k in keys] + ["x", "a.b"]),
                  st.sampled_from(["nan", "inf", "-inf", "+nan", "1e400", "9" * 30, "0x10",
                                   '"s"', "'s'", "[1, 2", "[1, 'a']", "true", "1979-05-27",
                                   "{ a = 1 }", '"""', "[]", "[[]]", "-0", "1_000", "0.5"])),
        st.text(max_size=20)), max_size=10).map("\n".join),
)


@FUZZ
@example("[a]\n[[a]]")  # the toml package's own AttributeError, once a traceback
@given(toml_texts)
def test_any_config_file_loads_or_raises_config_error(text):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        configmod.load(f.name)
    except configmod.ConfigError as e:
        check_config_error_file(e, f.name)
    finally:
        os.unlink(f.name)


def check_config_error_file(e: configmod.ConfigError, path: str) -> None:
    assert e.problems and str(e)
    for problem in e.problems:
        assert problem.startswith(f"{path}: "), problem


# -- HTTP heads: BoundedSite / BoundedRequest over an in-memory transport ------------------------


class Echo(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return b"ok:%d" % len(request.content.read())


def before_body(request: server.Request, method: bytes, path: bytes) -> httpbounds.Refusal | None:
    if path == b"/refuse":
        return httpbounds.Refusal(401, "no", "unauthorized")
    return None


# mostly well-formed, so the properties reach past the request line into headers and bodies
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]),
                    st.sampled_from([b"X", b"", b"G\x00T", b"get"]))
paths = st.one_of(st.sampled_from([b"/", b"/refuse", b"/refuse?x=1", b"/x?" + b"q" * 3000]),
                  st.sampled_from([b"*", b"", b"http://h/", b"/a b"]), st.binary(max_size=40))
versions = st.one_of(st.just(b"HTTP/1.1"), st.just(b"HTTP/1.0"),
                     st.sampled_from([b"HTTP/2", b"", b"HTTP/1.1 x", b"HTTP/9.9"]))
header_lines = st.one_of(
    st.builds(lambda v: b"Content-Length: " + v,
              st.one_of(st.integers(-5, 200).map(lambda n: b"%d" % n),
                        st.sampled_from([b"", b"x", b"1, 2", b"9" * 40, b" 5", b"+5", b"0x10"]))),
    st.sampled_from([b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
                     b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive",
                     b"Host: h", b"Content-Type: application/json", b"no colon", b": empty",
                     b" folded", b"X: " + b"y" * 300]),
    st.builds(lambda n, v: n.encode() + b": " + v.encode(),
              st.text(string.ascii_letters + "-", min_size=1, max_size=12),
              st.text(string.printable.strip("\r\n\x0b\x0c"), max_size=30)),
)
header_lines = st.one_of(
    header_lines,
    st.builds(lambda n, v: n + b": " + v, st.binary(max_size=12), st.binary(max_size=30)),
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(st.binary(min_size=1, max_size=40), max_size=4).map(
        lambda cs: b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in cs) + b"0\r\n\r\n"),
    st.sampled_from([b"zz\r\n", b"-1\r\n", b"fffffffffffffffffff\r\n", b"5\r\nabc", b"0\r\n"]),
)


good_headers = st.one_of(
    st.sampled_from([b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive",
                     b"Host: h", b"Content-Type: application/json", b"X: " + b"y" * 300]),
    st.builds(lambda n, v: n.encode() + b": " + v.encode(),
              st.text(string.ascii_letters + "-", min_size=1, max_size=12),
              st.text(string.printable.strip("\r\n\x0b\x0c"), max_size=30)),
)


@st.composite
def coherent_request(draw: st.DrawFn) -> bytes:
    """A request a real client might send, its framing right or slightly wrong: past the
    request line, so the bounds on heads and bodies are what is exercised."""
    body = draw(st.binary(max_size=100))
    framing = draw(st.sampled_from(["length", "wrong-length", "chunked", "bad-chunked", "none"]))
    heads = draw(st.lists(good_headers, max_size=4))
    if framing == "length":
        heads.append(b"Content-Length: %d" % len(body))
    elif framing == "wrong-length":
        heads.append(b"Content-Length: %d" % draw(st.integers(0, 200)))
    elif framing == "chunked":
        heads.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "bad-chunked":
        heads.append(b"Transfer-Encoding: chunked")
        body = draw(bodies)
    else:
        body = b""
    line = (draw(st.sampled_from([b"GET", b"POST", b"PUT"])) + b" "
            + draw(st.sampled_from([b"/", b"/refuse", b"/x?q=1"])) + b" "
            + draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])))
    return b"\r\n".join([line, *draw(st.permutations(heads))]) + b"\r\n\r\n" + body


@st.composite
def wild_request(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(paths) + b" " + draw(versions)
    heads = draw(st.lists(header_lines, max_size=6))
    eol = b"\r\n" if draw(st.integers(0, 4)) else b"\n"
    return eol.join([line, *heads]) + eol + eol + draw(bodies)


# pipelined: up to three requests on one connection, or bytes that are no request at all
http_requests = st.one_of(
    st.lists(st.one_of(coherent_request(), coherent_request(), wild_request()),
             min_size=1, max_size=3).map(b"".join),
    st.binary(max_size=400),
)


class FailureLog:
    """Every failure twisted logs while it is open (an unhandled exception in a protocol)."""

    def __init__(self) -> None:
        self.failures: list[Any] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def __enter__(self) -> FailureLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


@FUZZ
@given(http_requests, cuts, st.booleans())
def test_any_http_head_in_any_split_gets_a_response_or_a_close_never_a_crash(data, where, hangup):
    answer, lost, pending = talk(data, where, hangup)
    # whatever was answered is HTTP; time running out always ends in a close
    assert not answer or answer.startswith(b"HTTP/1."), answer[:200]
    assert lost or not pending
    # an answer that said "Connection: close" is the last one (no 400 after a refusal)
    rest = answer
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1."), answer
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        rest = rest[int(fields.get(b"content-length", b"0")):]
        if fields.get(b"connection") == b"close":
            assert not rest, answer


@FUZZ
@given(st.sampled_from([b"GET", b"POST", b"PUT"]), st.binary(max_size=64), st.booleans(), cuts)
def test_a_well_formed_request_split_anywhere_is_answered(method, body, chunked, where):
    if chunked:
        framing = b"Transfer-Encoding: chunked"
        sent = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        framing, sent = b"Content-Length: %d" % len(body), body
    data = method + b" /x HTTP/1.1\r\nHost: h\r\n" + framing + b"\r\n\r\n" + sent
    answer, _, _ = talk(data, where, hangup=False)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok:%d" % len(body)), answer


def talk(data: bytes, where: list[int], hangup: bool) -> tuple[bytes, bool, list[Any]]:
    """``data`` sent to a BoundedSite in pieces, then time passing: what was answered,
    whether the connection was closed, the calls still pending; fails on any failure
    twisted logged (an unhandled exception in the channel)."""
    clock = Clock()
    site = httpbounds.BoundedSite(
        Echo(), max_body_bytes=64, what="fuzz", before_body=before_body, reactor=clock,
        error_body=lambda status, message, code: json.dumps(
            {"error": {"message": message, "code": code}}).encode(),
        linger_s=1.0, head_timeout_s=5.0, body_timeout_s=5.0)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    channel.callLater = clock.callLater  # twisted.web's timeouts on the test's clock
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    lost = False

    def settle() -> None:
        """What the reactor does for a closing transport: connectionLost, once."""
        nonlocal lost
        if transport.disconnecting and not lost:
            lost = True
            channel.connectionLost(Failure(ConnectionDone()))

    with FailureLog() as logged:
        channel.makeConnection(transport)
        for part in split_at(data, where):
            if lost:
                break
            channel.dataReceived(part)
            settle()
        # time passes: deadlines (408), lingers and twisted.web's idle and abort timeouts
        for _ in range(20):
            calls = clock.getDelayedCalls()
            if lost or not calls:
                break
            clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
            settle()
        answer = transport.value()
        if hangup and not lost:
            lost = True
            channel.connectionLost(Failure(ConnectionDone()))
    assert not logged.failures, [f.getTraceback() for f in logged.failures]
    return answer, lost, list(clock.getDelayedCalls())


# -- upstream heads and chunked bodies (meshd.serving.proxy) -------------------------------------

statuses = st.one_of(st.integers(0, 999).map(lambda n: b"%d" % n),
                     st.integers(4290, 4400).map(lambda n: b"9" * n),
                     st.binary(max_size=5))


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v, s, r, hs: b"\r\n".join([v + b" " + s + b" " + r, *hs]),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"HTTP/2", b"http/1.1"]),
              statuses, st.binary(max_size=10), st.lists(header_lines, max_size=5)),
))
def test_parse_head_raises_only_upstream_error(head):
    try:
        status, headers, _ = parse_head(head)
    except UpstreamError as e:
        assert str(e)
        return
    assert 0 <= status <= 999
    assert all(name == name.lower() for name in headers)


chunk_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=8)
extensions = st.sampled_from([b"", b";ext=1", b"; a=b;c", b";" + b"x" * 50])
trailer_sets = st.lists(st.sampled_from([b"Trailer: x", b"X-A: 1", b"Y:"]), max_size=2)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid chunked body (with extensions, upper- or lower-case sizes, trailers) and its payload."""
    chunks = draw(chunk_lists)
    wire_bytes = b""
    for c in chunks:
        size = b"%x" % len(c)
        if draw(st.booleans()):
            size = size.upper()
        wire_bytes += size + draw(extensions) + b"\r\n" + c + b"\r\n"
    wire_bytes += b"0" + draw(extensions) + b"\r\n"
    wire_bytes += b"".join(t + b"\r\n" for t in draw(trailer_sets)) + b"\r\n"
    return wire_bytes, b"".join(chunks)


@FUZZ
@given(chunked_bodies(), cuts)
def test_a_chunked_body_split_anywhere_decodes_to_the_same_payload(body, where):
    data, payload = body
    dec = ChunkedDecoder()
    got = b"".join(dec.feed(part) for part in split_at(data, where))
    assert got == payload and dec.done


@FUZZ
@given(chunked_bodies(), cuts, st.integers(0, 14))
def test_framed_output_re_decodes_to_the_same_payload(body, where, switch_at):
    """``frame`` (after ``feed`` for the first parts, as a held answer that grew long) passes
    chunks a client decodes to the same payload, each write ending on a chunk boundary."""
    data, payload = body
    dec, client = ChunkedDecoder(), ChunkedDecoder()
    got, counted = b"", 0
    for i, part in enumerate(split_at(data, where)):
        if i < switch_at:
            decoded = dec.feed(part)
            counted += len(decoded)
            written = b"%x\r\n%s\r\n" % (len(decoded), decoded) if decoded else b""
        else:
            pieces, n = dec.frame(part)
            counted += n
            written = b"".join(pieces)
        got += client.feed(written)
        assert not (client._left or client._crlf or client._line), "a write ended inside a chunk"
        assert not client.done, "the terminating chunk is the writer's own"
    assert got == payload and counted == len(payload) and dec.done


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 chunked_bodies().map(lambda b: b[0]).flatmap(
                     lambda d: st.builds(lambda i, x: d[:i] + x + d[i:],
                                         st.integers(0, len(d)), st.binary(max_size=8)))),
       cuts, st.booleans())
def test_arbitrary_chunked_bytes_raise_only_upstream_error(data, where, framing):
    dec = ChunkedDecoder()
    try:
        for part in split_at(data, where):
            if dec.done:
                break
            if framing:
                pieces, n = dec.frame(part)
                assert n >= 0 and all(isinstance(p, bytes | bytearray) for p in pieces)
            else:
                assert isinstance(dec.feed(part), bytes)
            assert len(dec._line) <= 4096  # a size line is bounded, never buffered without end
    except UpstreamError as e:
        assert str(e)
