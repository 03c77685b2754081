"""Two meshd versions side by side, as in a rolling upgrade: an older meshd (a source tree
given with ``--old``, from before the DESIRED frame) in one mesh with two of this tree's,
each serving the same model with the fake llama-server.

    git archive <older commit> | tar -x -C /tmp/meshd-old
    python3 bench/rolling_upgrade.py --old /tmp/meshd-old

Steps, each timed, and checked (exit 1 at the first that fails):

1. the mixed mesh forms (every node lists the two others) and every node serves m;
2. ``meshctl drop m`` on a new node: all three stop it (the old one through DROP);
3. ``meshctl serve m`` on the other new node: both new nodes serve m again (the old
   one cannot hear it: documented);
4. the old node restarts: it serves m again (an older meshd keeps no drop);
5. ``meshctl drop m`` on the old node (a DROP without ``version``): the new nodes take
   it as the next decision, the same one on both;
6. a new node restarts: it does not serve m (desired.json);

and no node logs a bad frame, a protocol error or a traceback, and no connection drops.
Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.daemon import Meshd, fake_llama_bin_dir  # noqa: E402
from tests.harness.localhub import gguf_bytes  # noqa: E402

FAST = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 1.5, "verify_timeout_s": 0.5}


class OldMeshd(Meshd):
    """A meshd run from another source tree (``python -m`` puts its cwd first)."""

    old_tree = ""

    def start(self, *args: str, env: dict[str, str] | None = None) -> OldMeshd:
        import toml

        # an older meshd may not know every key this tree's harness writes ([node] name)
        self.config.get("node", {}).pop("name", None)
        self.config_path.write_text(toml.dumps(self.config))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        full_env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshd.cli.meshd", "--config", str(self.config_path), *args],
            cwd=self.old_tree,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        return self


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="source tree of the older meshd")
    args = ap.parse_args()
    OldMeshd.old_tree = args.old
    base = Path(tempfile.mkdtemp(prefix="meshd-rolling-"))
    fake, gguf = fake_llama_bin_dir(base), gguf_bytes()

    def make(cls: type[Meshd], name: str, join: str | None = None) -> Meshd:
        models = base / name / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "m.gguf").write_bytes(gguf)
        mesh = dict(FAST, join=[join]) if join else dict(FAST)
        return cls(
            base / name,
            {
                "models": {"serve": ["m"]},
                "llama": {"bin_dir": fake},
                "mesh": mesh,
                "log": {"level": "info"},
            },
            name=name,
        )

    def st(n: Meshd) -> dict:
        return n.control("GET", "/status")

    def serving(n: Meshd) -> bool:
        return st(n)["serving"] == "m"

    def token(n: Meshd) -> str:
        return n.ctl("token").stdout.strip().splitlines()[-1]

    def in_mesh(n: Meshd) -> bool:
        return st(n)["state"] == "running" and len(st(n)["peers"]) == 2

    def drop_of(n: Meshd) -> dict:
        return next(d for d in st(n)["desired"] if d["model"] == "m")

    nodes: list[Meshd] = []
    try:
        a = make(Meshd, "new-a").start()
        nodes.append(a)
        a.wait_for(serving, "new-a serves m", 30)
        old = make(OldMeshd, "old-o", token(a)).start()
        nodes.append(old)
        old.wait_for(serving, "old-o serves m", 30)
        b = make(Meshd, "new-b", token(a)).start()
        nodes.append(b)
        b.wait_for(serving, "new-b serves m", 30)
        for n in nodes:
            n.wait_for(in_mesh, f"{n.name} lists both others", 20)
        print("1. mixed mesh of three formed; every node serves m")

        t = time.monotonic()
        a.ctl("drop", "m")
        for n in nodes:
            n.wait_for(lambda x: st(x)["serving"] is None, f"{n.name} stopped m", 15)
        print(f"2. drop on new-a: all three stopped m within {time.monotonic() - t:.2f} s")

        t = time.monotonic()
        b.ctl("serve", "m")
        for n in (a, b):
            n.wait_for(serving, f"{n.name} serves m again", 15)
        print(
            f"3. serve on new-b: both new nodes serve m within {time.monotonic() - t:.2f} s; "
            f"old-o serves {st(old)['serving']} (it cannot hear serve)"
        )

        old.stop()
        old.start()
        old.wait_for(in_mesh, "old-o back in the mesh", 30)
        old.wait_for(serving, "old-o serves m after its restart", 30)
        print("4. old-o restarted: serves m again (an older meshd keeps no drop)")

        t = time.monotonic()
        old.ctl("drop", "m")
        for n in nodes:
            n.wait_for(lambda x: st(x)["serving"] is None, f"{n.name} stopped m", 15)
        for n in (a, b):
            n.wait_for(lambda x: drop_of(x)["state"] == "dropped", f"{n.name} holds the drop", 15)
        decisions = [drop_of(n) for n in (a, b)]
        assert decisions[0] == decisions[1], decisions
        print(
            f"5. drop on old-o (no version): taken by both new nodes within "
            f"{time.monotonic() - t:.2f} s as {decisions[0]}"
        )

        a.stop()
        before = len(a.log())
        a.start()
        a.wait_for(in_mesh, "new-a back in the mesh", 30)
        assert st(a)["serving"] is None and drop_of(a)["state"] == "dropped"
        assert "llama-server[m]: started" not in a.log()[before:]
        print("6. new-a restarted: does not serve m, holds the drop")

        for n in nodes:
            assert len(st(n)["peers"]) == 2, n.name
            bad = [
                line
                for line in n.log().splitlines()
                if ("bad " in line and " frame" in line)
                or "protocol-error" in line
                or "Traceback" in line
            ]
            assert not bad, (n.name, bad[:3])
        print("no bad frame, protocol error or traceback in any log; every node kept both peers")
        return 0
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for n in reversed(nodes):
            n.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
