"""``python -m meshd.cli.static_api``: the meshd API alone, in front of fixed upstreams.

The same :class:`~meshd.serving.api.ApiServer` the daemon runs, with a
:class:`~meshd.serving.static.StaticRouter` instead of the mesh, so the
proxy's own cost can be measured (``bench/proxy_overhead.py``) and a
llama-server can be put behind meshd's API without a mesh.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from meshd import gctune
from meshd.config import ApiConfig, tcp_endpoint
from meshd.serving.api import ApiServer
from meshd.serving.static import StaticRouter

PROG = "python -m meshd.cli.static_api"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The meshd API alone, in front of fixed upstreams.")
    p.add_argument("--static", action="append", default=[], metavar="MODEL=HOST:PORT",
                   help="serve MODEL from HOST:PORT (repeat for more upstreams or models)")
    p.add_argument("--listen", default="127.0.0.1:9337", help="HOST:PORT (default: %(default)s)")
    p.add_argument("--api-key", default="", help="require this bearer key (default: none)")
    return p


def parse_table(p: argparse.ArgumentParser, items: list[str]) -> dict[str, list[str]]:
    """``MODEL=HOST:PORT`` items into ``{model: [addr, ...]}``, in the order given."""
    table: dict[str, list[str]] = {}
    for item in items:
        model, sep, addr = item.partition("=")
        if not sep or not model or not addr:
            p.error(f"--static {item!r}: expected MODEL=HOST:PORT")
        table.setdefault(model, []).append(addr)
    return table


def main(argv: list[str] | None = None) -> int:
    from meshd import reactor as meshd_reactor

    meshd_reactor.install()  # before anything imports Twisted's default one
    from twisted.internet import endpoints
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor  # the reactor module's type is not the reactor's

    p = parser()
    args = p.parse_args(argv)
    table = parse_table(p, args.static)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        router = StaticRouter(table, reactor=reactor)
        endpoint = endpoints.serverFromString(reactor, tcp_endpoint(args.listen))
    except ValueError as e:  # a bad HOST:PORT: one line, exit 2
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    api = ApiServer(router, ApiConfig(listen=args.listen, api_key=args.api_key), reactor=reactor)
    failed: list[str] = []

    def listening(_port: Any) -> None:
        print(f"listening on {args.listen}", flush=True)

    def cannot_listen(f: Any) -> None:
        failed.append(f.getErrorMessage())
        print(f"cannot listen on {args.listen}: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    endpoint.listen(api.site).addCallbacks(listening, cannot_listen)
    gctune.tune()
    reactor.run()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
