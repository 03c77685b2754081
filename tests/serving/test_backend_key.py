"""The per-start key of a local llama-server: only meshd holds it, so the backend's API
answers nobody else (a local process, a web page in a local browser)."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from meshd.backends import supervisor as backend
from meshd.backends.supervisor import LlamaServer, RpcServer
from meshd.config import LlamaConfig
from meshd.serving.proxy import ConnectionPool, UpstreamConnection, authorized, request_head
from meshd.serving.router import LocalOnlyRouter, MeshRouter
from meshd.serving.routing import Upstream
from tests.harness.meshfakes import make_node, peer, serve

LLAMA = LlamaConfig(ctx_size=2048, restart_min_s=1.0, restart_max_s=4.0, health_interval_s=0.25)


class _Process:
    def __init__(self, pid):
        self.pid = pid

    def signalProcess(self, name):
        raise error.ProcessExitedAlready()


def _llama(spawned):
    ports = iter(range(41001, 41100))

    def spawn(protocol, argv, env):
        spawned.append((protocol, argv, env))
        return _Process(2000 + len(spawned))

    return LlamaServer(name="tiny", model_path="/models/tiny.gguf", llama=LLAMA,
                       bin_dir="/opt/llama/bin", reactor=Clock(), _spawn=spawn,
                       _probe=lambda port: succeed(backend.PROBE_DOWN),
                       _pick_port=lambda: next(ports))


def test_each_start_gets_a_fresh_key_in_the_environment_never_on_the_command_line():
    spawned: list = []
    server = _llama(spawned)
    server.start()
    protocol, argv, env = spawned[0]
    first = server.api_key
    assert len(first) >= 32 and env["LLAMA_API_KEY"] == first
    assert not any(first in arg for arg in argv) and "--api-key" not in argv
    protocol.processEnded(Failure(error.ProcessTerminated(exitCode=1)))
    server._reactor.advance(LLAMA.restart_max_s)
    _, argv, env = spawned[1]
    assert server.api_key != first and env["LLAMA_API_KEY"] == server.api_key
    assert not any(server.api_key in arg for arg in argv)


def test_rpc_server_gets_no_key_llama_cpp_has_no_auth_for_it(monkeypatch):
    monkeypatch.delenv("LLAMA_API_KEY", raising=False)
    envs: list = []
    rpc = RpcServer(name="rpc", llama=LLAMA, bin_dir="/opt/llama/bin", reactor=Clock(),
                    _spawn=lambda protocol, argv, env: envs.append(env) or _Process(3000),
                    _probe=lambda port: succeed(backend.PROBE_DOWN), _pick_port=lambda: 41200)
    rpc.start()
    assert "LLAMA_API_KEY" not in envs[0]


def test_the_local_upstream_reads_the_backend_key_per_request_a_tunnel_carries_none():
    node = make_node()
    fake = serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    r = MeshRouter(node, reactor=node.reactor, tunnel=lambda node_id, model: None)
    node.router = r
    node.add_status_listener(r.invalidate)
    fake.api_key = "k1"
    (local,) = r.upstreams("m1", "c")
    assert local.api_key is not None and local.api_key() == "k1"
    fake.api_key = "k2"  # a restart: the cached upstream sends the new run's key
    assert local.api_key() == "k2"
    (tunnel,) = r.upstreams("m2", "c")
    assert tunnel.api_key is None
    # the far end of a tunnel answers from its own llama-server, with its own key
    (far,) = LocalOnlyRouter(r).upstreams("m1", "c")
    assert far.api_key is not None and far.api_key() == "k2"


def _sent(upstream: Upstream, headers=()) -> bytes:
    conn = UpstreamConnection(upstream, ConnectionPool(Clock()))
    transport = StringTransport()
    conn.makeConnection(transport)
    head = request_head(b"POST", b"/v1/chat/completions",
                        [(b"content-type", b"application/json"), *headers], 2)
    conn.send(head, b"{}", _NullSink())
    return transport.value()


class _NullSink:
    def response_head(self, status, headers, length): ...
    def response_data(self, data): ...
    def response_framed(self, pieces, payload): ...
    def response_end(self): ...
    def response_failed(self, reason, started): ...
    def read_begins(self): ...
    def read_ends(self): ...


def test_the_proxy_sends_the_key_to_a_local_upstream_only():
    local = Upstream(name="local", endpoint=lambda: None, api_key=lambda: "s3cret")
    sent = _sent(local)
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert sent.count(b"Authorization: Bearer s3cret\r\n") == 1
    assert sent.endswith(b"\r\n\r\n{}")
    tunnel = Upstream(name="node-b", endpoint=lambda: None)
    assert b"authorization" not in _sent(tunnel).lower()
    # a backend not started yet (no key): nothing to add
    assert b"authorization" not in _sent(Upstream(name="local", endpoint=lambda: None,
                                                  api_key=lambda: "")).lower()


def test_an_authorization_already_in_the_head_is_replaced_not_passed_on():
    local = Upstream(name="local", endpoint=lambda: None, api_key=lambda: "ours")
    sent = _sent(local, [(b"authorization", b"Bearer theirs")])
    assert b"theirs" not in sent and sent.count(b"Authorization: Bearer ours\r\n") == 1
    head = request_head(b"POST", b"/x", [], 0)
    assert authorized(head, Upstream(name="t", endpoint=lambda: None)) is head
