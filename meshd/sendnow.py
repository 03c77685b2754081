"""Writes that go to the socket at once when nothing is queued before them.

Twisted's ``transport.write`` only queues: the bytes leave at the reactor's next
turn, after an ``epoll_ctl`` to watch the socket for writing, a wake-up for it,
and another ``epoll_ctl`` to stop watching.  On the proxy's per-chunk path that
is most of a chunk's cost (a stream's chunk arrives in a read of its own), and
it delays each chunk to the next turn (and a stream's first chunks wait behind its
head for one more upstream read).  Like asyncio's transports, :func:`write`
tries ``send()`` first when the transport's buffer is empty, and queues only
what the socket did not take (or everything, on any transport that is not a
plain TCP connection, e.g. a tunnel's TLS, or when something is queued already,
so the order of bytes is kept).  Every HTTP door's writes go through it
(``meshd.httpbounds.BoundedChannel``), and so do the proxy's requests upstream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, the first ``send()`` made now where it can be."""
    if isinstance(transport, tcp.Connection) and _nothing_queued(transport):
        sent = transport.writeSomeData(data)
        # an exception: the connection is lost; queued, the reactor finds out as usual
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def no_delay(transport: Any) -> None:
    """TCP_NODELAY on ``transport`` where it has it: small writes sent at once must not
    wait for the ACK of the one before (Nagle's algorithm) nor for a delayed ACK.
    Anything that is not TCP (a UNIX socket, a test's transport) is left as it is."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, NotImplementedError, OSError):
        pass


def _nothing_queued(t: Any) -> bool:
    # the fields FileDescriptor.write and doWrite read: the buffer (dataBuffer from
    # offset, then _tempDataBuffer) and the half-close flag; and never past TLS begun
    # on the connection itself (after startTLS its write encrypts)
    return (t.connected and not t.disconnecting and not t.TLS
            and not t._writeDisconnected  # noqa: SLF001
            and not t._tempDataLen  # noqa: SLF001
            and t.offset == len(t.dataBuffer))
