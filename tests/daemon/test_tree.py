"""The service tree's order: children start one after the other (each waited for) and
stop in reverse; a failing stop is collected and the others still stop; a listener
that cannot listen fails the start with one line."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError

from meshd.daemon.tree import CallbackService, ListenerService, OrderedMultiService
from meshd.errors import ServiceStopErrors, StartupError


class Child(service.Service):
    def __init__(self, name: str, log: list[str], *, start: defer.Deferred | None = None,
                 fail_stop: bool = False):
        self.name = name
        self.log = log
        self._start = start
        self.fail_stop = fail_stop

    def startService(self):  # noqa: N802
        super().startService()
        self.log.append(f"start {self.name}")
        return self._start

    def stopService(self):  # noqa: N802
        super().stopService()
        self.log.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError(f"{self.name} would not stop")


def tree(*children: service.IService) -> OrderedMultiService:
    top = OrderedMultiService()
    for c in children:
        c.setServiceParent(top)
    return top


def test_children_start_in_order_and_stop_in_reverse():
    log: list[str] = []
    top = tree(*(Child(n, log) for n in ("control", "api", "mesh")))
    assert top.startService().called
    d = top.stopService()
    assert d.called and d.result is None
    assert log == ["start control", "start api", "start mesh",
                   "stop mesh", "stop api", "stop control"]


def test_the_next_child_starts_only_once_the_one_before_is_up():
    log: list[str] = []
    slow = defer.Deferred()
    top = tree(Child("api", log, start=slow), Child("mesh", log))
    started = top.startService()
    assert log == ["start api"] and not started.called
    slow.callback(None)
    assert log == ["start api", "start mesh"] and started.called


def test_a_stop_during_the_start_starts_nothing_more_and_stops_what_runs():
    log: list[str] = []
    slow = defer.Deferred()
    top = tree(Child("control", log), Child("ready", log, start=slow), Child("never", log))
    top.startService()
    top.stopService()
    slow.callback(None)
    assert log == ["start control", "start ready", "stop ready", "stop control"]


def test_a_failing_stop_is_collected_and_the_others_still_stop():
    log: list[str] = []
    top = tree(Child("control", log), Child("backends", log, fail_stop=True), Child("api", log))
    top.startService()
    failures: list = []
    top.stopService().addErrback(failures.append)
    assert log[3:] == ["stop api", "stop backends", "stop control"]
    (f,) = failures
    assert f.check(ServiceStopErrors)
    (name, why), = f.value.errors
    assert name == "backends" and "would not stop" in why.getErrorMessage()
    assert "backends: backends would not stop" in str(f.value)


def test_a_failing_start_stops_the_start_and_only_started_children_are_stopped():
    log: list[str] = []
    top = tree(Child("control", log), Child("api", log, start=defer.fail(StartupError("busy"))),
               Child("mesh", log))
    failures: list = []
    top.startService().addErrback(failures.append)
    assert failures[0].check(StartupError) and log == ["start control", "start api"]
    top.stopService()
    assert log[2:] == ["stop api", "stop control"]


def test_callback_steps_run_their_calls_in_the_order():
    log: list[str] = []
    top = tree(CallbackService("downloads", on_stop=lambda: log.append("cancel")),
               CallbackService("drain", on_stop=lambda: log.append("drain")),
               CallbackService("presence", on_start=lambda: log.append("enter"),
                               on_stop=lambda: log.append("leave")))
    top.startService()
    top.stopService()
    assert log == ["enter", "leave", "drain", "cancel"]


class Refusing:
    def listen(self, factory):
        return defer.fail(CannotListenError("127.0.0.1", 9337, OSError("Address already in use")))


def test_a_listener_that_cannot_listen_fails_the_start_naming_the_key_and_address():
    svc = ListenerService("api", Refusing, object(), what="[api] listen 127.0.0.1:9337")
    failures: list = []
    svc.startService().addErrback(failures.append)
    (f,) = failures
    assert f.check(StartupError)
    assert str(f.value).startswith("[api] listen 127.0.0.1:9337: Couldn't listen on 127.0.0.1:9337")
    assert "\n" not in str(f.value)


class Port:
    stopped = False

    def stopListening(self):  # noqa: N802
        self.stopped = True
        return defer.succeed(None)


def test_a_listener_stops_listening_when_stopped():
    port = Port()

    class Endpoint:
        def listen(self, factory):
            return defer.succeed(port)

    svc = ListenerService("api", Endpoint, object(), what="[api] listen x")
    svc.startService()
    assert svc.port is port
    svc.stopService()
    assert port.stopped and svc.port is None


def test_stop_waits_for_each_child_before_the_next():
    log: list[str] = []
    gate = defer.Deferred()

    class Slow(Child):
        def stopService(self):  # noqa: N802
            super().stopService()
            return gate

    top = tree(Child("a", log), Slow("b", log), Child("c", log))
    top.startService()
    top.stopService()
    assert log[-2:] == ["stop c", "stop b"]
    gate.callback(None)
    assert log[-1] == "stop a"
