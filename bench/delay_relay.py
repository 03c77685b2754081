"""A TCP relay that adds a fixed delay to every byte, each way (this kernel has no netem).

    python3 bench/delay_relay.py --delay-ms 100 LISTEN=TARGET [LISTEN=TARGET ...]

e.g. ``10.78.1.1:7842=10.78.1.2:7842``: connections to LISTEN are relayed to TARGET,
and every chunk read on either side is written to the other ``--delay-ms`` later
(in order; a slow reader slows its writer: backpressure is kept).  EOF is passed
on after the same delay, a reset as a reset.  Prints ``ready`` once listening.

``--start-off`` relays with no delay until SIGUSR1, which turns ``--delay-ms`` on;
SIGUSR2 turns it off again (``bench/chaos.py`` adds and removes the delay this way,
without cutting the connections that cross the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

DELAY = {"s": 0.0}  # the delay now, each way (a dict: the signal handlers change it)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)

    async def read() -> None:
        try:
            while data := await reader.read(65536):
                await queue.put((loop.time() + DELAY["s"], data))
        except OSError:
            writer.transport.abort()  # pass a reset on as a reset
        await queue.put((loop.time() + DELAY["s"], b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except OSError:
        writer.transport.abort()


async def relay(target: tuple[str, int], cr, cw) -> None:
    try:
        tr, tw = await asyncio.open_connection(*target)
    except OSError:
        cw.transport.abort()
        return
    for w in (cw, tw):
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pipe(cr, tw), pipe(tr, cw), return_exceptions=True)
    for w in (cw, tw):
        w.close()


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=100.0, help="added each way")
    parser.add_argument("--start-off", action="store_true",
                        help="no delay until SIGUSR1 (SIGUSR2: off again)")
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET")
    args = parser.parse_args()
    delay_s = args.delay_ms / 1000
    DELAY["s"] = 0.0 if args.start_off else delay_s
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, DELAY.__setitem__, "s", delay_s)
    loop.add_signal_handler(signal.SIGUSR2, DELAY.__setitem__, "s", 0.0)
    servers = []
    for route in args.routes:
        listen, target = (hostport(p) for p in route.split("="))
        servers.append(await asyncio.start_server(
            lambda r, w, t=target: relay(t, r, w), *listen))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
