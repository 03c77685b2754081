"""docs/security.md stays true: every test it cites as proof still exists.

The security guide backs each check it describes with a test, cited as
``tests/FILE.py::test_name``.  A renamed or deleted test would leave the guide
claiming a proof that is gone, so each citation must name a file under
``tests/`` that defines that test function (sync or async, at module level).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "security.md"
CITATION = re.compile(r"``(tests/[\w/]+\.py)::(test_\w+)``")


def citations() -> list[tuple[str, str]]:
    return sorted(set(CITATION.findall(DOC.read_text())))


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}


def test_the_guide_cites_tests():
    assert len(citations()) >= 50


def test_every_mention_of_a_test_uses_the_citation_format():
    """A test named any other way would escape the check below."""
    text = DOC.read_text()
    loose = [m.group(0) for m in re.finditer(r"tests/[\w/]+\.py\S*", text)
             if not CITATION.match(text, m.start() - 2)]
    assert loose == ["tests/test_docs_security.py`"], loose


@pytest.mark.parametrize("path,name", citations())
def test_a_cited_test_exists(path, name):
    file = ROOT / path
    assert file.is_file(), f"docs/security.md cites {path}, which does not exist"
    assert name in _test_functions(file), f"docs/security.md cites {path}::{name}, which is gone"
