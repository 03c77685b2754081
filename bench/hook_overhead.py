"""Per-request cost of choosing a host through the plugin hooks vs a direct call.

Every request for a model with several hosts goes through
``meshd.placement.rules.choose_host``, which asks the plugins (pluggy, a guard per
hook function that times the call and checks the answer) before the default
decides.  This measures what that path adds over calling the default's
function directly, with the default plugin alone and with an operator plugin
(``least_loaded``) asked first.  Goal: under 20 µs per request.

    python3 bench/hook_overhead.py [--hosts 3] [--calls 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.config import Config  # noqa: E402
from meshd.placement import default, plugins  # noqa: E402
from meshd.placement import rules as placement  # noqa: E402
from meshd.placement.snapshot import GB, MeshView, NodeView  # noqa: E402


def per_call_us(fn, calls: int, repeat: int) -> float:
    """The best of ``repeat`` runs of ``calls`` calls, in µs per call (least disturbed)."""
    return min(timeit.repeat(fn, number=calls, repeat=repeat)) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    hosts = tuple(
        NodeView(f"node-{i:02d}", role="host", vram_bytes=8 * GB, serving=("gemma",), load=i % 3)
        for i in range(args.hosts)
    )
    mesh = MeshView("client", hosts)  # a passive client's view: the default hashes
    only_default = plugins.load(Config(), plugins_dir=None, entry_points=[], trace=False)
    with_plugin = plugins.load(
        Config().replace("policy", plugins=["least_loaded"]),
        plugins_dir=None, entry_points=[], search_dirs=[str(ROOT / "plugins")], trace=False,
    )
    client = "client-42"

    def direct():
        default.meshd_select_host("gemma", client, hosts, mesh)

    def through_hooks():
        placement.choose_host("gemma", client, hosts, mesh, policy=only_default)

    def through_plugin():
        placement.choose_host("gemma", client, hosts, mesh, policy=with_plugin)

    assert placement.choose_host("gemma", client, hosts, mesh, policy=only_default) == \
        default.meshd_select_host("gemma", client, hosts, mesh)

    d = per_call_us(direct, args.calls, args.repeat)
    h = per_call_us(through_hooks, args.calls, args.repeat)
    p = per_call_us(through_plugin, args.calls, args.repeat)
    print(f"hosts: {args.hosts}, calls: {args.calls} x {args.repeat} (best run), python {sys.version.split()[0]}")
    print(f"direct default function call:              {d:7.2f} µs")
    print(f"placement.choose_host, default plugin:      {h:7.2f} µs  (+{h - d:.2f} µs from the hooks)")
    print(f"placement.choose_host, least_loaded first:  {p:7.2f} µs  (+{p - d:.2f} µs)")
    verdict = "met" if h - d < 20 else "NOT met"
    print(f"goal: hooks add under 20 µs per request: {verdict}")


if __name__ == "__main__":
    main()
