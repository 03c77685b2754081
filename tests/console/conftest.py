"""The browser the console's page tests drive (``tests/harness/browser.py``)."""

from __future__ import annotations

import os

import pytest

from tests.harness.browser import find_chromium


@pytest.fixture
def chromium_bin() -> str:
    """A missing browser fails the test (a skip would hide that the page went untested),
    unless MESHD_SKIP_BROWSER=1 says this machine has none on purpose."""
    found = find_chromium()
    if found is None:
        if os.environ.get("MESHD_SKIP_BROWSER") == "1":
            pytest.skip("no chromium and MESHD_SKIP_BROWSER=1")
        pytest.fail("no chromium: apt-get install chromium (./dev test installs it)")
    return found
