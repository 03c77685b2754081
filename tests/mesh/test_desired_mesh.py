"""Mesh decisions that last, with real daemons on loopback (the fake llama-server, a tiny
GGUF): a drop made before a third node joins is honoured by it, a restarted node does not
serve a dropped model its ``[models] serve`` names, and ``meshctl serve`` brings the model
back on every node configured to serve it.

Every process is started here and stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness.daemon import Meshd, fake_llama_bin_dir
from tests.harness.localhub import gguf_bytes

pytestmark = pytest.mark.timeout(180)

FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}
MODEL = "m"


@pytest.fixture
def procs():
    started: list[Meshd] = []
    yield started
    for n in reversed(started):
        n.stop()


def node(base: Path, name: str, fake: str, gguf: bytes, join: str | None = None) -> Meshd:
    models = base / name / "models"
    models.mkdir(parents=True)
    (models / f"{MODEL}.gguf").write_bytes(gguf)
    mesh = dict(FAST, join=[join]) if join else dict(FAST)
    return Meshd(
        base / name,
        {
            "models": {"serve": [MODEL]},
            "llama": {"bin_dir": fake},
            "mesh": mesh,
            "log": {"level": "info"},
        },
        name=name,
    )


def token_of(n: Meshd) -> str:
    return n.ctl("token").stdout.strip().splitlines()[-1]


def status(n: Meshd) -> dict:
    return n.control("GET", "/status")


def serves(n: Meshd) -> bool:
    """This node's own llama-server for the model is warm."""
    s = status(n)
    return s["serving"] == MODEL and any(
        m["name"] == MODEL and (m.get("local") or {}).get("state") == "warm" for m in s["models"]
    )


def dropped_here(n: Meshd) -> bool:
    s = status(n)
    return s["serving"] is None and any(
        d["model"] == MODEL and d["state"] == "dropped" for d in s["desired"]
    )


def test_drops_last_for_late_joiners_and_restarts_and_serve_brings_the_model_back(tmp_path, procs):
    fake, gguf = fake_llama_bin_dir(tmp_path), gguf_bytes()
    a = node(tmp_path, "a", fake, gguf).start()
    procs.append(a)
    a.wait_for(serves, "a serves m", 30)
    b = node(tmp_path, "b", fake, gguf, join=token_of(a)).start()
    procs.append(b)
    b.wait_for(serves, "b serves m", 30)
    a.wait_for(lambda n: len(status(n)["peers"]) == 1, "a sees b", 10)

    # -- drop on b: both stop ----------------------------------------------------------------
    out = b.ctl("drop", MODEL).stdout
    assert "m" in out
    for n in (a, b):
        n.wait_for(dropped_here, f"{n.name} stopped m and holds the drop", 15)

    # -- a third node joins later, [models] serve = [m]: it never starts m ----------------------
    t0 = time.monotonic()
    c = node(tmp_path, "c", fake, gguf, join=token_of(a)).start()
    procs.append(c)
    c.wait_for(
        lambda n: status(n)["state"] == "running" and len(status(n)["peers"]) == 2,
        "c running in a mesh of three",
        30,
    )
    assert dropped_here(c)
    print(f"late joiner ready, holding the drop, {time.monotonic() - t0:.2f} s after start")
    # it learnt the drop from its first peer before serving: no llama-server was started
    assert "not serving m ([models] serve): it was dropped mesh-wide" in c.log()
    assert "llama-server[m]: started" not in c.log()
    assert '"dropped"' in (c.dir / "state" / "desired.json").read_text()  # kept for a restart

    # -- a restarts: its desired.json holds the drop ---------------------------------------------
    a.stop()
    before = len(a.log())
    a.start()
    a.wait_for(lambda n: status(n)["state"] == "running", "a running again", 30)
    a.wait_for(lambda n: len(status(n)["peers"]) == 2, "a back in the mesh", 15)
    assert dropped_here(a)
    assert "not serving m ([models] serve): it was dropped mesh-wide" in a.log()[before:]
    assert "llama-server[m]: started" not in a.log()[before:]

    # -- meshctl serve on c: every node configured to serve m serves it again ---------------------
    t0 = time.monotonic()
    out = c.ctl("serve", MODEL).stdout
    assert "serving m mesh-wide again: the drop is lifted" in out, out
    for n in (a, b, c):
        n.wait_for(serves, f"{n.name} serves m again", 30)
    print(f"meshctl serve: m warm on all three within {time.monotonic() - t0:.2f} s")
    for n in (a, b, c):
        (decision,) = [d for d in status(n)["desired"] if d["model"] == MODEL]
        assert decision["state"] == "serve" and decision["version"] == 2, (n.name, decision)
