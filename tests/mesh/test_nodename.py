"""``meshd.nodename``: the one way a node is written for logs and people, and the checks."""

from __future__ import annotations

import pytest

from meshd import nodename


def test_label_leads_with_the_name_and_keeps_the_id_beside_it():
    assert nodename.label("gpu-box-2", "01hxabc") == "gpu-box-2 (01hxabc)"


def test_label_without_a_name_is_the_id():
    assert nodename.label("", "01hxabc") == "01hxabc"
    assert nodename.label(None, "01hxabc") == "01hxabc"
    assert nodename.label(None, None) == "?"


@pytest.mark.parametrize("name", ["gpu-box-2", "a", "x" * nodename.MAX_CHARS, "box 1", "名前"])
def test_good_names_have_no_problem(name):
    assert nodename.problem(name) is None


@pytest.mark.parametrize("name, words", [
    ("", "empty"), ("   ", "empty"), (3, "empty"),
    ("x" * (nodename.MAX_CHARS + 1), "too long"),
    ("gpu\x1b[31m", "not printable"), ("a\nb", "not printable"), ("a\u202eb", "not printable"),
    (" box", "white space"),
])
def test_bad_names_say_why(name, words):
    problem = nodename.problem(name)
    assert problem is not None and words in problem


def test_clean_never_raises_and_always_gives_a_valid_name_or_nothing():
    for raw in ["ok", "\x00" * 10, "x" * 10_000, " \u200b ", "a\x7fb", object(), b"bytes"]:
        out = nodename.clean(raw)
        assert out == "" or nodename.problem(out) is None, (raw, out)


def test_the_default_is_the_host_name(monkeypatch):
    monkeypatch.setattr(nodename.socket, "gethostname", lambda: "gpu-box-7")
    assert nodename.default_name() == "gpu-box-7"


def test_an_unusable_host_name_falls_back(monkeypatch):
    monkeypatch.setattr(nodename.socket, "gethostname", lambda: "\x00")
    assert nodename.default_name() == nodename.FALLBACK

    def broken() -> str:
        raise OSError("no host name")

    monkeypatch.setattr(nodename.socket, "gethostname", broken)
    assert nodename.default_name() == nodename.FALLBACK
