"""Many passive clients in one process: each its own fresh identity, its own TLS
connection and route client (``meshd.passive.client.RouteClient``, the code a ``--client``
runs), checking in with the mesh every ``--refresh-s``.

    python3 bench/passive_swarm.py --token TOKEN --count 250 --refresh-s 1 --seconds 20

Joins are spread over ``--ramp-s``.  Prints one JSON line at the end (and writes it to
``--out``): how many clients held a table, requests sent, tables and "same" answers
received, reconnects.  Used by ``tests/passive/test_passive_mesh.py`` (scale) and
``bench/passive_scale.py``; it only ever connects to the addresses in the token.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--token", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--refresh-s", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--ramp-s", type=float, default=5.0)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from twisted.internet import reactor

    from meshd.mesh import identity, tokens
    from meshd.mesh.peer import Timing
    from meshd.passive.client import RouteClient
    from meshd.serving.routetable import CheckIn

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    token = tokens.decode(args.token)
    clients: list[RouteClient] = []

    def make(i: int) -> None:
        c = RouteClient(reactor=reactor, identity=identity.ephemeral(), kind="client",
                        checkin=lambda etag: CheckIn("client", etag, args.refresh_s),
                        timing=Timing(handshake_timeout_s=10.0), refresh_s=args.refresh_s,
                        answer_timeout_s=10.0, rejoin_max_s=5.0, tokens=[token])
        clients.append(c)
        c.start()

    for i in range(args.count):
        reactor.callLater(args.ramp_s * i / max(1, args.count), make, i)

    def finish() -> None:
        with_table = sum(1 for c in clients if c.table is not None)
        switches = sum(sum(1 for _, what in c.history if what.startswith("lost")) for c in clients)
        result = {"clients": len(clients), "with_table": with_table,
                  "requests": sum(c.requests for c in clients),
                  "tables": sum(c.tables for c in clients), "lost_connections": switches,
                  "connected": sum(1 for c in clients if c.conn is not None)}
        for c in clients:
            c.stop()
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line)
        reactor.callLater(0.5, reactor.stop)

    reactor.callLater(args.seconds, finish)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
