"""Invite tokens: round trips, every way a token can be malformed, and the issuer's gate
(expiry, one use, revocation), each with the message an operator sees."""

import base64
import hashlib
import json

import pytest

from meshd import statedir
from meshd.mesh import tokens

NOW = 1_700_000_000.0


def make_token(**changes):
    fields = dict(
        mesh_id="0123456789abcdef",
        token_id="a1b2c3d4e5f6",
        issuer="abcdefghijklmnopqrstuvwxyz",
        pin=bytes(range(32)),
        addrs=("10.0.0.1:7842", "[::1]:7842"),
        expires_at=NOW + 3600,
        once=False,
        key=b"k" * 32,
    )
    fields.update(changes)
    return tokens.Token(**fields)


def raw_token(body: dict) -> str:
    data = json.dumps(body).encode()
    blob = data + hashlib.sha256(data).digest()[:4]
    return tokens.PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")


def body_of(token: tokens.Token) -> dict:
    text = tokens.encode(token)[len(tokens.PREFIX):]
    blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return json.loads(blob[:-4])


def test_token_round_trips():
    token = make_token()
    assert tokens.decode(tokens.encode(token)) == token


def test_token_is_one_printable_line():
    text = tokens.encode(make_token())
    assert text.isprintable() and "\n" not in text and " " not in text


def test_line_wrapped_token_still_decodes():
    text = tokens.encode(make_token())
    wrapped = "\n".join(text[i : i + 40] for i in range(0, len(text), 40))
    assert tokens.decode("  " + wrapped + "\n") == make_token()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("hello", "not a meshd invite token"),
        ("meshd2.AAAA", "version 2 is not supported"),
        ("meshd1.abc$def", "characters that base64url never uses"),
        ("meshd1.A", "cut short"),
        ("meshd1.AAAA", "cut short"),
    ],
)
def test_malformed_token_text_is_refused_with_a_reason(text, message):
    with pytest.raises(tokens.TokenMalformed, match=message):
        tokens.decode(text)


def test_truncated_token_fails_the_checksum():
    text = tokens.encode(make_token())
    with pytest.raises(tokens.TokenMalformed, match="checksum|cut short"):
        tokens.decode(text[:-6])


def test_edited_token_fails_the_checksum():
    text = tokens.encode(make_token())
    i = len(text) // 2
    edited = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(tokens.TokenMalformed, match="checksum does not match"):
        tokens.decode(edited)


def test_token_body_that_is_not_json_is_refused():
    data = b"\x00not json"
    blob = data + hashlib.sha256(data).digest()[:4]
    text = tokens.PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")
    with pytest.raises(tokens.TokenMalformed, match="not valid JSON"):
        tokens.decode(text)


@pytest.mark.parametrize("data", [b"[" * 5000 + b"]" * 5000, b'{"m":' * 100 + b"1" + b"}" * 100])
def test_token_body_of_nested_brackets_is_refused_as_not_json(data):
    blob = data + hashlib.sha256(data).digest()[:4]
    text = tokens.PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")
    with pytest.raises(tokens.TokenMalformed, match="not valid JSON"):
        tokens.decode(text)


@pytest.mark.parametrize(
    "key, name", [("m", "mesh id"), ("i", "token id"), ("n", "issuer"), ("p", "certificate fingerprint"),
                  ("a", "address list"), ("e", "expiry"), ("o", "one-use"), ("k", "join key")],
)
def test_token_missing_a_field_names_it(key, name):
    body = body_of(make_token())
    del body[key]
    with pytest.raises(tokens.TokenMalformed, match=f"no {name}"):
        tokens.decode(raw_token(body))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("e", "tomorrow", "expiry time is not a int"),
        ("e", True, "expiry time is not a int"),
        ("o", 1, "one-use flag is not a bool"),
        ("a", [], "no address"),
        ("a", ["nohost"], "not host:port"),
        ("a", [7842], "not a string"),
        ("p", "AAAA", "has 3 bytes, expected 32"),
        ("k", "!!!", "not base64url"),
        ("i", "XYZ", "not lowercase hex"),
        ("n", "short", "is not a node id"),
    ],
)
def test_token_with_a_bad_field_says_which(key, value, message):
    body = body_of(make_token())
    body[key] = value
    with pytest.raises(tokens.TokenMalformed, match=message):
        tokens.decode(raw_token(body))


def test_expired_token_is_refused_before_connecting():
    text = tokens.encode(make_token(expires_at=NOW - 60))
    with pytest.raises(tokens.TokenExpired, match="expired 60 s ago"):
        tokens.decode(text, now=NOW)


class FakeNow:
    def __init__(self):
        self.t = NOW

    def __call__(self):
        return self.t


@pytest.fixture
def book(tmp_path):
    now = FakeNow()
    state = statedir.StateDir(tmp_path)
    state.ensure()
    b = tokens.TokenBook(state, now=now)
    b.clock = now
    return b


def issue(book, **kw):
    args = dict(mesh_id="m1", issuer="a" * 26, pin=b"p" * 32, addrs=["127.0.0.1:1"],
                ttl_s=60, once=False)
    args.update(kw)
    return book.issue(**args)


def test_issued_token_is_accepted_by_its_issuer(book):
    token = issue(book)
    assert book.check(token.token_id, "m1") == token.key


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), 0, -1])
def test_a_ttl_that_is_not_a_finite_positive_number_issues_nothing(book, ttl):
    with pytest.raises(ValueError, match="finite number of seconds"):
        issue(book, ttl_s=ttl)
    assert book._state.load_tokens() == {}


def test_issued_token_expires_after_its_ttl(book):
    token = issue(book, ttl_s=60)
    book.clock.t += 61
    with pytest.raises(tokens.TokenExpired, match="expired"):
        book.check(token.token_id, "m1")


def test_revoked_token_is_refused_as_revoked(book):
    token = issue(book)
    book.revoke(token.token_id)
    with pytest.raises(tokens.TokenRevoked, match="revoked"):
        book.check(token.token_id, "m1")


def test_one_use_token_is_refused_after_its_use(book):
    token = issue(book, once=True)
    book.check(token.token_id, "m1")
    book.mark_used(token.token_id)
    with pytest.raises(tokens.TokenUsed, match="one use"):
        book.check(token.token_id, "m1")


def test_reusable_token_survives_a_use(book):
    token = issue(book, once=False)
    book.mark_used(token.token_id)
    assert book.check(token.token_id, "m1") == token.key


def test_revoking_an_unknown_token_says_so(book):
    with pytest.raises(tokens.TokenUnknown, match="no token"):
        book.revoke("deadbeef")


def test_token_for_another_mesh_is_unknown(book):
    token = issue(book)
    with pytest.raises(tokens.TokenUnknown):
        book.check(token.token_id, "other-mesh")


def test_issued_token_decodes_to_what_was_issued(book):
    token = issue(book, once=True)
    assert tokens.decode(tokens.encode(token)) == token
