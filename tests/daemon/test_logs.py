"""``[log] format``: text for people reading a terminal, JSON lines for a log store."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timedelta

import pytest

from meshd import logs
from tests.harness.daemon import Meshd, fake_llama_bin_dir


def _record(msg: str = "peer %s gone", args: tuple = ("n1",), exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("meshd.mesh", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_json_line_has_time_level_logger_message():
    line = logs.JsonFormatter().format(_record())
    assert "\n" not in line
    event = json.loads(line)
    assert event["level"] == "warning"
    assert event["logger"] == "meshd.mesh"
    assert event["message"] == "peer n1 gone"
    assert "exception" not in event
    when = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert when.utcoffset() == timedelta(0)
    assert event["time"].endswith("Z")


def test_json_line_carries_the_exception_on_one_line():
    try:
        raise RuntimeError("backend went away")
    except RuntimeError:
        import sys

        record = _record("request failed", (), exc_info=sys.exc_info())
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line  # one journal entry, not one per traceback line
    event = json.loads(line)
    assert event["message"] == "request failed"
    assert "Traceback" in event["exception"]
    assert "RuntimeError: backend went away" in event["exception"]


def test_json_message_with_quotes_and_newlines_stays_one_line():
    line = logs.JsonFormatter().format(_record('bad "name"\nsecond line', ()))
    assert "\n" not in line
    assert json.loads(line)["message"] == 'bad "name"\nsecond line'


def test_setup_json_writes_parseable_lines():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("info", stream, fmt="json")
        logging.getLogger("meshd.test").info("hello %d", 3)
        logging.getLogger("meshd.test").debug("not shown")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert [json.loads(x)["message"] for x in lines] == ["hello 3"]


def test_text_is_the_default(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    line = logs.formatter().format(_record())
    assert line.endswith("WARNING meshd.mesh: peer n1 gone")
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    assert logs.formatter("text").format(_record()) == "WARNING meshd.mesh: peer n1 gone"


@pytest.mark.parametrize("journal", [False, True])
def test_text_lines_escape_what_a_peer_put_into_them(monkeypatch, journal):
    # a PEER_DOWN reason forging a second line and clearing the operator's terminal
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    forged = "timeout\n12:00:00 WARNING meshd: all good\x1b[2J\u2028\u202e"
    record = _record("peer down: %s", (forged,))
    line = logs.formatter("text").format(record)
    assert len(line.splitlines()) == 1 and "\x1b" not in line and "\u2028" not in line
    assert line.endswith("peer down: timeout\\n12:00:00 WARNING meshd: all good"
                         "\\x1b[2J\\u2028\\u202e")
    assert record.getMessage() == f"peer down: {forged}"  # the record itself is left alone
    assert logs.formatter("text").format(_record("caf\u00e9 \u4e2d", ())).endswith("caf\u00e9 \u4e2d")


def test_text_keeps_a_tracebacks_lines():
    try:
        raise RuntimeError("backend went away")
    except RuntimeError:
        import sys

        record = _record("request failed", (), exc_info=sys.exc_info())
    lines = logs.formatter("text").format(record).splitlines()
    assert lines[0].endswith("request failed") and lines[1].startswith("Traceback")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="'xml' is not one of text, json"):
        logs.formatter("xml")


def test_real_daemon_writes_json_lines(tmp_path):
    """The daemon CLI, started with ``[log] format = "json"``: every line it writes parses."""
    node = Meshd(
        tmp_path / "node",
        {"log": {"level": "info", "format": "json"},
         "llama": {"bin_dir": fake_llama_bin_dir(tmp_path)}},
    )
    node.start()
    try:
        node.wait_running(timeout=60)
    finally:
        node.stop()
    lines = [x for x in node.log().splitlines() if x.strip()]
    assert lines, "the daemon logged nothing"
    events = [json.loads(x) for x in lines]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in events)
    assert any(e["logger"].startswith("meshd") for e in events)
