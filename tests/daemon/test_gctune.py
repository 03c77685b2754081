"""The daemon's garbage-collector setting (``meshd.gctune``), in a process of its own:
it changes the interpreter's global state."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_tune_freezes_what_the_start_made_and_collects_less_often():
    code = ("import gc; from meshd import gctune; before = gc.get_threshold(); gctune.tune(); "
            "print(gc.get_freeze_count() > 0, gc.get_threshold()[0], gc.get_threshold()[1:] == before[1:])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["True", "10000", "True"]

