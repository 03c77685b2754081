"""meshd.metrics: each metric group moves with what it counts, read back through
``/metrics`` text parsed by prometheus_client's own parser.

Deterministic: in-memory API connections and a Clock (the API's histograms read the
reactor's clock), a real Node over the fake mesh of ``tests.harness.meshfakes``, the
gossip's MeshService with stand-in connections, the downloads table with a Clock.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from meshd.config import ApiConfig, Config
from meshd.mesh import identity as identitymod
from meshd.mesh.gossip import MeshService
from meshd.mesh.membership import PeerView
from meshd.mesh.wire import CloseCode
from meshd.metrics import DeathCause, Hop, NodeMetrics, RouteKind
from meshd.models.download import Downloads
from meshd.serving.api import ApiServer
from meshd.serving.routing import Upstream
from meshd.statedir import StateDir
from meshd.states import MemberState, Role
from tests.conftest import ROOT
from tests.harness.meshfakes import FakeBackend, make_node, peer, serve
from tests.harness.promtext import Scrape
from tests.serving.test_api import SSE_HEAD, MemoryUpstreams, Router, chat, sse
from tests.serving.test_deadlines import JSON_OK, client_channel, post


def scrape(metrics: NodeMetrics) -> Scrape:
    return Scrape(metrics.render().decode())


# -- the API ------------------------------------------------------------------------------------


def api_with(
    upstreams: dict[str, list[Upstream]], metrics: NodeMetrics, clock: Clock, relay: bool = False
) -> ApiServer:
    return ApiServer(
        Router(upstreams), ApiConfig(), reactor=clock, metrics=metrics.api, relay=relay
    )


def watched(metrics: NodeMetrics, *apis: tuple[Hop, ApiServer]) -> None:
    metrics.watch(make_node(), apis=lambda: list(apis))


def test_a_local_stream_counts_its_request_first_byte_duration_bytes_and_events():
    metrics, clock, ups = NodeMetrics(), Clock(), MemoryUpstreams()
    api = api_with({"m": [Upstream("local", ups.endpoint, pool_key="local:m:1")]}, metrics, clock)
    watched(metrics, (Hop.SERVED, api))
    channel, client = client_channel(api)
    post(channel, doc=chat(stream=True))
    assert scrape(metrics).value("meshd_api_in_flight", hop="served") == 1
    clock.advance(0.3)
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD + sse(0) + sse(1))
    clock.advance(1.5)
    upstream.dataReceived(sse(2) + b"0\r\n\r\n")
    s = scrape(metrics)
    labels = {"hop": "served", "model": "m", "route": "local"}
    assert s.value("meshd_api_requests_total", status="200", **labels) == 1
    assert s.value("meshd_api_in_flight", hop="served") == 0
    assert s.value("meshd_api_sse_events_total", **labels) == 3
    assert s.value("meshd_api_response_bytes_total", **labels) == 3 * len(b'data: {"n": 0}\n\n')
    # the first byte came at 0.3 s, the end at 1.8 s: bucket edges tell them apart
    assert s.value("meshd_api_time_to_first_byte_seconds_bucket", le="0.25", **labels) == 0
    assert s.value("meshd_api_time_to_first_byte_seconds_bucket", le="0.5", **labels) == 1
    assert s.value("meshd_api_time_to_first_byte_seconds_sum", **labels) == 0.3
    assert s.value("meshd_api_request_duration_seconds_bucket", le="1.0", **labels) == 0
    assert s.value("meshd_api_request_duration_seconds_bucket", le="2.5", **labels) == 1
    assert s.value("meshd_api_request_bytes_total", hop="served", route="local") > 0
    assert s.families["meshd_api_time_to_first_byte_seconds"].type == "histogram"


def test_a_long_streams_events_show_while_it_runs():
    metrics, clock, ups = NodeMetrics(), Clock(), MemoryUpstreams()
    api = api_with({"m": [Upstream("local", ups.endpoint, pool_key="local:m:1")]}, metrics, clock)
    channel, _ = client_channel(api)
    post(channel, doc=chat(stream=True))
    upstream = ups.connections[0]
    upstream.dataReceived(SSE_HEAD)
    for i in range(40):
        upstream.dataReceived(sse(i))
    running = scrape(metrics).value("meshd_api_sse_events_total", route="local")
    assert 32 <= running < 40  # counted in batches while the stream runs
    upstream.dataReceived(b"0\r\n\r\n")
    assert scrape(metrics).value("meshd_api_sse_events_total", route="local") == 40


def test_a_tunnelled_request_is_served_here_and_relayed_at_the_host():
    metrics, clock = NodeMetrics(), Clock()
    tunnel, llama = MemoryUpstreams(), MemoryUpstreams()
    here = api_with({"m": [Upstream("b", tunnel.endpoint, pool_key="tunnel:b:m")]}, metrics, clock)
    host_metrics = NodeMetrics()  # the host is another daemon: a registry of its own
    host = api_with(
        {"m": [Upstream("local", llama.endpoint, pool_key="local:m:1")]},
        host_metrics,
        clock,
        relay=True,
    )
    channel, _ = client_channel(here)
    post(channel)
    tunnel.connections[0].dataReceived(JSON_OK)
    host_channel, _ = client_channel(host)
    post(host_channel)
    llama.connections[0].dataReceived(JSON_OK)
    s, h = scrape(metrics), scrape(host_metrics)
    assert s.value("meshd_api_requests_total", hop="served", route="tunnel", status="200") == 1
    assert s.value("meshd_api_requests_total", hop="relayed") == 0
    assert h.value("meshd_api_requests_total", hop="relayed", route="local", status="200") == 1
    assert h.value("meshd_api_requests_total", hop="served") == 0
    # summed over the mesh, "served" counts the request once
    assert (
        s.value("meshd_api_requests_total", hop="served")
        + h.value("meshd_api_requests_total", hop="served")
    ) == 1


def test_a_failover_counts_the_failed_upstream_and_the_route_it_took():
    metrics, clock = NodeMetrics(), Clock()
    first, second = MemoryUpstreams(), MemoryUpstreams()
    api = api_with(
        {
            "m": [
                Upstream("local", first.endpoint, pool_key="local:m:1"),
                Upstream("b", second.endpoint, pool_key="tunnel:b:m"),
            ]
        },
        metrics,
        clock,
    )
    channel, client = client_channel(api)
    post(channel)
    first.connections[0].transport.loseConnection()  # closed before any response byte
    second.connections[0].dataReceived(JSON_OK)
    assert client.value().startswith(b"HTTP/1.1 200 ")
    s = scrape(metrics)
    assert s.value("meshd_api_requests_total", route="failover", status="200", model="m") == 1
    assert s.value("meshd_api_failovers_total", hop="served", model="m") == 1
    assert s.value("meshd_api_upstream_errors_total", model="m", upstream="local") == 1
    assert s.value("meshd_api_upstream_errors_total", upstream="tunnel") == 0
    assert s.value("meshd_api_time_to_first_byte_seconds_count", route="failover") == 1
    # both tries sent the body
    assert (
        s.value("meshd_api_request_bytes_total", route="local")
        == s.value("meshd_api_request_bytes_total", route="failover")
        > 0
    )
    assert api.metrics.failovers == 1 and api.metrics.requests == {("m", 200): 1}


def test_refusals_count_without_a_route_and_unknown_models_without_a_name():
    metrics, clock = NodeMetrics(), Clock()
    api = api_with({"m": []}, metrics, clock)
    for doc in (chat("nope"), chat("m"), {"messages": []}):
        channel, _ = client_channel(api)
        post(channel, doc=doc)
    s = scrape(metrics)
    assert s.value("meshd_api_requests_total", model="", status="404", route="none") == 1
    assert s.value("meshd_api_requests_total", model="m", status="503", route="none") == 1
    assert s.value("meshd_api_requests_total", model="", status="400", route="none") == 1
    assert all(labels["model"] in ("", "m") for labels in s.labelsets("meshd_api_requests_total"))


def test_the_api_serves_its_registry_at_metrics():
    metrics, clock = NodeMetrics(), Clock()
    api = api_with({"m": []}, metrics, clock)
    watched(metrics, (Hop.SERVED, api))
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = client.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/plain" in head
    s = Scrape(body.decode())
    assert s.families["meshd_node_role"].type == "gauge"
    assert s.value("meshd_api_in_flight", hop="served") == 0


def test_metrics_need_the_api_key_when_one_is_set():
    metrics, clock = NodeMetrics(), Clock()
    api = ApiServer(Router({"m": []}), ApiConfig(api_key="k"), reactor=clock, metrics=metrics.api)
    for key, status in (
        (b"", b"401"),
        (b"Authorization: Bearer wrong\r\n", b"401"),
        (b"Authorization: Bearer k\r\n", b"200"),
    ):
        channel, client = client_channel(api)
        channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + key + b"\r\n")
        assert client.value().startswith(b"HTTP/1.1 " + status), (key, client.value()[:40])
    assert b"meshd_api_requests_total" in client.value()


def test_every_metric_the_daemon_exports_is_in_the_operations_guide_and_back():
    metrics, node = NodeMetrics(), make_node()
    metrics.watch(node, apis=lambda: [])
    exported = set(scrape(metrics).families)
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Metrics") : text.index("### Scraping a whole mesh")]
    documented = {
        re.sub(r"_total$", "", name) for name in re.findall(r"^\| `(meshd_\w+)` \|", section, re.M)
    }
    assert exported == documented


# -- the node's states --------------------------------------------------------------------------


def test_peers_by_state_and_the_role_are_read_from_the_live_node():
    metrics, node = NodeMetrics(), make_node()
    metrics.watch(node)
    s = scrape(metrics)
    assert s.value("meshd_peers", state="alive") == 0
    assert s.value("meshd_node_role", role="idle") == 1
    node.mesh.members = {
        "b": peer("b"),
        "c": peer("c"),
        "d": dataclasses.replace(peer("d"), state=MemberState.VERIFYING),
    }
    s = scrape(metrics)
    assert s.value("meshd_peers", state="alive") == 2
    assert s.value("meshd_peers", state="verifying") == 1


def test_backend_states_and_restarts_follow_the_llama_servers():
    metrics, node = NodeMetrics(), make_node()
    metrics.watch(node)
    backend = serve(node, "m", state="loading")
    s = scrape(metrics)
    assert s.value("meshd_backend_state", kind="llama-server", model="m", state="loading") == 1
    assert s.value("meshd_backend_state", kind="llama-server", model="m", state="ready") == 0
    backend.set("ready")
    backend.restarts = 2
    s = scrape(metrics)
    assert s.value("meshd_backend_state", model="m", state="ready") == 1
    assert s.value("meshd_backend_restarts_total", kind="llama-server", model="m") == 2
    assert s.value("meshd_node_role", role="host") == 1


def test_rpc_servers_and_rpc_tunnels_of_a_split_are_read_from_the_split_runtime():
    metrics, node = NodeMetrics(), make_node()
    worker, own = FakeBackend("ready"), FakeBackend("restarting")
    own.restarts = 1
    node.split = SimpleNamespace(  # type: ignore[assignment]
        worker_rpc=worker,
        lending=("big", "host-1"),
        hosting={"other": SimpleNamespace(local_rpc=own)},
        tunnel_host=SimpleNamespace(opened=5, tunnels={"a", "b"}),
    )
    metrics.watch(node)
    s = scrape(metrics)
    assert s.value("meshd_backend_state", kind="rpc-server", model="big", state="ready") == 1
    assert s.value("meshd_backend_state", kind="rpc-server", model="other", state="restarting") == 1
    assert s.value("meshd_backend_restarts_total", kind="rpc-server", model="other") == 1
    assert s.value("meshd_tunnels_opened_total", purpose="rpc") == 5
    assert s.value("meshd_tunnels_open", purpose="rpc") == 2


def test_role_changes_count_a_standbys_promotion():
    metrics, node = NodeMetrics(), make_node(standby=True)
    metrics.watch(node)
    assert scrape(metrics).value("meshd_role_changes_total") == 0
    node.roles.promote("m", "its host died", {})
    s = scrape(metrics)
    assert s.value("meshd_role_changes_total", **{"from": "standby", "to": "idle"}) == 1
    assert s.value("meshd_node_role", role=str(Role.IDLE)) == 1


def test_elections_passive_nodes_route_requests_and_tunnels_are_read_at_scrape_time():
    metrics, node = NodeMetrics(), make_node()
    tunnels = SimpleNamespace(opened=0, tunnels=set())
    metrics.watch(node, tunnels=lambda: tunnels)
    s = scrape(metrics)
    assert s.value("meshd_elections_total") == 0
    assert s.value("meshd_passive_nodes", kind="client") == 0
    node.rebalancer = SimpleNamespace(decisions=3, role=None)  # type: ignore[assignment]
    node.route_server = SimpleNamespace(  # type: ignore[assignment]
        counts=lambda: {"clients": 2, "standby": 1, "requests": 7}
    )
    tunnels.opened, tunnels.tunnels = 4, {"t1"}
    s = scrape(metrics)
    assert s.value("meshd_elections_total") == 3
    assert s.value("meshd_passive_nodes", kind="client") == 2
    assert s.value("meshd_passive_nodes", kind="standby") == 1
    assert s.value("meshd_route_table_requests_total") == 7
    assert s.value("meshd_tunnels_opened_total", purpose="http") == 4
    assert s.value("meshd_tunnels_open", purpose="http") == 1


# -- the mesh -----------------------------------------------------------------------------------


def mesh_service(tmp_path) -> tuple[MeshService, NodeMetrics]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    ident = identitymod.load_or_create(state)
    metrics = NodeMetrics()
    mesh = MeshService(
        Config(), state, ident, reactor=MemoryReactorClock(), local_info=lambda: {}, metrics=metrics
    )
    mesh._broadcast = lambda frame_type, body, **kw: None  # type: ignore[method-assign]
    return mesh, metrics


def member(mesh: MeshService, node_id: str, close_code: CloseCode | None, silent_s: float):
    conn = SimpleNamespace(node_id=node_id, close_code=close_code, silent_s=lambda: silent_s)
    mesh.conns[node_id] = conn  # type: ignore[assignment]
    mesh.table.announced(
        PeerView(
            node_id=node_id,
            addrs=("127.0.0.1:1",),
            role="idle",
            serving=(),
            vram_bytes=0,
            available_models=(),
            requested_models=(),
            rtt_ms=None,
            state="alive",
            incarnation=1,
            api="127.0.0.1:2",
        )
    )
    return conn


def test_a_heartbeat_timeout_is_a_missed_heartbeat_and_a_death_with_its_silence(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    mesh.peer_closed(member(mesh, "b", CloseCode.TIMEOUT, 6.0), "no heartbeat for 6.0 s")
    s = scrape(metrics)
    assert s.value("meshd_peer_heartbeat_timeouts_total") == 1
    assert s.value("meshd_peer_deaths_total", cause="heartbeat") == 1
    assert s.value("meshd_peer_death_detection_seconds_count") == 1
    assert s.value("meshd_peer_death_detection_seconds_bucket", le="5.0") == 0
    assert s.value("meshd_peer_death_detection_seconds_bucket", le="6.0") == 1


def test_a_closed_connection_is_a_death_without_a_missed_heartbeat(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    mesh.peer_closed(member(mesh, "b", None, 0.4), "connection lost")
    s = scrape(metrics)
    assert s.value("meshd_peer_heartbeat_timeouts_total") == 0
    assert s.value("meshd_peer_deaths_total", cause="closed") == 1
    assert s.value("meshd_peer_death_detection_seconds_sum") == 0.4


def test_a_duplicate_connection_whose_twin_never_opens_is_a_closed_death(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    mesh.peer_closed(member(mesh, "b", CloseCode.DUPLICATE, 0.1), "duplicate")
    assert scrape(metrics).value("meshd_peer_deaths_total") == 0  # the twin may still open
    mesh.reactor.advance(mesh.cfg.connect_timeout_s + 1)
    s = scrape(metrics)
    assert s.value("meshd_peer_deaths_total", cause="closed") == 1
    assert s.value("meshd_peer_death_detection_seconds_count") == 0  # its silence is unknown


def test_what_a_lost_connection_said_is_not_used_for_another_peers_death(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    member(mesh, "c", None, 0.0)
    metrics.connection_lost("b", DeathCause.HEARTBEAT, 6.0)  # b was no member: nothing removed
    del mesh.conns["c"]
    mesh._verify("c", 1, "d", "no heartbeat")
    s = scrape(metrics)
    assert s.value("meshd_peer_deaths_total", cause="reported") == 1
    assert s.value("meshd_peer_deaths_total", cause="heartbeat") == 0


def test_a_reported_death_we_cannot_check_counts_as_reported(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    member(mesh, "b", None, 0.0)
    del mesh.conns["b"]  # no connection of ours to probe it with
    mesh._verify("b", 1, "c", "no heartbeat")
    s = scrape(metrics)
    assert s.value("meshd_peer_deaths_total", cause="reported") == 1
    assert s.value("meshd_peer_death_detection_seconds_count") == 0  # no silence known


def test_gossip_bytes_count_control_connections_as_they_pass(tmp_path):
    mesh, metrics = mesh_service(tmp_path)
    conn = mesh._build_server()
    conn.transport = StringTransport()  # type: ignore[assignment]
    conn._raw = lambda data: None  # taken over: the bytes are counted, not decoded
    conn.dataReceived(b"x" * 100)
    conn.send(1, b"y" * 10)
    out = len(conn.transport.value())
    s = scrape(metrics)
    assert s.value("meshd_gossip_bytes_total", direction="in") == 100
    assert s.value("meshd_gossip_bytes_total", direction="out") == out > 10
    conn.purpose = "http"  # a tunnel's bytes are not gossip
    conn.dataReceived(b"z" * 50)
    assert scrape(metrics).value("meshd_gossip_bytes_total", direction="in") == 100


# -- downloads ----------------------------------------------------------------------------------


def test_downloads_count_starts_bytes_and_outcomes():
    metrics, node = NodeMetrics(), make_node()
    downloads = Downloads(clock=Clock())
    node.downloader = SimpleNamespace(downloads=downloads)  # type: ignore[assignment]
    metrics.watch(node)
    metrics.watch_downloads(downloads)
    downloads.start("a", total_bytes=1000, have_bytes=200)  # resumed: 200 were on disk
    assert scrape(metrics).value("meshd_downloads_active") == 1
    downloads.update("a", 600)
    downloads.update("a", 1000)
    downloads.finish("a")
    downloads.start("b", total_bytes=500, have_bytes=0)
    downloads.update("b", 100)
    downloads.fail("b", "the hub answered 500")
    downloads.refuse("c", 10**12, "needs 1000 GB, has 8 GB")
    downloads.start("d", total_bytes=300, have_bytes=0)
    downloads.update("d", 50)
    downloads.finish("d")  # the daemon stopped it: the partial file stays
    s = scrape(metrics)
    assert s.value("meshd_downloads_started_total") == 3
    assert s.value("meshd_download_bytes_total") == 800 + 100 + 50
    assert s.value("meshd_downloads_total", outcome="done") == 1
    assert s.value("meshd_downloads_total", outcome="failed") == 1
    assert s.value("meshd_downloads_total", outcome="refused") == 1
    assert s.value("meshd_downloads_total", outcome="stopped") == 1
    assert s.value("meshd_downloads_active") == 0


def test_two_daemons_in_one_process_have_registries_of_their_own():
    a, b = NodeMetrics(), NodeMetrics()
    a.api.requests.labels("served", "m", "200", str(RouteKind.LOCAL)).inc()
    assert scrape(a).value("meshd_api_requests_total") == 1
    assert scrape(b).value("meshd_api_requests_total") == 0
