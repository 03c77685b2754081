"""The role machine: every allowed move, the refused ones, and the outputs that swap the
service groups (passive <-> active) and point the API's router at the new group's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.application import service
from twisted.internet.task import Clock

from meshd.config import Config
from meshd.daemon.node import Node, RoleParts
from meshd.daemon.roles import (
    MOVES_KEPT,
    ROLE_MOVES,
    RoleGroup,
    RoleMachine,
    RoleService,
    SwitchableRouter,
    initial_role,
)
from meshd.errors import RoleChangeRefused
from meshd.models.scan import LocalModel
from meshd.serving import routing
from meshd.states import Role


class Outputs:
    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []

    def activate(self, model: str, reason: str) -> None:
        self.log.append(("activate", model))

    def deactivate(self, reason: str) -> None:
        self.log.append(("deactivate", reason))


def machine(initial: Role, serving: list[Role] | None = None) -> tuple[RoleMachine, Outputs]:
    box = serving if serving is not None else [Role.IDLE]
    m = RoleMachine(initial, serving_role=lambda: box[0])
    out = Outputs()
    m.connect(out)
    return m, out


def test_the_initial_role_comes_from_the_config():
    assert initial_role(Config().replace("node", client=True).node) is Role.CLIENT
    assert initial_role(Config().replace("node", standby=True).node) is Role.STANDBY
    assert initial_role(Config().node) is Role.IDLE


def test_every_role_has_its_moves_and_a_client_never_moves():
    assert set(ROLE_MOVES) == set(Role)
    assert ROLE_MOVES[Role.CLIENT] == frozenset()
    assert ROLE_MOVES[Role.STANDBY] == {Role.IDLE}
    assert ROLE_MOVES[Role.IDLE] == {Role.HOST, Role.WORKER, Role.STANDBY}


@pytest.mark.parametrize("start,to", [(a, b) for a in (Role.IDLE, Role.HOST, Role.WORKER)
                                      for b in (Role.IDLE, Role.HOST, Role.WORKER) if a != b])
def test_an_active_node_moves_between_idle_host_and_worker_with_what_it_serves(start, to):
    serving = [start]
    m, out = machine(Role.IDLE, serving)
    assert m.role is start
    serving[0] = to
    assert m.role is to
    assert m.moves[-1] == (start, to) and out.log == []  # nothing swapped among active roles


def test_promotion_moves_a_standby_to_active_and_swaps_the_groups():
    serving = [Role.IDLE]
    m, out = machine(Role.STANDBY, serving)
    assert m.role is Role.STANDBY and m.passive
    assert m.promote("m1", "orphaned", {"model": "m1"})
    assert out.log == [("activate", "m1")] and m.promotion == {"model": "m1"}
    assert m.role is Role.IDLE and not m.passive
    serving[0] = Role.HOST
    assert m.role is Role.HOST
    assert m.moves == [(Role.STANDBY, Role.IDLE), (Role.IDLE, Role.HOST)]


def test_a_flapping_node_keeps_its_last_moves_and_counts_them_all():
    serving = [Role.IDLE]
    m, _ = machine(Role.IDLE, serving)
    for n in range(MOVES_KEPT * 3):
        serving[0] = Role.HOST if n % 2 == 0 else Role.IDLE
        assert m.role is serving[0]
    assert len(m.moves) == MOVES_KEPT and m.moves[-1] == (Role.HOST, Role.IDLE)
    assert m.move_counts == {(Role.IDLE, Role.HOST): MOVES_KEPT * 3 // 2,
                             (Role.HOST, Role.IDLE): MOVES_KEPT * 3 // 2}


def test_standing_by_moves_an_idle_node_to_standby_and_swaps_the_groups():
    m, out = machine(Role.IDLE)
    m.promotion = {"model": "old"}
    assert m.stand_by("assignment gave it nothing")
    assert out.log == [("deactivate", "assignment gave it nothing")]
    assert m.role is Role.STANDBY and m.promotion is None


@pytest.mark.parametrize("initial,serving", [(Role.CLIENT, Role.IDLE), (Role.IDLE, Role.HOST),
                                             (Role.IDLE, Role.WORKER), (Role.STANDBY, Role.IDLE)])
def test_standing_by_is_refused_unless_idle_and_active(initial, serving):
    m, out = machine(initial, [serving])
    with pytest.raises(RoleChangeRefused):
        m.stand_by("nothing")
    assert out.log == [] and m.role is (serving if initial is Role.IDLE else initial)
    assert all(to is not Role.STANDBY for _, to in m.moves)


@pytest.mark.parametrize("initial", [Role.CLIENT, Role.IDLE])
def test_promotion_is_refused_unless_a_standby(initial):
    m, out = machine(initial)
    with pytest.raises(RoleChangeRefused, match="cannot become idle|cannot become"):
        m.promote("m1", "why", {})
    assert out.log == [] and m.promotion is None


def test_a_closed_machine_makes_no_role_change():
    m, out = machine(Role.STANDBY)
    m.close()
    assert m.promote("m1", "why", {}) is False
    assert m.role is Role.STANDBY and out.log == []


# -- the API's router ------------------------------------------------------------------------


class NamedRouter:
    def __init__(self, name: str):
        self.name = name
        self.finished: list[Any] = []

    def models(self):
        return [{"id": self.name}]

    def upstreams(self, model, client_id):
        return [routing.Upstream(self.name, endpoint=lambda: None)]

    def upstream_failed(self, upstream, reason):
        pass

    def request_started(self, upstream):
        pass

    def request_finished(self, upstream):
        self.finished.append(upstream)


def test_the_switchable_router_routes_with_whichever_router_it_points_at():
    a, b = NamedRouter("a"), NamedRouter("b")
    r = SwitchableRouter()
    assert r.models() == []
    with pytest.raises(routing.NotReady):
        r.upstreams("m", "c")
    r.point_at(a)
    assert r.models() == [{"id": "a"}] and r.upstreams("m", "c")[0].name == "a"
    r.point_at(b)
    (up,) = r.upstreams("m", "c")
    r.request_finished(up)
    assert up.name == "b" and b.finished == [up] and a.finished == []


# -- the service: the outputs swap one group for the other -------------------------------------


class Recorder(service.Service):
    def __init__(self, name: str, log: list[str]):
        self.name = name
        self.log = log

    def startService(self):  # noqa: N802
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self):  # noqa: N802
        super().stopService()
        self.log.append(f"stop {self.name}")


class FakeGroups:
    def __init__(self, log: list[str]):
        self.log = log
        self.built: list[str] = []

    def active(self, roles: RoleService) -> RoleGroup:
        self.built.append("active")
        return RoleGroup("active", [Recorder("tunnels", self.log), Recorder("mesh", self.log)],
                         router=NamedRouter("mesh router"), facing=("mesh",),
                         parts=RoleParts(mesh=SimpleNamespace(mesh_id="m", peers=list)))

    def passive(self, roles: RoleService, reason: str | None) -> RoleGroup:
        self.built.append(f"passive ({reason})")
        p = Recorder("passive", self.log)
        p.promotion = {"table": "t.1"}  # what the passive node decided
        return RoleGroup("passive", [p], router=NamedRouter("table router"),
                         facing=("passive",), parts=RoleParts(passive=p))


def standby_service():
    clock = Clock()
    node = Node(Config().replace("node", standby=True), reactor=clock, node_id="me",
                vram_bytes=8 << 30)
    node.scan = SimpleNamespace(models={"m1": LocalModel("m1", "/m/m1.gguf", ("m1.gguf",),
                                                         1 << 20)})
    log: list[str] = []
    served: list[tuple] = []
    router = SwitchableRouter()
    groups = FakeGroups(log)
    roles = RoleService(node, router, groups, reactor=clock,
                        serve=lambda *a: served.append(a), status=lambda text: None)
    roles.startService()
    roles.enter()
    return SimpleNamespace(node=node, roles=roles, router=router, log=log, served=served,
                           groups=groups, clock=clock)


def test_a_promotion_swaps_the_passive_group_for_the_active_one_and_serves_the_model():
    t = standby_service()
    assert t.router.target.name == "table router" and t.node.role == "standby"
    passive = t.node.passive
    t.roles.promote("m1", "m1 has no host")
    assert t.groups.built == ["passive (None)", "active"]
    assert t.router.target.name == "mesh router" and t.node.passive is None
    assert t.node.mesh is not None and t.node.role == "idle"
    assert t.served == [("m1", "/m/m1.gguf", 1 << 20)]
    assert t.node.promotion["model"] == "m1" and t.node.promotion["serving_at"] == 0
    assert t.node.promotion["table"] == "t.1"  # the passive node's decision, kept
    assert t.log == ["start passive", "start tunnels", "start mesh"]
    t.clock.advance(0)  # the passive node stops a moment later, outside its own callback
    assert t.log[-1] == "stop passive" and not passive.running


def test_a_promotion_for_a_model_gone_from_disk_changes_nothing():
    t = standby_service()
    t.roles.promote("gone", "why")
    assert t.groups.built == ["passive (None)"] and t.node.role == "standby"


def test_leave_stops_the_part_facing_the_mesh_first_and_the_stop_the_rest():
    t = standby_service()
    t.roles.promote("m1", "why")
    t.clock.advance(0)
    t.roles.leave()
    assert t.log[-1] == "stop mesh"
    t.roles.stopService()
    assert t.log[-1] == "stop tunnels"
    assert t.roles.machine.closed
