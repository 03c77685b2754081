"""Routing decisions of the mesh-wide router: local first, the host-selection hook for the
rest, 404 vs 503, drops, suspects, load for the hooks, /v1/models and status."""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.task import Clock

from meshd.placement.default import stable_index
from meshd.placement.snapshot import MeshView, NodeView
from meshd.serving import routing
from meshd.serving.router import SUSPECT_S, LocalOnlyRouter, MeshRouter, build_snapshot, order_hosts
from meshd.serving.tunnel import TunnelRefused
from tests.harness.meshfakes import MB, make_node, peer, serve


def router_for(node, clock=None):
    tunnels: list[tuple[str, str]] = []

    def tunnel(node_id, model):
        tunnels.append((node_id, model))
        return ("tunnel", node_id, model)

    r = MeshRouter(node, reactor=clock or node.reactor, tunnel=tunnel)
    node.router = r
    node.add_status_listener(r.invalidate)
    return r, tunnels


def test_a_local_warm_model_goes_to_the_local_llama_server():
    node = make_node()
    serve(node, "m1")
    r, _ = router_for(node)
    (up,) = r.upstreams("m1", "client")
    assert up.name == "local" and up.endpoint() == ("local-endpoint", 5000)


def test_a_model_served_elsewhere_goes_through_a_tunnel_pooled_per_peer_and_model():
    node = make_node()
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    r, tunnels = router_for(node)
    (up,) = r.upstreams("m2", "client")
    assert up.name == "node-b" and up.pool_key == "tunnel:node-b:m2"
    assert up.endpoint() == ("tunnel", "node-b", "m2") and tunnels == [("node-b", "m2")]


def test_each_upstream_names_the_node_whose_llama_server_it_is_for_x_meshd_node():
    node = make_node()
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    r, _ = router_for(node)
    assert r.upstreams("m1", "c")[0].node_id == node.node_id  # "local" is this node
    assert r.upstreams("m2", "c")[0].node_id == "node-b"
    assert LocalOnlyRouter(r).upstreams("m1", "c")[0].node_id == node.node_id


def test_several_hosts_first_by_the_default_hash_then_the_rest_as_failover():
    node = make_node()
    for h in ("node-d", "node-b", "node-c"):
        node.mesh.members[h] = peer(h, serving=["m2"])
    r, _ = router_for(node)
    hosts = ["node-b", "node-c", "node-d"]
    for client in ("alice", "bob", "carol", "dave"):
        order = [u.name for u in r.upstreams("m2", client)]
        first = hosts[stable_index(client, "m2", 3)]
        assert order[0] == first
        assert order[1:] == [h for h in hosts if h != first]
        assert order == [u.name for u in r.upstreams("m2", client)]  # deterministic


def test_host_selection_spreads_clients_across_hosts():
    node = make_node()
    for h in ("node-b", "node-c"):
        node.mesh.members[h] = peer(h, serving=["m2"])
    r, _ = router_for(node)
    firsts = Counter(r.upstreams("m2", f"client-{i}")[0].name for i in range(400))
    assert set(firsts) == {"node-b", "node-c"}
    assert min(firsts.values()) > 150


def test_this_node_goes_first_when_it_hosts_the_model_too():
    node = make_node("node-z")
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m1"])
    r, _ = router_for(node)
    assert [u.name for u in r.upstreams("m1", "c")] == ["local", "node-b"]


def test_unknown_model_is_404_listing_the_mesh_models():
    node = make_node(disk={"on-disk-only": 100 * MB})
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    r, _ = router_for(node)
    for name in ("nope", "on-disk-only"):
        with pytest.raises(routing.UnknownModel) as e:
            r.upstreams(name, "c")
        assert e.value.known == ["m1", "m2"]


@pytest.mark.parametrize("setup, reason", [
    (lambda n: n.mesh.members.__setitem__("node-b", peer("node-b", loading=["m2"])),
     "loading on node-b"),
    (lambda n: n.mesh.members.__setitem__("node-b", peer("node-b", waiting=["m2"])),
     "waiting for VRAM on node-b"),
    (lambda n: n.mesh.members.__setitem__("node-b", peer("node-b", requested=["m2"])),
     "no node serves it yet"),
    (lambda n: serve(n, "m2", state="loading"), "loading on node-a"),
])
def test_known_model_without_a_ready_host_is_503(setup, reason):
    node = make_node()
    setup(node)
    r, _ = router_for(node)
    with pytest.raises(routing.NotReady) as e:
        r.upstreams("m2", "c")
    assert reason in str(e.value) and e.value.retry_after_s > 0


def test_a_dropped_model_leaves_the_table_at_once_even_if_a_peer_still_announces_it():
    node = make_node()
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    r, _ = router_for(node)
    assert r.upstreams("m2", "c")
    node.drop_local("m2", origin="node-c")
    with pytest.raises(routing.UnknownModel):
        r.upstreams("m2", "c")
    assert [m["id"] for m in r.models()] == []


def test_a_host_whose_tunnel_failed_goes_last_until_the_mesh_checked_it():
    clock = Clock()
    node = make_node(clock=clock)
    for h in ("node-b", "node-c"):
        node.mesh.members[h] = peer(h, serving=["m2"])
    r, _ = router_for(node, clock)
    client = next(c for c in (f"c{i}" for i in range(50)) if stable_index(c, "m2", 2) == 0)
    first = r.upstreams("m2", client)
    assert [u.name for u in first] == ["node-b", "node-c"]
    r.upstream_failed(first[0], "cannot open a tunnel")
    assert [u.name for u in r.upstreams("m2", client)] == ["node-c", "node-b"]
    clock.advance(SUSPECT_S + 1)
    assert [u.name for u in r.upstreams("m2", client)] == ["node-b", "node-c"]


def test_hooks_see_this_nodes_in_flight_requests_as_host_load():
    seen = []

    class Policy:
        def call(self, hook, **kw):
            if hook == "meshd_select_host":
                seen.append({h.node_id: h.load for h in kw["hosts"]})
                return min(kw["hosts"], key=lambda h: (h.load, h.node_id)).node_id, "least"
            return None, None

    node = make_node()
    node.policy = Policy()
    for h in ("node-b", "node-c"):
        node.mesh.members[h] = peer(h, serving=["m2"])
    r, _ = router_for(node)
    up_b = r.upstreams("m2", "c")[0]
    assert up_b.name == "node-b"
    r.request_started(up_b)
    r.request_started(up_b)
    assert r.upstreams("m2", "c")[0].name == "node-c"
    assert seen[-1] == {"node-b": 2, "node-c": 0}
    r.request_finished(up_b)
    r.request_finished(up_b)
    assert r.upstreams("m2", "c")[0].name == "node-b"
    assert r.in_flight == {}


def test_v1_models_lists_every_model_run_anywhere_with_meshd_fields():
    node = make_node()
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    node.mesh.members["node-c"] = peer("node-c", serving=["m2"], requested=["m3"])
    node.mesh.members["node-d"] = peer("node-d", loading=["m4"])
    r, _ = router_for(node)
    by_id = {m["id"]: m for m in r.models()}
    assert set(by_id) == {"m1", "m2", "m4"}  # m3 is only wanted: not listed
    assert by_id["m2"]["object"] == "model" and by_id["m2"]["owned_by"] == "meshd"
    assert by_id["m2"]["meshd"] == {"hosts": ["node-b", "node-c"], "nodes": 2, "state": "warm"}
    assert by_id["m1"]["meshd"]["hosts"] == ["node-a"]
    assert by_id["m4"]["meshd"]["state"] == "loading"


def test_the_table_is_rebuilt_on_changes_not_per_request():
    node = make_node()
    r, _ = router_for(node)
    with pytest.raises(routing.UnknownModel):
        r.upstreams("m2", "c")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"])
    with pytest.raises(routing.UnknownModel):  # no event yet: the snapshot stands
        r.upstreams("m2", "c")
    r.invalidate()  # a membership event
    assert r.upstreams("m2", "c")[0].name == "node-b"
    backend = serve(node, "m1", state="loading")  # add_served tells the router
    with pytest.raises(routing.NotReady):
        r.upstreams("m1", "c")
    backend.set("ready")
    assert r.upstreams("m1", "c")[0].name == "local"


def test_status_models_cover_the_whole_mesh():
    node = make_node()
    serve(node, "m1")
    node.mesh.members["node-b"] = peer("node-b", serving=["m2"], disk={"m2": 500 * MB})
    node.mesh.members["node-c"] = peer("node-c", waiting=["m3"])
    router_for(node)
    models = {m["name"]: m for m in node.status()["models"]}
    assert models["m1"]["state"] == "warm" and models["m1"]["hosts"] == ["node-a"]
    assert models["m1"]["backend"]["state"] == "ready"
    assert models["m2"] == {**models["m2"], "state": "warm", "hosts": ["node-b"],
                            "size_bytes": 500 * MB, "split": None}
    assert models["m3"]["state"] == "waiting-for-vram"


def test_build_snapshot_ignores_our_own_serving_list_and_trusts_the_backends():
    me = NodeView("a", serving=("m1",))  # node_view lists every served model, warm or not
    view = MeshView(self_id="a", nodes=(me,))
    snap = build_snapshot("a", view, local_states={"m1": "loading"}, peer_loading={},
                          peer_waiting={})
    assert snap.hosts == {} and snap.models["m1"].state == "loading"


def test_order_hosts_puts_suspects_last_keeping_their_order():
    hosts = tuple(NodeView(n, serving=("m",)) for n in ("a", "b", "c", "d"))
    view = MeshView(self_id="a", nodes=hosts)
    order = order_hosts("m", "x", hosts, view, self_id="a", suspects=frozenset({"a", "c"}))
    assert order[-2:] == ["a", "c"] and set(order) == {"a", "b", "c", "d"}


def test_the_tunnel_router_checks_and_routes_to_this_nodes_warm_llama_server_only():
    node = make_node()
    serve(node, "m1")
    loading = serve(node, "m2", state="loading")
    node.mesh.members["node-b"] = peer("node-b", serving=["m1", "m3"])
    r, tunnels = router_for(node)
    local = LocalOnlyRouter(r)
    local.check("m1")
    (up,) = local.upstreams("m1", "client")  # never node-b, though it serves m1 too
    assert up.name == "local" and up.endpoint() == ("local-endpoint", 5000)
    for name in ("m2", "m3"):
        with pytest.raises(TunnelRefused):
            local.check(name)
        with pytest.raises(routing.NotReady):
            local.upstreams(name, "client")
    assert tunnels == []
    loading.set("ready")
    node.drop_local("m2", origin="node-b")
    with pytest.raises(TunnelRefused, match="dropped"):
        local.check("m2")
    local.request_started(up)
    assert r.in_flight == {}  # requests carried for peers are not this node's load
