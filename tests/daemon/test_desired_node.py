"""The node and the mesh's desired state: ``meshctl drop`` and ``meshctl serve`` are
decisions saved in desired.json and told to the mesh; decisions heard are applied; a
restarted node does not serve a dropped ``[models] serve`` model, and serves it again
when ``meshctl serve`` lifts the drop; the routing table carries the decisions, so a
standby never promotes for a dropped model; the daemon loads desired.json at start.

A real ``Node`` over the fake mesh of ``tests.harness.meshfakes``; no processes.
"""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from meshd.daemon import service
from meshd.daemon.backends import LocalBackends
from meshd.errors import Refused
from meshd.mesh.desired import Decision, DesiredState, Want
from meshd.models.scan import Resolved
from meshd.serving.routetable import RouteTable, build_table
from meshd.statedir import StateDir
from tests.harness.meshfakes import MB, make_node, peer, serve
from tests.passive.test_passive import IDS, entry, node, table
from tests.passive.test_passive_standby import checked_in

DROP, SERVE = Want.DROPPED, Want.SERVE


@pytest.fixture
def state(tmp_path) -> StateDir:
    s = StateDir(tmp_path / "state")
    s.ensure()
    return s


def saved(state: StateDir) -> DesiredState:
    return DesiredState(state.load_desired())


# -- meshctl drop / serve on this node ------------------------------------------------------------


def test_drop_is_a_decision_saved_and_told_to_the_mesh(state):
    n = make_node("node-a", disk={"m": 300 * MB})
    n.state_dir = state
    backend = serve(n, "m")
    answer = n.drop("m")
    assert answer["dropped"] == "m" and answer["version"] == 1
    assert backend.stopped == 1 and "m" in n.dropped
    assert saved(state).get("m") == n.desired.get("m")
    assert n.desired.get("m").by == "node-a" and n.desired.get("m").want is DROP
    assert n.mesh.published == [n.desired.get("m")] and n.mesh.drops == ["m"]
    assert n.status()["desired"] == [{"model": "m", **n.desired.get("m").to_body()}]


def test_serve_lifts_the_drop_everywhere_and_serves_a_configured_model_again(state):
    n = make_node("node-a", disk={"m": 300 * MB})
    n.state_dir = state
    again: list[str] = []
    n.serve_again = again.append
    serve(n, "m")
    n.drop("m")
    answer = n.serve_model("m")
    assert answer == {"serving": "m", "was_dropped": True, "told_peers": 0, "version": 2}
    assert "m" not in n.dropped and again == ["m"]
    assert saved(state).get("m").want is SERVE and saved(state).get("m").version == 2
    assert [x.want for x in n.mesh.published] == [DROP, SERVE]
    # the mesh asks for it now: an idle node's assignment ranks it as requested
    assert "m" in n.local_info()["requested_models"]


def test_serve_of_a_model_that_was_not_dropped_here_starts_nothing_twice():
    """A serve heard while the model runs, downloads or waits for its group: no second start."""
    n = make_node("node-a", disk={"m": 300 * MB})
    again: list[str] = []
    n.serve_again = again.append
    lift = Decision("m", SERVE, 1, "node-b")
    n.desired.merge([lift])
    n.desired_heard([lift], via="node-b")
    assert again == []


def test_serve_of_a_model_nobody_knows_is_refused():
    n = make_node("node-a")
    with pytest.raises(Refused, match="nothing to serve"):
        n.serve_model("no-such-model")
    assert n.desired.decisions == {}


def test_serve_of_a_model_a_peer_has_on_disk_is_a_decision_too():
    n = make_node("node-a")
    n.mesh.members["b"] = peer("b", disk={"k": 300 * MB})
    assert n.serve_model("k")["was_dropped"] is False
    assert n.desired.get("k").want is SERVE


@pytest.mark.parametrize("command", ["drop", "serve_model"])
def test_a_passive_node_refuses_drop_and_serve_it_could_tell_nobody(command):
    n = make_node("node-s", standby=True, disk={"m": 300 * MB})
    with pytest.raises(Refused, match="run meshctl .* on an active node"):
        getattr(n, command)("m")
    assert n.desired.decisions == {}


# -- decisions heard from the mesh -------------------------------------------------------------------


def test_a_drop_heard_stops_the_model_and_a_serve_heard_brings_it_back(state):
    n = make_node("node-a", disk={"m": 300 * MB})
    n.state_dir = state
    again: list[str] = []
    n.serve_again = again.append
    backend = serve(n, "m")
    drop = Decision("m", DROP, 3, "node-b")
    n.desired.merge([drop])  # the mesh service merged it, then tells the node
    n.desired_heard([drop], via="node-b")
    assert backend.stopped == 1 and "m" not in n.served and saved(state).get("m") == drop
    lift = Decision("m", SERVE, 4, "node-c")
    n.desired.merge([lift])
    n.desired_heard([lift], via="node-c")
    assert again == ["m"] and saved(state).get("m") == lift


def test_a_standby_learns_the_decisions_of_its_routing_table_and_never_promotes_for_a_drop():
    promoted: list = []
    p, _, _, conn = checked_in(
        1, 16, promoted, table(node(0, serving=["m1"]), standby=[entry(1, 16)])
    )
    dropped = Decision("m1", DROP, 1, IDS[0])
    orphaned = dataclasses.replace(
        table(node(0, "idle"), standby=[entry(1, 16)], etag="t.2"), desired=(dropped,)
    )
    conn.answer(orphaned.to_body())  # m1, on its disk, has no host: but it was dropped
    assert p.node.learnt == [(IDS[0], [dropped])]
    assert promoted == []


def test_learnt_decisions_are_merged_saved_and_applied(state):
    n = make_node("node-a", standby=True, disk={"m": 300 * MB})
    n.state_dir = state
    n.learn_desired([Decision("m", DROP, 2, "node-b")], via="node-b")
    assert "m" in n.dropped and saved(state).get("m").version == 2
    n.learn_desired([Decision("m", DROP, 1, "node-z")], via="node-b")  # older: nothing
    assert n.desired.get("m").by == "node-b"


# -- the routing table carries them ------------------------------------------------------------------


def test_the_routing_table_carries_the_decisions_only_when_there_are_some():
    plain = build_table(mesh_id="mesh1", source=IDS[0], nodes=[node(0)], standby=[])
    assert "desired" not in plain.to_body()  # byte for byte what older nodes sent
    with_drop = build_table(
        mesh_id="mesh1",
        source=IDS[0],
        nodes=[node(0)],
        standby=[],
        desired=[Decision("m", DROP, 1, IDS[0])],
    )
    body = with_drop.to_body()
    assert body["desired"] == {
        "models": {"m": {"state": "dropped", "version": 1, "by": IDS[0], "at": 0.0}}
    }
    assert RouteTable.from_body(body).desired == (Decision("m", DROP, 1, IDS[0]),)
    assert RouteTable.from_body(plain.to_body()).desired == ()  # an older node's table


def test_a_table_with_a_malformed_desired_state_is_refused():
    body = build_table(mesh_id="mesh1", source=IDS[0], nodes=[node(0)], standby=[]).to_body()
    body["desired"] = {"models": {"m": {"state": "dropped"}}}
    with pytest.raises(ValueError, match="version"):
        RouteTable.from_body(body)


# -- [models] serve and a dropped model: the restart ----------------------------------------------------


class Backends:
    """``LocalBackends`` as ``_ready`` and ``_serve_again_with`` use it."""

    running = True

    def __init__(self) -> None:
        self.served: list[tuple[str, str, int]] = []

    def serve(self, name: str, path: str, size_bytes: int) -> None:
        self.served.append((name, path, size_bytes))

    async def when_serving(self, name: str) -> None:
        return None


class Notifier:
    def __init__(self) -> None:
        self.said: list[str] = []

    def ready(self, status: str | None = None) -> bool:
        self.said.append(f"READY {status}")
        return True

    def status(self, text: str) -> bool:
        self.said.append(text)
        return True


FIRST = Resolved(entry="m", name="m", source="local", path="/models/m.gguf", size_bytes=300 * MB)


def test_a_restarted_node_does_not_serve_a_dropped_model_of_its_serve_list(state, caplog):
    state.save_desired([Decision("m", DROP, 1, "node-b")])  # dropped before the restart
    n = make_node("node-a", disk={"m": 300 * MB})
    n.desired.merge(state.load_desired())  # what create_daemon does at start
    backends, notifier = Backends(), Notifier()
    defer.ensureDeferred(service._ready(n, backends, notifier, FIRST))  # type: ignore[arg-type]
    assert backends.served == [] and n.held_back == {"m"}  # a lift serves it then
    assert "not serving m ([models] serve): it was dropped mesh-wide (by node node-b" in caplog.text
    assert notifier.said and notifier.said[-1].startswith("READY")


def test_a_joining_node_learns_the_drops_before_it_serves_its_model():
    n = make_node("node-c", disk={"m": 300 * MB})
    asked: list[defer.Deferred] = []

    def learn_decisions(timeout_s: float) -> defer.Deferred:
        asked.append(defer.Deferred())
        return asked[-1]

    n.mesh.learn_decisions = learn_decisions  # type: ignore[union-attr]
    backends = Backends()
    done = defer.ensureDeferred(service._ready(n, backends, Notifier(), FIRST))  # type: ignore[arg-type]
    assert len(asked) == 1 and backends.served == [] and not done.called  # waits for the mesh
    drop = Decision("m", DROP, 1, "node-b")
    n.desired.merge([drop])  # the first DESIRED frame from a peer
    n.desired_heard([drop], via="node-b")
    asked[0].callback(True)
    assert done.called and backends.served == []


def test_without_a_drop_the_serve_list_is_served():
    n = make_node("node-a", disk={"m": 300 * MB})
    backends = Backends()
    defer.ensureDeferred(service._ready(n, backends, Notifier(), FIRST))  # type: ignore[arg-type]
    assert backends.served == [("m", "/models/m.gguf", 300 * MB)]


def test_serve_again_serves_the_first_serve_entry_from_this_nodes_disk():
    n = make_node("node-a", disk={"m": 300 * MB})
    backends = Backends()
    again = service._serve_again_with(n, backends, Notifier(), FIRST)  # type: ignore[arg-type]
    again("other")  # not this node's [models] serve model
    assert backends.served == []
    again("m")  # FIRST.path does not exist here: the scan's copy of the model
    assert backends.served == [("m", "/models/m.gguf", 300 * MB)]


def test_the_backends_never_start_a_dropped_model(tmp_path):
    n = make_node("node-a", disk={"m": 300 * MB}, clock=Clock())
    n.desired.decide("m", DROP, by="node-b")
    backends = LocalBackends(n, n.config, reactor=Clock(), notifier=Notifier())  # type: ignore[arg-type]
    backends.serve("m", "/models/m.gguf", 300 * MB)
    assert backends.files == {} and n.served == {}


def test_the_daemon_loads_desired_json_at_start_and_refuses_a_broken_one(tmp_path):
    from meshd.config import Config
    from meshd.errors import StartupError

    config = Config().replace(
        "node",
        state_dir=str(tmp_path / "state"),
        vram_gb=8.0,
        models_dir=str(tmp_path / "models"),
        control_socket=str(tmp_path / "control.sock"),
    )
    config = config.replace("console", enabled=False)
    state = StateDir(config.node.state_dir)
    state.ensure()
    state.save_desired([Decision("m", DROP, 4, "node-b")])
    top = service.create_daemon(config, reactor=Clock())
    assert top.node is not None and top.node.state_dir is not None
    assert top.node.desired.get("m") == Decision("m", DROP, 4, "node-b")
    (state.path / "desired.json").write_text('{"models": {"m": {"state": "dropped"}}}')
    with pytest.raises(StartupError, match=r"desired\.json: model 'm': version"):
        service.create_daemon(config, reactor=Clock())


def test_serve_heard_lets_an_idle_node_take_the_orphaned_model_back():
    """No node is configured for m (it was assigned before its drop): a lift makes it an
    orphan again, and an idle node with it on disk promotes for it at once."""
    from tests.placement.test_idle_promotion import idle_node

    node_, acts = idle_node("a", disk={"m": 300 * MB}, peers=[peer("h", disk={"m": 300 * MB})])
    node_.desired.decide("m", DROP, by="h")
    node_.rebalancer.on_event(None)  # the drop: nothing to take
    assert acts.log == []
    lift = Decision("m", SERVE, 2, "h")
    node_.desired.merge([lift])
    node_.desired_heard([lift], via="h")
    assert acts.log == [("start", "m")] and node_.rebalancer.target == "m"
