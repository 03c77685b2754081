"""docs/operations.md stays true: the log lines it quotes are ones meshd still logs.

An operator greps the journal for the text the guide shows; a reworded message
would make the guide send them looking for a line that no longer exists.  Each
quoted line is ``LEVEL logger: message`` with ``<...>`` for what varies: the
logger must be one meshd creates, and every fixed piece of the message must be
in a string literal of the module that owns that logger.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "operations.md"
QUOTED = re.compile(r"^### \d+\. `(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.+)`$")
PLACEHOLDER = re.compile(r"<[^>]*>")
# the call a level is logged with (log.exception logs at ERROR)
LEVEL_CALLS = {
    "DEBUG": {"debug"}, "INFO": {"info"}, "WARNING": {"warning"},
    "ERROR": {"error", "exception"}, "CRITICAL": {"critical"},
}


def quoted_lines() -> list[tuple[str, str, str]]:
    return [m.groups() for line in DOC.read_text().splitlines() if (m := QUOTED.match(line))]


def _modules_of_logger(name: str) -> list[Path]:
    """The modules that create logger ``name`` (by literal or ``__name__``)."""
    found = []
    for path in sorted((ROOT / "meshd").rglob("*.py")):
        text = path.read_text()
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if f'getLogger("{name}")' in text or (dotted == name and "getLogger(__name__)" in text):
            found.append(path)
    assert found, f"no module in meshd/ creates logger {name!r}"
    return found


def _log_messages(path: Path, levels: set[str]) -> list[str]:
    """The message literals of every ``<something>.<level>(...)`` call in ``path``, adjacent
    literals joined as Python joins them."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(node.args[0].value)
    return found


def test_the_guide_quotes_ten_log_lines():
    assert len(quoted_lines()) == 10


@pytest.mark.parametrize("level,logger,message", quoted_lines(), ids=lambda v: v[:40])
def test_quoted_log_line_is_in_the_code(level, logger, message):
    modules = _modules_of_logger(logger)
    pieces = [p.strip(" ,.;:") for p in PLACEHOLDER.split(message)]
    pieces = [p for p in pieces if p]
    assert pieces, message
    messages = [m for module in modules for m in _log_messages(module, LEVEL_CALLS[level])]
    # one call must hold every fixed piece, in the order the guide shows them
    for text in messages:
        at = 0
        for piece in pieces:
            at = text.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return
    raise AssertionError(
        f"{', '.join(str(m.relative_to(ROOT)) for m in modules)} log no {level} line "
        f"with {pieces!r} "
        f"(docs/operations.md quotes {message!r})"
    )
