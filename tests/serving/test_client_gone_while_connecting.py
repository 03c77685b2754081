"""A client that goes away while the API is still connecting to its upstream.

Found by ``tests/test_every_door.py`` (clients that never read, under load): the
client's disconnect cancelled the pending connect, whose errback took the cancel
for an unreachable host -- it marked the host failed, tried to answer 503 on the
lost connection and left ``Unhandled error in Deferred`` (a CRITICAL traceback)
in the log.  The request must end as the client's (499): no answer written, the
host not blamed, the upstream counted finished once, the connect cancelled.
"""

from __future__ import annotations

import gc
import json

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import log as twisted_log
from twisted.python.failure import Failure

from meshd.config import ApiConfig
from meshd.serving.api import ApiServer
from meshd.serving.routing import Upstream
from tests.serving.test_api import Router, chat


class PendingEndpoint:
    """An upstream whose TCP connect never completes (a busy or slow host)."""

    def __init__(self):
        self.pending: list[defer.Deferred] = []

    def __call__(self):
        return self

    def connect(self, factory):
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def test_a_client_gone_while_the_upstream_connect_is_pending_blames_no_host_and_logs_no_error():
    endpoint = PendingEndpoint()
    router = Router({"m": [Upstream(name="mem", endpoint=endpoint, pool_key="mem")]})
    api = ApiServer(router, ApiConfig(), reactor=Clock())
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    body = json.dumps(chat(stream=True)).encode()
    channel.dataReceived(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert len(endpoint.pending) == 1 and not endpoint.pending[0].called

    errors: list[dict] = []
    twisted_log.addObserver(errors.append)
    try:
        channel.connectionLost(Failure(ConnectionDone()))
        gc.collect()  # an unhandled failure is logged when its Deferred is collected
    finally:
        twisted_log.removeObserver(errors.append)

    assert endpoint.pending[0].called  # the connect was cancelled
    assert router.failed == []  # the host did nothing wrong
    assert router.finished == ["mem"]
    assert api.in_flight == 0 and api.forwards == set()
    assert client.value() == b""  # nothing written to the lost connection
    assert [e for e in errors if e.get("isError")] == []
