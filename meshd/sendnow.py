"""Writes that go to the socket at once when nothing is queued before them.

Twisted's ``transport.write`` only queues: the bytes leave at the reactor's next
turn, after an ``epoll_ctl`` to watch the socket for writing, a wake-up for it,
and another ``epoll_ctl`` to stop watching.  On the proxy's per-chunk path that
is most of a chunk's cost (a stream's chunk arrives in a read of its own), and
it delays each chunk to the next turn (and a stream's first chunks wait behind its
head for one more upstream read).  Like asyncio's transports, :func:`write`
tries ``send()`` first when the transport's buffer is empty, and queues only
what the socket did not take (or everything, on any transport that is not a
plain TCP connection, or when something is queued already, so the order of
bytes is kept).  Every HTTP door's writes go through it
(``meshd.httpbounds.BoundedChannel``), and so do the proxy's requests upstream
and the TLS records of peer connections and tunnels (:class:`TLSTransport`).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol


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


def unsent(transport: Any) -> int:
    """Bytes ``transport`` holds that the socket has not taken yet (0 for anything that
    is not a plain TCP connection: a tunnel's bytes are its TLS connection's)."""
    if not isinstance(transport, tcp.Connection) or not transport.connected:
        return 0
    return (len(transport.dataBuffer) - transport.offset
            + transport._tempDataLen)  # noqa: SLF001 - see _nothing_queued


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


class TLSTransport(TLSMemoryBIOProtocol):
    """Twisted's TLS transport, each write a TLS record sent through :func:`write`.

    Twisted's default (``BufferingTLSTransport``) gathers the writes of one
    reactor turn into one record: each turn with a write schedules a
    ``callLater(0)`` and the record is made in the next turn. On a tunnel that
    carries a model's tokens, one at a time, that is every token: a timer, an
    extra turn of the reactor and a token held back by it. The record then went
    to the TCP transport's queue, for yet another turn (an ``epoll_ctl`` to watch
    the socket, a turn, a ``send()`` and another ``epoll_ctl``). Here a write is
    encrypted and its record handed to ``send()`` at once; what the socket does
    not take is queued, in order, as before. meshd's own writers already gather
    what belongs together (a frame, a request, the writes of one upstream read:
    ``meshd.httpbounds.BoundedChannel.hold_writes``), so there is nothing left
    for the turn's aggregation to join (BENCHMARKS.md, "Tunnel overhead": the
    real model's tokens/s through a tunnel went from 0.970-0.981 to 0.986-0.988
    of the host's own API). The connection's TLS stays the memory-BIO protocol's,
    so the TCP transport underneath is plain (``write`` needs that).

    The one override is of ``_flushSendBIO``, a private method of Twisted's
    ``TLSMemoryBIOProtocol`` (Twisted is pinned in constraints.txt;
    ``tests/test_sendnow.py`` fails if the method it replaces goes away).
    """

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 - Twisted's name
        # records sent as they are made meet Nagle's algorithm otherwise: the second
        # of a handshake's or a HELLO's records waited for the ACK of the first (the
        # peer's delayed ACK: 40 ms a foreign HELLO took, instead of 3)
        no_delay(transport)
        super().makeConnection(transport)

    def _flushSendBIO(self) -> None:  # noqa: N802 - Twisted's name
        try:
            data = self._tlsConnection.bio_read(2**15)
        except WantReadError:
            return  # nothing in the send BIO right now
        write(self.transport, data)


class TLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` building :class:`TLSTransport` (its public ``protocol``)."""

    protocol = TLSTransport
