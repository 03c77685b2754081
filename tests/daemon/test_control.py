"""The control API: routing to the node, status codes, and the UNIX socket's life cycle."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer

from meshd.daemon.control import (
    ControlResource,
    ControlSocketError,
    Refused,
    listen_control,
)

STATUS = {
    "node_id": "n1",
    "mesh_id": "m1",
    "role": "idle",
    "serving": None,
    "state": "ready",
    "api": "127.0.0.1:9337",
    "uptime_s": 1.5,
    "peers": [],
    "passive": {"clients": 0, "standby": 0},
    "models": [],
    "downloads": [],
}


class FakeNode:
    """Records what the control API asked for."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.pending: defer.Deferred | None = None

    def status(self):
        self.calls.append(("status",))
        return dict(STATUS)

    def peers(self):
        return [{"node_id": "p1"}]

    def model_table(self, catalog):
        self.calls.append(("models", catalog))
        return {"mesh": [], "catalog": [] if catalog else None}

    def leave(self):
        self.calls.append(("leave",))
        self.pending = defer.Deferred()
        return self.pending

    def drop(self, model):
        self.calls.append(("drop", model))
        if model == "nope":
            raise Refused("nope is not served anywhere")
        return {"dropped": model}

    def serve_model(self, model):
        self.calls.append(("serve_model", model))
        return {"serving": model}

    def make_token(self, ttl_s, once):
        self.calls.append(("make_token", ttl_s, once))
        return {"id": "t1", "token": "meshd1:abc", "expires_at": 1e9}

    def revoke_token(self, token_id):
        self.calls.append(("revoke_token", token_id))

    def join(self, token):
        return defer.fail(Refused("token expired"))

    def gpus(self):
        raise RuntimeError("NVML exploded")


def client(node) -> StubTreq:
    return StubTreq(ControlResource(node))


def call(treq_client, method, path, body=None):
    """One request against the resource, in memory; (status, decoded JSON)."""
    kwargs = {}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
    d = treq_client.request(method, "http://control" + path, **kwargs)
    result = []
    d.addCallback(lambda r: r.text().addCallback(lambda t: result.append((r.code, json.loads(t)))))
    treq_client.flush()
    assert result, "no answer"
    return result[0]


def test_get_status_returns_the_nodes_status_as_json():
    code, body = call(client(FakeNode()), "GET", "/status")
    assert code == 200
    assert body == STATUS


def test_get_peers_returns_a_list():
    assert call(client(FakeNode()), "GET", "/peers") == (200, [{"node_id": "p1"}])


def test_models_catalog_query_flag_reaches_the_node():
    node = FakeNode()
    t = client(node)
    call(t, "GET", "/models")
    call(t, "GET", "/models?catalog=1")
    assert node.calls == [("models", False), ("models", True)]


def test_drop_passes_the_model_name():
    node = FakeNode()
    code, body = call(client(node), "POST", "/drop", {"model": "gemma"})
    assert (code, body) == (200, {"dropped": "gemma"})
    assert node.calls == [("drop", "gemma")]


def test_refused_becomes_409_with_the_reason():
    code, body = call(client(FakeNode()), "POST", "/drop", {"model": "nope"})
    assert (code, body) == (409, {"error": "nope is not served anywhere"})


def test_refused_from_a_failed_deferred_becomes_409():
    code, body = call(client(FakeNode()), "POST", "/join", {"token": "meshd1:x"})
    assert (code, body) == (409, {"error": "token expired"})


def test_join_token_is_never_logged(caplog):
    caplog.set_level("INFO", logger="meshd.daemon.control")
    call(client(FakeNode()), "POST", "/join", {"token": "meshd1:SECRET"})
    assert "join requested" in caplog.text
    assert "SECRET" not in caplog.text


def test_drop_logs_the_model_name(caplog):
    caplog.set_level("INFO", logger="meshd.daemon.control")
    call(client(FakeNode()), "POST", "/drop", {"model": "gemma"})
    assert "drop requested (gemma)" in caplog.text


def test_method_the_node_lacks_answers_501():
    code, body = call(client(FakeNode()), "POST", "/download", {"name": "gemma"})
    assert code == 501
    assert "does not support download" in body["error"]


def test_unexpected_exception_answers_500_without_crashing(caplog):
    code, body = call(client(FakeNode()), "GET", "/gpus")
    assert code == 500
    assert "NVML exploded" in body["error"]


def test_token_defaults_to_24h_reusable():
    node = FakeNode()
    code, body = call(client(node), "POST", "/token", {})
    assert code == 200 and body["token"] == "meshd1:abc"
    assert node.calls == [("make_token", 86400.0, False)]


def test_token_passes_ttl_and_once():
    node = FakeNode()
    call(client(node), "POST", "/token", {"ttl_s": 1800, "once": True})
    assert node.calls == [("make_token", 1800.0, True)]


@pytest.mark.parametrize(
    "body",
    [{"ttl_s": -1}, {"ttl_s": "1h"}, {"ttl_s": True}, {"once": "yes"}],
)
def test_token_bad_arguments_answer_400(body):
    node = FakeNode()
    code, _ = call(client(node), "POST", "/token", body)
    assert code == 400
    assert node.calls == []


def test_revoke_with_no_result_answers_ok():
    node = FakeNode()
    assert call(client(node), "POST", "/token/revoke", {"id": "t1"}) == (200, {"ok": True})
    assert node.calls == [("revoke_token", "t1")]


def test_missing_required_field_answers_400():
    code, body = call(client(FakeNode()), "POST", "/drop", {})
    assert code == 400
    assert "'model'" in body["error"]


def test_malformed_json_body_answers_400():
    code, body = call(client(FakeNode()), "POST", "/drop", b"{not json")
    assert code == 400
    assert "not valid JSON" in body["error"]


def test_non_object_json_body_answers_400():
    code, _ = call(client(FakeNode()), "POST", "/drop", ["gemma"])
    assert code == 400


def test_unknown_path_answers_404():
    code, _ = call(client(FakeNode()), "GET", "/nothing")
    assert code == 404


def test_wrong_method_answers_405():
    node = FakeNode()
    code, _ = call(client(node), "GET", "/leave")
    assert code == 405
    assert node.calls == []


def test_leave_answers_when_the_nodes_deferred_fires():
    node = FakeNode()
    t = client(node)
    d = t.request("POST", "http://control/leave")
    got = []
    d.addCallback(lambda r: got.append(r.code))
    t.flush()
    assert node.calls == [("leave",)]
    assert got == []  # not answered while the node is still leaving
    node.pending.callback({"leaving": True})
    t.flush()
    assert got == [200]


# -- the UNIX socket ---------------------------------------------------------------


def _get_status(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"GET /status HTTP/1.0\r\nHost: meshd\r\n\r\n")
    return s


@pytest_twisted.inlineCallbacks
def test_listen_control_creates_parent_dir_and_socket_mode_0660(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "run" / "meshd" / "control.sock")
    port = yield listen_control(path, FakeNode(), reactor=reactor)
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_listen_control_answers_http_over_the_socket(tmp_path):
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    path = str(tmp_path / "control.sock")
    port = yield listen_control(path, FakeNode(), reactor=reactor)

    def fetch():
        s = _get_status(path)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data

    try:
        data = yield deferToThread(fetch)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["node_id"] == "n1"
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_stopping_the_port_removes_the_socket_file(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "control.sock")
    port = yield listen_control(path, FakeNode(), reactor=reactor)
    yield port.stopListening()
    assert not os.path.exists(path)


@pytest_twisted.inlineCallbacks
def test_stale_socket_file_is_replaced(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a daemon that died
    port = yield listen_control(path, FakeNode(), reactor=reactor)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_live_daemon_on_the_socket_is_refused_and_left_alone(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "control.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ControlSocketError, match="another meshd is already listening"):
            yield listen_control(path, FakeNode(), reactor=reactor)
        assert os.path.exists(path)
    finally:
        live.close()


@pytest_twisted.inlineCallbacks
def test_regular_file_in_the_way_is_refused_not_removed(tmp_path):
    from twisted.internet import reactor

    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="not a socket"):
        yield listen_control(str(path), FakeNode(), reactor=reactor)
    assert path.read_text() == "precious"


# -- what comes from outside: body size, JSON depth, numbers -------------------------------


def exchange(data: bytes, node=None, clock=None):
    """Bytes into the control Site over an in-memory transport; (answer, the request)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from meshd.daemon.control import make_site

    clock = clock or Clock()
    site = make_site(node or FakeNode(), reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport, channel, clock


def _post_head(extra: bytes) -> bytes:
    return b"POST /drop HTTP/1.1\r\nHost: meshd\r\nContent-Type: application/json\r\n" + extra


def test_a_body_declared_over_the_limit_is_refused_with_413_before_it_is_read():
    node = FakeNode()
    transport, channel, clock = exchange(_post_head(b"Content-Length: %d\r\n\r\n" % (299 << 20))
                                         + b"x" * 1000, node)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert "too large" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    request = channel.requests[0]
    assert request.content.getvalue() == b""  # nothing kept, in memory or in a file
    assert node.calls == []
    clock.advance(10)
    assert transport.disconnecting


def test_a_chunked_body_is_cut_off_at_the_limit_with_413():
    from meshd.daemon.control import MAX_BODY_BYTES

    node = FakeNode()
    piece = b"y" * 16384
    data = _post_head(b"Transfer-Encoding: chunked\r\n\r\n")
    data += b"%x\r\n%s\r\n" % (len(piece), piece) * (MAX_BODY_BYTES // len(piece) + 4)
    transport, channel, _ = exchange(data, node)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert len(channel.requests[0].content.getvalue()) <= MAX_BODY_BYTES
    assert node.calls == []


def test_an_oversized_body_with_expect_100_continue_is_not_invited():
    transport, _, _ = exchange(_post_head(b"Content-Length: 10000000\r\n"
                                          b"Expect: 100-continue\r\n\r\n"))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in transport.value()


def test_a_body_within_the_limit_still_reaches_the_node_through_the_site():
    node = FakeNode()
    body = json.dumps({"model": "gemma"}).encode()
    transport, _, _ = exchange(_post_head(b"Content-Length: %d\r\n\r\n" % len(body)) + body, node)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert node.calls == [("drop", "gemma")]


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000,
                                  b'{"model":' * 3000 + b'"x"' + b"}" * 3000,
                                  b'{"model": ' + b"[" * 65 + b"]" * 65 + b"}"])
def test_nested_json_answers_400_not_500(body, caplog):
    code, answer = call(client(FakeNode()), "POST", "/drop", body)
    assert code == 400
    assert "nested deeper" in answer["error"]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("ttl", [b"Infinity", b"-Infinity", b"NaN", b"1e300", b"315360001"])
def test_a_token_ttl_that_is_not_a_sane_number_answers_400(ttl):
    node = FakeNode()
    code, answer = call(client(node), "POST", "/token", b'{"ttl_s": %s}' % ttl)
    assert code == 400, answer
    assert "ttl_s" in answer["error"] or "not a JSON value" in answer["error"]
    assert node.calls == []


def test_a_token_ttl_of_ten_years_is_the_longest_accepted():
    node = FakeNode()
    assert call(client(node), "POST", "/token", {"ttl_s": 10 * 365 * 86400})[0] == 200
    assert node.calls == [("make_token", 10 * 365 * 86400.0, False)]


def test_serve_passes_the_model_name_and_is_logged(caplog):
    caplog.set_level("INFO", logger="meshd.daemon.control")
    node = FakeNode()
    code, body = call(client(node), "POST", "/serve", {"model": "gemma"})
    assert (code, body) == (200, {"serving": "gemma"})
    assert node.calls == [("serve_model", "gemma")]
    assert "serve_model requested (gemma)" in caplog.text


def test_serve_without_a_model_is_bad_usage():
    code, body = call(client(FakeNode()), "POST", "/serve", {})
    assert code == 400 and "'model'" in body["error"]
