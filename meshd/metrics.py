"""The daemon's Prometheus metrics: one registry per daemon, served at the API's ``/metrics``.

Why one :class:`~prometheus_client.CollectorRegistry` per daemon and not the
library's global one: the tests run several nodes in one process, and each
must answer for itself.  :class:`NodeMetrics` holds the registry and the few
metrics that count events (requests, deaths, downloads); everything that is a
state -- peers by state, llama-server / rpc-server states and restarts,
in-flight requests, passive clients, the election and route-table counts -- is
read from the live node at scrape time by :class:`NodeCollector`, from the
same objects ``meshctl status`` and the console read, so nothing has to be
kept in sync and the numbers agree.

Labels stay bounded: ``model`` only for names the router knew (a request for
an unknown model counts under ``model=""``), ``route`` one of
:class:`RouteKind`, ``hop`` one of :class:`Hop`.  A tunnelled request is
counted twice, told apart by ``hop``: ``served`` at the node whose API
received it, ``relayed`` at the host whose tunnel API carried it to its
llama-server; a mesh-wide ``sum(meshd_api_requests_total{hop="served"})``
counts each client request once.

The metric list and a scrape configuration for a whole mesh are in
``docs/operations.md`` ("Metrics").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from meshd.states import BackendState, MemberState, Role

log = logging.getLogger("meshd.metrics")

# no ``*_created`` series beside each counter and histogram: a start time per label
# set is noise in a scrape, and Prometheus detects counter resets without it
disable_created_metrics()

__all__ = [
    "CONTENT_TYPE_LATEST",
    "ApiMeter",
    "ApiMetrics",
    "CollectorRegistry",
    "DeathCause",
    "Hop",
    "InFlight",
    "NodeCollector",
    "NodeMetrics",
    "RouteKind",
    "render",
]

# seconds: a local token comes in milliseconds, a cold or queued request in seconds
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# a death by heartbeat takes [mesh] heartbeat_timeout_s (6 s by default); a closed
# connection is noticed at once
DETECTION_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    15.0,
    30.0,
    60.0,
)


class Hop(enum.StrEnum):
    """Which API counted a request: the one a client called, or a host's tunnel API."""

    SERVED = "served"
    RELAYED = "relayed"


class RouteKind(enum.StrEnum):
    """How a request reached a llama-server (the ``route`` label)."""

    LOCAL = "local"  # this node's own llama-server
    TUNNEL = "tunnel"  # another node's, through a tunnel, at the first try
    FAILOVER = "failover"  # the first upstream failed before a byte; a later one answered
    NONE = "none"  # answered by meshd itself (refused, unknown model, not ready)


class DeathCause(enum.StrEnum):
    """How this node found a peer dead (``meshd_peer_deaths_total{cause}``)."""

    HEARTBEAT = "heartbeat"  # no frame for [mesh] heartbeat_timeout_s
    CLOSED = "closed"  # its connection closed (a crash, a reset, a kill)
    REPORTED = "reported"  # another node reported it, and our own probe got no answer


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry`` (``/metrics``)."""
    return generate_latest(registry)


# -- the API ------------------------------------------------------------------------------------


class ApiMetrics:
    """The API's event metrics in one registry; both APIs of a daemon (the client API
    and the tunnel API) count into the same ones, told apart by ``hop``."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "meshd_api_requests",
            "API requests by model, response status and route.",
            ["hop", "model", "status", "route"],
            registry=registry,
        )
        self.first_byte = Histogram(
            "meshd_api_time_to_first_byte_seconds",
            "From a request's arrival to its upstream's response head (for a stream: the "
            "first event).",
            ["hop", "model", "route"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "meshd_api_request_duration_seconds",
            "From a forwarded request's arrival to the end of its answer.",
            ["hop", "model", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Counter(
            "meshd_api_response_bytes",
            "Response body bytes sent for routed requests.",
            ["hop", "model", "route"],
            registry=registry,
        )
        self.request_bytes = Counter(
            "meshd_api_request_bytes",
            "Request body bytes sent to upstreams (each try).",
            ["hop", "route"],
            registry=registry,
        )
        self.sse_events = Counter(
            "meshd_api_sse_events",
            "Server-sent events passed to clients (a chat stream sends about one per token).",
            ["hop", "model", "route"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "meshd_api_upstream_errors",
            "Upstream failures: before a byte (then failover or an error) or mid-response.",
            ["hop", "model", "upstream"],
            registry=registry,
        )
        self.failovers = Counter(
            "meshd_api_failovers",
            "Requests sent again to the next upstream after a failure.",
            ["hop", "model"],
            registry=registry,
        )


class ApiMeter:
    """One API's view of :class:`ApiMetrics`: everything it counts carries its ``hop``.

    The read-only properties (``requests``, ``response_bytes``, ``failovers``) read
    the registry back, for tests and for the console.
    """

    def __init__(self, metrics: ApiMetrics, hop: Hop):
        self.metrics = metrics
        self.hop = str(hop)
        # (metric, label values) -> its child; the label sets are bounded (models the
        # router knows, status codes, routes) and never removed
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: object) -> Any:
        """``metric.labels(hop, *labels)``, looked up once per label set: a lookup costs
        a few microseconds, several times per request (a thousand at once wait for all)."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.hop, *(str(v) for v in labels))
        return child

    def request_done(
        self,
        model: str,
        status: int,
        nbytes: int,
        route: RouteKind = RouteKind.NONE,
        seconds: float | None = None,
    ) -> None:
        m = self.metrics
        self._child(m.requests, model, status, route).inc()
        if route is not RouteKind.NONE:
            self._child(m.response_bytes, model, route).inc(nbytes)
            if seconds is not None:
                self._child(m.duration, model, route).observe(seconds)

    def first_byte(self, model: str, route: RouteKind, seconds: float) -> None:
        self._child(self.metrics.first_byte, model, route).observe(seconds)

    def sent_body(self, route: RouteKind, nbytes: int) -> None:
        self._child(self.metrics.request_bytes, route).inc(nbytes)

    def sse_counter(self, model: str, route: RouteKind) -> Callable[[float], None]:
        """``inc`` of one stream's events counter, looked up once: a stream counts every
        chunk."""
        return cast(Callable[[float], None], self._child(self.metrics.sse_events, model, route).inc)

    def upstream_error(self, model: str, upstream: RouteKind) -> None:
        self._child(self.metrics.upstream_errors, model, upstream).inc()

    def failover(self, model: str) -> None:
        self._child(self.metrics.failovers, model).inc()

    # -- reading back ----------------------------------------------------------------------------

    def _samples(
        self, metric: Any, suffix: str = "_total"
    ) -> Iterator[tuple[dict[str, str], float]]:
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith(suffix) and s.labels.get("hop") == self.hop:
                    yield s.labels, s.value

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """Requests by (model, status), every route together."""
        out: dict[tuple[str, int], int] = {}
        for labels, value in self._samples(self.metrics.requests):
            key = (labels["model"], int(labels["status"]))
            out[key] = out.get(key, 0) + int(value)
        return out

    @property
    def response_bytes(self) -> int:
        return int(sum(v for _, v in self._samples(self.metrics.response_bytes)))

    @property
    def failovers(self) -> int:
        return int(sum(v for _, v in self._samples(self.metrics.failovers)))


# -- the node -----------------------------------------------------------------------------------


class NodeMetrics:
    """A daemon's registry: the API's and the mesh's event metrics, and the collector of
    the live node's states (:meth:`watch`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.api = ApiMetrics(r)
        self.peer_deaths = Counter(
            "meshd_peer_deaths",
            "Peers this node removed as dead, by how it found out.",
            ["cause"],
            registry=r,
        )
        self.death_detection = Histogram(
            "meshd_peer_death_detection_seconds",
            "Silence of a peer before this node removed it: from its last frame to its removal.",
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.heartbeats_missed = Counter(
            "meshd_peer_heartbeat_timeouts",
            "Peer connections closed because no frame came for [mesh] heartbeat_timeout_s.",
            registry=r,
        )
        self.gossip_bytes = Counter(
            "meshd_gossip_bytes",
            "Bytes of the mesh's control connections (their frames, before TLS), by direction.",
            ["direction"],
            registry=r,
        )
        self.downloads = Counter(
            "meshd_downloads",
            "Model downloads ended, by outcome (done, failed, refused, stopped).",
            ["outcome"],
            registry=r,
        )
        self.downloads_started = Counter(
            "meshd_downloads_started",
            "Model downloads started (a resumed one counts again).",
            registry=r,
        )
        self.download_bytes = Counter(
            "meshd_download_bytes", "Model file bytes downloaded.", registry=r
        )
        self._gossip_in = self.gossip_bytes.labels("in").inc  # looked up once: every frame counts
        self._gossip_out = self.gossip_bytes.labels("out").inc
        # what connection_lost said of the member about to be removed
        self._lost: tuple[str, DeathCause, float | None] | None = None
        self.collector: NodeCollector | None = None

    def watch(
        self,
        node: Any,
        *,
        apis: Callable[[], Iterable[tuple[Hop, Any]]] = tuple,
        tunnels: Callable[[], Any] = lambda: None,
    ) -> NodeCollector:
        """Read ``node``'s states at every scrape; ``apis()`` the API servers by hop, and
        ``tunnels()`` the tunnel server now (the active role's, or None)."""
        self.collector = NodeCollector(node, tunnels=tunnels)
        self.registry.register(InFlight(apis))
        self.registry.register(self.collector)
        return self.collector

    def render(self) -> bytes:
        return render(self.registry)

    # -- the mesh ---------------------------------------------------------------------------------

    def peer_bytes(self, bytes_in: int, bytes_out: int) -> None:
        """Bytes of a control connection (``meshd.mesh.peer``'s meter)."""
        if bytes_in:
            self._gossip_in(bytes_in)
        if bytes_out:
            self._gossip_out(bytes_out)

    def connection_lost(
        self, node_id: str, cause: DeathCause, silent_s: float | None, heartbeat: bool = False
    ) -> None:
        """A member's connection is gone, just before the gossip asks the membership to
        remove it (whose PeerDown follows at once, in the same call): how, and for how
        long the peer had been silent (None: not known)."""
        if heartbeat:
            self.heartbeats_missed.inc()
        silent = None if silent_s is None else max(0.0, silent_s)
        self._lost = (node_id, cause, silent)

    def membership_event(self, event: Any) -> None:
        """A membership listener: a PeerDown is a death, with what ``connection_lost`` said
        about it just before (a death nobody described was reported by another node)."""
        from meshd.mesh.membership import PeerDown

        if not isinstance(event, PeerDown):
            return
        lost, self._lost = self._lost, None
        cause, silent = DeathCause.REPORTED, None
        if lost is not None and lost[0] == event.node_id:
            _, cause, silent = lost
        self.peer_deaths.labels(str(cause)).inc()
        if silent is not None:
            self.death_detection.observe(silent)

    # -- downloads --------------------------------------------------------------------------------

    def watch_downloads(self, downloads: Any) -> None:
        """Count ``meshd.models.download.Downloads``' changes (a listener of its own)."""
        meter = _DownloadMeter(self, downloads)
        downloads.listeners.append(meter.changed)


class _DownloadMeter:
    """Turns the downloads table's changes into counters: a name that appears in
    ``active`` started; its bytes grow; when it leaves, its outcome is read from the
    table (failed, refused), else it is done (all its bytes came) or stopped (the
    daemon stopped it; the partial file is kept for the next start)."""

    def __init__(self, metrics: NodeMetrics, downloads: Any):
        self.metrics = metrics
        self.downloads = downloads
        self.seen: dict[str, tuple[int, int]] = {}  # name -> (bytes seen so far, total)

    def changed(self, name: str) -> None:
        d, m = self.downloads, self.metrics
        progress = d.active.get(name)
        if progress is not None:
            if name not in self.seen:
                m.downloads_started.inc()
                # what was on disk already (a resumed file) is not downloaded now
                self.seen[name] = (progress.bytes, progress.total_bytes)
                return
            grown = progress.bytes - self.seen[name][0]
            if grown > 0:
                m.download_bytes.inc(grown)
                self.seen[name] = (progress.bytes, progress.total_bytes)
            return
        refused = any(r.name == name for r in d.refused[-1:])
        if name not in self.seen:
            if refused:  # refused before it began (the gate, the disk check)
                m.downloads.labels("refused").inc()
            return
        done, total = self.seen.pop(name)
        if name in d.failed:
            outcome = "failed"
        elif refused:
            outcome = "refused"
        else:
            outcome = "done" if done >= total else "stopped"
        m.downloads.labels(outcome).inc()


class InFlight(Collector):
    """``meshd_api_in_flight``: the requests each API is answering, read at scrape time."""

    def __init__(self, apis: Callable[[], Iterable[tuple[Hop, Any]]]):
        self.apis = apis

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("meshd_api_in_flight", "Requests being answered now.", labels=["hop"])
        for hop, api in self.apis():
            g.add_metric([str(hop)], api.in_flight)
        yield g


class NodeCollector(Collector):
    """The node's states, read at scrape time from the objects status reads.

    Counters read here (elections, route-table requests, tunnels opened) belong to
    the active role's parts, which a standby's promotion builds anew: they start at
    zero again then, a reset Prometheus' ``rate()`` and ``increase()`` handle.
    """

    def __init__(self, node: Any, *, tunnels: Callable[[], Any]):
        self.node = node
        self.tunnels = tunnels

    def collect(self) -> Iterator[Metric]:
        groups = (
            self._role,
            self._peers,
            self._backends,
            self._election,
            self._passive,
            self._tunnels,
            self._downloads,
        )
        for group in groups:
            try:
                families = list(group())
            except Exception:  # a bug in one group must not blank the whole scrape
                log.exception("metrics: reading %s failed", group.__name__.lstrip("_"))
                continue
            yield from families

    def _role(self) -> Iterator[Metric]:
        node = self.node
        g = GaugeMetricFamily(
            "meshd_node_role", "This node's role (1 for the current one).", labels=["role"]
        )
        for role in Role:
            g.add_metric([str(role)], 1.0 if node.role == role else 0.0)
        yield g
        moves = CounterMetricFamily(
            "meshd_role_changes",
            'Role changes of this node: a standby\'s promotion is from="standby",to="idle".',
            labels=["from", "to"],
        )
        counted = {(str(a), str(b)): n for (a, b), n in node.roles.move_counts.items()}
        for (a, b), n in sorted(counted.items()):
            moves.add_metric([a, b], n)
        yield moves

    def _peers(self) -> Iterator[Metric]:
        mesh = self.node.mesh
        g = GaugeMetricFamily(
            "meshd_peers", "Members of the mesh this node sees, by state.", labels=["state"]
        )
        states = {str(s): 0 for s in MemberState}
        for p in mesh.peers() if mesh is not None else ():
            states[str(p.state)] = states.get(str(p.state), 0) + 1
        for state, n in states.items():
            g.add_metric([state], n)
        yield g
        penalties = mesh.penalties if mesh is not None else None  # a passive node listens not
        yield CounterMetricFamily(
            "meshd_peer_refused",
            "Connections to the mesh port closed before TLS: their source had used up "
            "its attempts to authenticate ([mesh] penalty_failures).",
            value=penalties.refused_total if penalties is not None else 0,
        )
        yield GaugeMetricFamily(
            "meshd_peer_penalized_sources",
            "Source addresses with failed attempts to authenticate not yet paid back.",
            value=penalties.sources() if penalties is not None else 0,
        )

    def _backends(self) -> Iterator[Metric]:
        node = self.node
        state = GaugeMetricFamily(
            "meshd_backend_state",
            "This node's llama-servers and rpc-servers by state (1 for the current one).",
            labels=["kind", "model", "state"],
        )
        restarts = CounterMetricFamily(
            "meshd_backend_restarts",
            "Restarts of this node's llama-servers and rpc-servers "
            "after a crash or a failed health check.",
            labels=["kind", "model"],
        )
        backends: list[tuple[str, str, Any]] = [
            ("llama-server", name, served.backend) for name, served in node.served.items()
        ]
        split = node.split
        if split is not None:
            if split.worker_rpc is not None:  # lent to a split host
                lent = split.lending[0] if split.lending is not None else ""
                backends.append(("rpc-server", lent, split.worker_rpc))
            for name, hosted in split.hosting.items():  # this host's own share, no GPU
                if hosted.local_rpc is not None:
                    backends.append(("rpc-server", name, hosted.local_rpc))
        for kind, name, backend in backends:
            now = str(backend.state)
            for s in BackendState:
                state.add_metric([kind, name, str(s)], 1.0 if now == str(s) else 0.0)
            restarts.add_metric([kind, name], int(getattr(backend, "restarts", 0)))
        yield state
        yield restarts

    def _election(self) -> Iterator[Metric]:
        rebalancer = self.node.rebalancer
        c = CounterMetricFamily(
            "meshd_elections",
            "Elections this node ran for its model (the placement decided again).",
        )
        c.add_metric([], rebalancer.decisions if rebalancer is not None else 0)
        yield c

    def _passive(self) -> Iterator[Metric]:
        server = self.node.route_server
        counts = server.counts() if server is not None else {}
        g = GaugeMetricFamily(
            "meshd_passive_nodes",
            "Passive nodes checked in on this node's routing table, by kind.",
            labels=["kind"],
        )
        g.add_metric(["client"], counts.get("clients", 0))
        g.add_metric(["standby"], counts.get("standby", 0))
        yield g
        c = CounterMetricFamily(
            "meshd_route_table_requests",
            "Routing-table requests this node answered for passive nodes.",
        )
        c.add_metric([], counts.get("requests", 0))
        yield c

    def _tunnels(self) -> Iterator[Metric]:
        tunnels = self.tunnels()
        split = self.node.split
        hosts = [("http", tunnels)]
        if split is not None:
            hosts.append(("rpc", split.tunnel_host))
        opened = CounterMetricFamily(
            "meshd_tunnels_opened",
            "Tunnels peers opened to this node, by what they carry.",
            labels=["purpose"],
        )
        open_now = GaugeMetricFamily(
            "meshd_tunnels_open", "Tunnels from peers open now.", labels=["purpose"]
        )
        for purpose, server in hosts:
            opened.add_metric([purpose], server.opened if server is not None else 0)
            open_now.add_metric([purpose], len(server.tunnels) if server is not None else 0)
        yield opened
        yield open_now

    def _downloads(self) -> Iterator[Metric]:
        downloader = self.node.downloader
        g = GaugeMetricFamily("meshd_downloads_active", "Model downloads in progress.")
        g.add_metric([], len(downloader.downloads.active) if downloader is not None else 0)
        yield g
