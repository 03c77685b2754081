"""Every door of one real meshd, attacked from here: raw HTTP, raw TLS, a well-behaved client.

``tests/test_every_door.py`` (the CI form) and ``bench/every_door.py`` (the latency
ratio) share this module.  :class:`Doors` starts one real daemon (``A``: the client
API, the web console, the control socket and the mesh port, its llama-server the
fast fake backend) and a second node (``B``) that joined it with a one-use token,
so the mesh port has a real member to keep serving and a used token to refuse.

An attack runs inside :meth:`Doors.attack`: while it runs, a :class:`WellBehaved`
client asks every door in turn (a chat completion on the API, ``/api/status`` on
the console, ``/status`` on the control socket) and records each answer and its
latency; when it ends, the daemon's descriptors must come back to their baseline
(a bounded wait: a door closes a connection on its own deadlines), its RSS must
stay within :data:`RSS_GROWTH_BYTES` of the baseline, B must still be its peer,
and the log written meanwhile must hold no traceback.

Every loop here is bounded in count and in time; every socket goes to 127.0.0.1
or to the daemon's UNIX socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from tests.conftest import DEFAULT_MODEL_NAME, free_port
from tests.harness.daemon import Meshd, fake_llama_bin_dir
from tests.harness.meshnodes import TEST_TIMING, Node

MODEL = DEFAULT_MODEL_NAME
API_KEY = "every-door-" + "k" * 16
# the bounds of issue 12's "every door" (Decisions)
RSS_GROWTH_BYTES = 50 * 1024 * 1024
FD_SLACK = 10
# the daemon's deadlines, short so that the suite is quick (the defaults are 10/60/60 s)
HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
STALL_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 2.0  # [mesh] connect_timeout_s: TCP accepted to HELLO verified
API_MAX_BODY = 1024 * 1024
# the console's and the control socket's bounds (not configurable)
CONSOLE_MAX_BODY = 1024 * 1024
CONTROL_MAX_BODY = 64 * 1024
FIXED_HEAD_TIMEOUT_S = 10.0
# a well-behaved request must be answered within this long, attack or not: generous,
# since this 2-core machine is shared; the 2x-of-quiet ratio is bench/every_door.py's
SERVICE_DEADLINE_S = 15.0
BAD_LOG = re.compile(r"Traceback|CRITICAL|Unhandled [Ee]rror")


# -- the daemon's resources ---------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(need: int) -> None:
    """The test process (and the daemons it starts) may need ``need`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        raise AssertionError(
            f"the every-door suite needs {need} descriptors; the hard limit "
            f"is {hard} (raise it: ulimit -Hn)"
        )


# -- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class Answer:
    """What a raw connection got: the status of the first response (None: none came),
    the bytes read, whether the server closed, and how long it took."""

    status: int | None
    data: bytes
    closed: bool
    elapsed_s: float

    def body_json(self) -> Any:
        body = self.data.partition(b"\r\n\r\n")[2]
        return json.loads(body)


def parse_status(data: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


def final_response(data: bytes) -> bool:
    """Whether ``data`` holds a whole response that says ``Connection: close``: the
    server's last word (it may keep reading and discarding for a while before it
    closes, so that the client reads the answer rather than a reset)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = [line.lower() for line in head.split(b"\r\n")[1:]]
    if b"connection: close" not in lines:
        return False
    lengths = [int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")]
    return bool(lengths) and len(body) >= lengths[0]


def connect(address: tuple[str, int] | str, timeout_s: float = 5.0, *,
            source: str | None = None) -> socket.socket:
    """A TCP connection to 127.0.0.1:port, or one to a UNIX socket's path; ``source``:
    the local address to send from (any of 127.0.0.0/8 reaches loopback)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    end = time.monotonic() + timeout_s
    for _ in range(1000):  # bounded: a full listen backlog clears as the server accepts
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout_s)
        if source is not None:
            s.bind((source, 0))
        try:
            s.connect(address)
            return s
        except BlockingIOError:  # a UNIX socket's backlog is full: EAGAIN, not a wait
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.01)
    raise AssertionError(f"could not connect to {address}")


def read_until_closed(
    s: socket.socket, deadline_s: float, *, limit: int = 1 << 20
) -> tuple[bytes, bool]:
    """Read until the peer closes, ``limit`` bytes or ``deadline_s``; (data, closed)."""
    data = b""
    end = time.monotonic() + deadline_s
    while len(data) < limit:
        left = end - time.monotonic()
        if left <= 0:
            return data, False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return data, False
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
        if final_response(data):
            return data, True
    return data, False


def exchange(
    address: tuple[str, int] | str,
    payload: bytes | Callable[[socket.socket], None],
    *,
    deadline_s: float = 10.0,
    half_close: bool = False,
) -> Answer:
    """Send ``payload`` (bytes, or a function that writes to the socket), then read
    what comes back until the server closes the connection, bounded by ``deadline_s``."""
    start = time.monotonic()
    s = connect(address)
    try:
        try:
            if callable(payload):
                payload(s)
            else:
                s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: read what it said
        data, closed = read_until_closed(s, deadline_s)
    finally:
        s.close()
    return Answer(parse_status(data), data, closed, time.monotonic() - start)


def exchange_many(
    address: tuple[str, int] | str,
    payloads: list[bytes],
    *,
    deadline_s: float,
    half_close: bool = False,
) -> list[Answer]:
    """:func:`exchange` on one connection per payload, all at once (so that waiting for
    a door's deadline costs the deadline once, not once per connection)."""
    start = time.monotonic()
    socks = []
    try:
        for payload in payloads:
            s = connect(address)
            try:
                s.sendall(payload)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.setblocking(False)
            socks.append(s)
        got = {s: b"" for s in socks}
        done: dict[socket.socket, float] = {}
        end = start + deadline_s
        while len(done) < len(socks) and time.monotonic() < end:
            live = [s for s in socks if s not in done]
            ready, _, _ = select.select(live, [], [], max(0.0, end - time.monotonic()))
            for s in ready:
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                got[s] += data
                if not data or final_response(got[s]):
                    done[s] = time.monotonic() - start
        return [
            Answer(parse_status(got[s]), got[s], s in done, done.get(s, time.monotonic() - start))
            for s in socks
        ]
    finally:
        for s in socks:
            s.close()


def head(
    method: str,
    path: str,
    headers: dict[str, str] | list[tuple[str, str]],
    body: bytes = b"",
    *,
    length: bool = True,
) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if (
        length
        and body
        and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in items)
    ):
        items.append(("Content-Length", str(len(body))))
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in items)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the mesh port: a stranger speaking raw TLS ----------------------------------------------


def foreign_tls_context(*, cert: bool = True, tls12: bool = False) -> SSL.Context:
    """A client TLS context with a certificate the mesh has never seen (a fresh
    identity's), or none; ``tls12``: TLS 1.2 at most (meshd speaks 1.3 only)."""
    from meshd.mesh import identity

    ctx = SSL.Context(SSL.TLS_METHOD)
    if tls12:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    else:
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    if cert:
        ident = identity.ephemeral()
        ctx.use_certificate(ident.cert)
        ctx.use_privatekey(ident.key)
        ctx._meshd_identity = ident  # type: ignore[attr-defined]
    return ctx


class Stranger:
    """One TLS connection to the mesh port, blocking, every read bounded."""

    def __init__(self, port: int, ctx: SSL.Context, timeout_s: float = 5.0, *,
                 source: str | None = None):
        self.sock = connect(("127.0.0.1", port), timeout_s, source=source)
        self.sock.settimeout(None)
        self.conn = SSL.Connection(ctx, self.sock)
        self.conn.set_connect_state()
        self.identity = getattr(ctx, "_meshd_identity", None)
        self._buffer = b""
        self.timeout_s = timeout_s

    def handshake(self) -> bool:
        """The TLS handshake; False when the server refused it."""
        end = time.monotonic() + self.timeout_s
        while time.monotonic() < end:
            try:
                self.conn.do_handshake()
                return True
            except SSL.WantReadError:
                select.select([self.sock], [], [], max(0.0, end - time.monotonic()))
            except (SSL.Error, OSError):
                return False
        return False

    def ekm(self) -> bytes:
        from meshd.mesh.peer import EKM_LABEL

        return self.conn.export_keying_material(EKM_LABEL, 32, None)

    def send(self, data: bytes) -> bool:
        try:
            self.conn.sendall(data)
            return True
        except (SSL.Error, OSError):
            return False

    def frames_until_closed(self, deadline_s: float) -> tuple[list[tuple[int, bytes]], bool]:
        """The frames the server sent until it closed the connection (or ``deadline_s``
        passed: closed is False then)."""
        from meshd.mesh import wire

        decoder = wire.Decoder()
        frames: list[tuple[int, bytes]] = []
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return frames, False
            if not self.conn.pending():
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    return frames, False
            try:
                data = self.conn.recv(65536)
            except SSL.WantReadError:
                continue
            except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, OSError):
                return frames, True
            if not data:
                return frames, True
            frames += [(f.type, f.payload) for f in decoder.feed(data)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.shutdown()
        self.sock.close()


def close_code(frames: list[tuple[int, bytes]]) -> str | None:
    """The code of the CLOSE among ``frames``, None when there is none."""
    from meshd.mesh import wire

    for ftype, payload in frames:
        if ftype == wire.FrameType.CLOSE:
            return wire.decode_close(payload).code.value
    return None


def hello(
    stranger: Stranger,
    *,
    mesh_id: str,
    key: bytes,
    auth: str = "mesh",
    token_id: str | None = None,
    node_id: str | None = None,
) -> bytes:
    """A client HELLO frame as meshd's own dialler builds it, proving ``key`` on this
    session (claiming ``node_id``: by default the stranger's own certificate's)."""
    from meshd.mesh import peer, wire

    assert stranger.identity is not None
    claimed = node_id or stranger.identity.node_id
    body: dict[str, Any] = {
        "proto": wire.PROTOCOL_VERSION,
        "min_proto": wire.MIN_PROTOCOL_VERSION,
        "mesh_id": mesh_id,
        "node_id": claimed,
        "incarnation": 1,
        "purpose": "gossip",
        "auth": auth,
        "proof": peer.proof(key, b"client", mesh_id, claimed, stranger.ekm()).hex(),
    }
    if token_id is not None:
        body["token_id"] = token_id
    return wire.encode_json(wire.FrameType.HELLO, body)


# -- the well-behaved client ---------------------------------------------------------------


@dataclass
class Served:
    door: str
    ok: bool
    latency_s: float
    detail: str = ""


class WellBehaved:
    """Asks every door in turn, one request at a time, until stopped; records each."""

    def __init__(self, doors: Doors, pause_s: float = 0.05):
        self.doors = doors
        self.pause_s = pause_s
        self.results: list[Served] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="well-behaved", daemon=True)

    def start(self) -> WellBehaved:
        self._thread.start()
        return self

    def stop(self) -> list[Served]:
        self._stop.set()
        self._thread.join(SERVICE_DEADLINE_S * 2)
        return self.results

    def _run(self) -> None:
        asks = [
            ("api", self.doors.ask_api),
            ("console", self.doors.ask_console),
            ("control", self.doors.ask_control),
        ]
        for i in range(100_000):  # bounded; stopped long before
            if self._stop.is_set() and i >= len(asks):  # every door asked at least once
                return
            name, ask = asks[i % len(asks)]
            self.results.append(timed(name, ask))
            self._stop.wait(self.pause_s)


def timed(name: str, ask: Callable[[], str | None]) -> Served:
    start = time.monotonic()
    try:
        problem = ask()
    except Exception as e:  # noqa: BLE001 - any failure is a failed service
        problem = f"{type(e).__name__}: {e}"
    return Served(name, problem is None, time.monotonic() - start, problem or "")


# -- the daemon under attack ------------------------------------------------------------------


@dataclass
class Baseline:
    rss: int
    fds: int


@dataclass
class AttackRecord:
    name: str
    served: list[Served] = field(default_factory=list)
    rss_after: int = 0
    fds_peak: int = 0
    fds_after: int = 0


class Doors:
    """Node A with every door open, node B its peer; see the module's docstring."""

    def __init__(self, base: Path, gguf: str, *, penalties: bool = True):
        """``penalties``: A refuses a source that keeps failing to authenticate on its
        mesh port ([mesh] penalty_failures, on by default); off, every attack on the
        mesh port meets the refusal of its own kind, however many came before."""
        self.base = Path(base)
        self.console_port = free_port()
        self.a = Meshd(
            self.base / "a",
            {
                "models": {"serve": [gguf], "min_free_gb": 0.0},
                "llama": {
                    "bin_dir": fake_llama_bin_dir(self.base / "a", "--chunks", "8"),
                    "restart_min_s": 1.0,
                },
                "console": {"enabled": True, "listen": f"127.0.0.1:{self.console_port}"},
                "api": {
                    "api_key": API_KEY,
                    "max_body_bytes": API_MAX_BODY,
                    "head_timeout_s": HEAD_TIMEOUT_S,
                    "body_timeout_s": BODY_TIMEOUT_S,
                    "client_stall_timeout_s": STALL_TIMEOUT_S,
                },
                "mesh": {**TEST_TIMING, "connect_timeout_s": HANDSHAKE_TIMEOUT_S,
                         **({} if penalties else {"penalty_failures": 0})},
                "log": {"level": "info"},
            },
            name="a",
        )
        self.b: Node | None = None
        self.baseline: Baseline | None = None
        self.records: list[AttackRecord] = []
        self._log_offset = 0

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> Doors:
        self.a.start()
        self.a.wait_running(timeout=60)
        used = self.a.control("POST", "/token", {"ttl_s": 600, "once": True})["token"]
        self.used_token = used
        self.b = Node(self.base / "b", "b", mesh={**TEST_TIMING})
        self.b.start(join=[used])
        self.a.wait_model_warm(MODEL, timeout=90)
        self.b.wait_for(lambda n: n.mesh_id() == self.mesh_id, "B in A's mesh", timeout=60)
        self.a.wait_for(lambda n: self.b_connected(), "B among A's peers", timeout=30)
        # warm every door once (first-request costs are no attack's), then the baseline
        for _ in range(3):
            for ask in (self.ask_api, self.ask_console, self.ask_control):
                problem = ask()
                assert problem is None, problem
        time.sleep(0.5)  # let the warm-up's connections close
        self.baseline = Baseline(rss_bytes(self.a.pid), fd_count(self.a.pid))
        self._log_offset = len(self.a.log())
        return self

    def stop(self) -> None:
        if self.b is not None:
            self.b.stop(timeout=15)
        self.a.stop(timeout=15)

    # -- the doors -----------------------------------------------------------------------

    @property
    def api(self) -> tuple[str, int]:
        return ("127.0.0.1", self.a.api_port)

    @property
    def console(self) -> tuple[str, int]:
        return ("127.0.0.1", self.console_port)

    @property
    def control(self) -> str:
        return self.a.socket

    @property
    def mesh_port(self) -> int:
        return self.a.mesh_port

    @property
    def mesh_id(self) -> str:
        return self.a.control("GET", "/status")["mesh_id"]

    def mesh_secret(self) -> bytes:
        doc = json.loads((self.a.dir / "state" / "mesh.json").read_text())
        return bytes.fromhex(doc["secret"])

    def b_connected(self) -> bool:
        assert self.b is not None
        peers = self.a.control("GET", "/status", timeout=SERVICE_DEADLINE_S)["peers"]
        return any(p["node_id"] == self.b.node_id for p in peers)

    def address(self, door: str) -> tuple[str, int] | str:
        return {"api": self.api, "console": self.console, "control": self.control}[door]

    def host_header(self, door: str) -> str:
        return {
            "api": f"127.0.0.1:{self.a.api_port}",
            "console": f"127.0.0.1:{self.console_port}",
            "control": "localhost",
        }[door]

    def post_target(self, door: str) -> tuple[str, dict[str, str]]:
        """The path a door takes a JSON body on, and the headers a good client sends."""
        host = {"Host": self.host_header(door), "Connection": "close"}
        if door == "control":
            return "/token", {**host, "Content-Type": "application/json"}
        return "/v1/chat/completions", {
            **host,
            "Content-Type": "application/json",
            "Authorization": f"Bearer {API_KEY}",
        }

    def max_body(self, door: str) -> int:
        return {"api": API_MAX_BODY, "console": CONSOLE_MAX_BODY, "control": CONTROL_MAX_BODY}[door]

    # -- a well-behaved request at each door: None, or what was wrong ------------------------

    def ask_api(self) -> str | None:
        conn = http.client.HTTPConnection(*self.api, timeout=SERVICE_DEADLINE_S)
        try:
            body = json.dumps(
                {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            )
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
            )
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if r.status != 200:
            return f"API answered {r.status}: {data[:200]!r}"
        content = json.loads(data)["choices"][0]["message"]["content"]
        return None if content.split() == ["t0", "t1", "t2", "t3"] else f"API answered {content!r}"

    def ask_console(self) -> str | None:
        conn = http.client.HTTPConnection(*self.console, timeout=SERVICE_DEADLINE_S)
        try:
            conn.request("GET", "/api/status")
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if r.status != 200:
            return f"console answered {r.status}: {data[:200]!r}"
        return None if json.loads(data).get("node_id") else f"console answered {data[:200]!r}"

    def ask_control(self) -> str | None:
        status = self.a.control("GET", "/status", timeout=SERVICE_DEADLINE_S)
        return None if status.get("state") == "running" else f"control answered {status}"

    # -- an attack -----------------------------------------------------------------------

    @contextlib.contextmanager
    def attack(self, name: str, *, fd_wait_s: float = 15.0) -> Iterator[AttackRecord]:
        """Run the ``with`` body as an attack: a well-behaved client meanwhile, the
        resource bounds and a clean log after.  The body must close its own sockets
        (or leave them to the daemon's deadlines, which ``fd_wait_s`` waits for)."""
        assert self.baseline is not None, "Doors.start() first"
        record = AttackRecord(name)
        client = WellBehaved(self).start()
        peak = {"fds": 0}
        stop_sampling = threading.Event()

        def sample() -> None:
            for _ in range(100_000):
                if stop_sampling.wait(0.1):
                    return
                with contextlib.suppress(OSError):
                    peak["fds"] = max(peak["fds"], fd_count(self.a.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield record
        finally:
            stop_sampling.set()
            sampler.join(5)
            record.served = client.stop()
        record.fds_peak = peak["fds"]
        self._check_after(record, fd_wait_s)
        self.records.append(record)

    def _check_after(self, record: AttackRecord, fd_wait_s: float) -> None:
        assert self.baseline is not None
        assert self.a.proc is not None and self.a.proc.poll() is None, (
            f"{record.name}: meshd exited ({self.a.proc.returncode})\n{self.a.log()[-3000:]}"
        )
        failed = [s for s in record.served if not s.ok]
        assert not failed, f"{record.name}: the well-behaved client was refused: {failed[:5]}"
        doors = {s.door for s in record.served}
        assert doors == {"api", "console", "control"}, (
            f"{record.name}: a door was not asked meanwhile: {sorted(doors)}"
        )
        # a connection's close reaches the daemon a moment later: wait for it, bounded
        bound = self.baseline.fds + FD_SLACK
        end = time.monotonic() + fd_wait_s
        while (fds := fd_count(self.a.pid)) > bound and time.monotonic() < end:
            time.sleep(0.1)
        record.fds_after = fds
        assert fds <= bound, (
            f"{record.name}: {fds} descriptors open after the attack, "
            f"baseline {self.baseline.fds} (+{FD_SLACK} allowed)"
        )
        record.rss_after = rss_bytes(self.a.pid)
        growth = record.rss_after - self.baseline.rss
        assert growth < RSS_GROWTH_BYTES, (
            f"{record.name}: RSS grew {growth / 2**20:.1f} MiB over the baseline (limit 50 MB)"
        )
        for ask in (self.ask_api, self.ask_console, self.ask_control):
            problem = ask()
            assert problem is None, f"after {record.name}: {problem}"
        assert self.b_connected(), f"after {record.name}: B is no longer A's peer"
        log = self.a.log()
        new, self._log_offset = log[self._log_offset :], len(log)
        bad = [line for line in new.splitlines() if BAD_LOG.search(line)]
        assert not bad, (
            f"{record.name}: the daemon's log says:\n" + "\n".join(bad[:20]) + "\n" + new[-3000:]
        )

    def new_log(self) -> str:
        """What the daemon logged since the last attack's check (for a test's own asserts)."""
        return self.a.log()[self._log_offset :]


def random_junk(n: int) -> bytes:
    return secrets.token_bytes(n)
