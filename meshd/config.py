"""The configuration schema: every key, its type, default and unit, in one place.

A reader looking for a timeout, interval or limit finds it here.  The file is
TOML (``/etc/meshd.toml`` by default); command-line flags override the file and
the file overrides these defaults.  Validation collects *every* problem, each
naming its key, so ``meshd --check-config`` can print them all at once and an
operator never sees a traceback for a typo.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

from meshd import nodename

DEFAULT_PATH = "/etc/meshd.toml"
ENV_VAR = "MESHD_CONFIG"


class ConfigError(Exception):
    """One or more problems in a configuration; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class NodeConfig:
    # what people call this node (status, peers, the console, log lines), the id beside it
    name: str = field(default_factory=nodename.default_name)
    state_dir: str = "/var/lib/meshd"
    models_dir: str = "/var/lib/meshd/models"
    control_socket: str = "/run/meshd/control.sock"
    # None: detect (NVIDIA via pynvml, else a share of system RAM)
    vram_gb: float | None = None
    max_vram_gb: float | None = None
    # GPU indices to use; empty: all that CUDA_VISIBLE_DEVICES lets us see
    gpus: list[int] = field(default_factory=list)
    client: bool = False
    standby: bool = False


@dataclass(frozen=True)
class MeshConfig:
    listen: str = "0.0.0.0:7842"
    advertise: list[str] = field(default_factory=list)
    join: list[str] = field(default_factory=list)
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    rejoin_s: float = 60.0
    refresh_s: float = 30.0
    max_frame_bytes: int = 1024 * 1024
    # a PEER_DOWN report is checked by probing the peer ourselves; no answer within this long confirms it
    verify_timeout_s: float = 2.0
    # dialling a peer: TCP connect, TLS handshake and HELLO must finish within this long
    connect_timeout_s: float = 5.0
    # a source address may fail to authenticate on the mesh port this many times, and gets
    # an attempt back every penalty_s; with none left it is refused before TLS (0: never)
    penalty_failures: int = 10
    penalty_s: float = 1.0


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:9337"
    api_key: str = ""
    max_body_bytes: int = 16 * 1024 * 1024
    drain_s: float = 30.0
    # an upstream (llama-server, tunnel) that does not accept the connection
    # within this long counts as unreachable: the request fails over
    connect_timeout_s: float = 10.0
    # a last resort against an upstream that accepted a request and sends
    # nothing: no response byte within this long and the request fails over (or
    # is answered 504). Long: llama-server sends nothing until the first token,
    # and a request queued for a busy slot waits for it; a hung llama-server is
    # found sooner by its /health ([llama] live_interval_s, live_misses)
    first_byte_timeout_s: float = 300.0
    # once a response began, this long without a byte ends it (an SSE error
    # event on a stream, a 504 for an answer not yet passed on)
    stream_idle_timeout_s: float = 120.0
    # slowloris: a request's head must be in this long after its first byte, its
    # body this long after the head (not restarted by each byte); else 408
    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # our client has not read for this long while the upstream waits on it: the
    # upstream is closed (llama-server stops generating) and so is our client
    client_stall_timeout_s: float = 60.0


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = True
    listen: str = "127.0.0.1:3131"


@dataclass(frozen=True)
class ModelsConfig:
    serve: list[str] = field(default_factory=list)
    extra_dirs: list[str] = field(default_factory=list)
    split: bool = False
    tensor_split: list[float] = field(default_factory=list)
    max_rtt_ms: float = 80.0
    min_free_gb: float = 5.0
    # an idle node asks for a model once no membership event came for this long
    # after joining (at most 3x this)
    assign_settle_s: float = 2.0


@dataclass(frozen=True)
class LlamaConfig:
    # empty: the build that scripts/build-llama.sh cached, else the meshd-llama-cpp
    # package's /usr/lib/meshd/llama.cpp/bin, else llama-server on PATH
    bin_dir: str = ""
    ctx_size: int = 4096
    # 0: let llama.cpp choose
    threads: int = 0
    extra_args: list[str] = field(default_factory=list)
    # how long a llama-server may take to load its model before it counts as failed
    load_timeout_s: float = 300.0
    # SIGTERM, then SIGKILL after this long
    stop_timeout_s: float = 10.0
    # restart back-off after a crash: min, doubling up to max
    restart_min_s: float = 1.0
    restart_max_s: float = 60.0
    # ready this long counts as stable: the next crash restarts after restart_min_s again
    restart_reset_s: float = 60.0
    # how often a loading llama-server's /health (rpc-server's port) is polled
    health_interval_s: float = 0.25
    # one /health poll (or rpc-server connect) gives up after this long
    health_timeout_s: float = 2.0
    # a ready llama-server's /health is probed this often; live_misses probes
    # in a row without an answer (each within health_timeout_s) mean it hung:
    # it is restarted (llama-server answers /health even with every slot busy)
    live_interval_s: float = 2.0
    live_misses: int = 3
    # a split worker's rpc-server keeps the tensors it was sent (-c) in
    # <rpc_cache_dir>/rpc, so a re-plan or restart does not send them again
    rpc_cache: bool = True
    # empty: the unit's cache directory (CACHE_DIRECTORY), else <state_dir>/cache
    rpc_cache_dir: str = ""
    # the least recently used files go before an rpc-server starts, down to this
    rpc_cache_max_gb: float = 20.0


@dataclass(frozen=True)
class PolicyConfig:
    plugins: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    # every *.py here is loaded as a plugin, after the ones named in plugins
    plugins_dir: str = "/etc/meshd/plugins.d"
    # a hook call slower than this is logged with the plugin's name
    slow_hook_ms: float = 50.0
    # [policy.<plugin>] tables, handed to the plugin as they are
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # "text" (one readable line per event) or "json" (one JSON object per line)
    format: str = "text"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # where it came from, for messages; None when built from defaults
    path: str | None = None

    def replace(self, section: str, **changes: Any) -> Config:
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name != "path"
}

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ADDRESS_KEYS = {("mesh", "listen"), ("api", "listen"), ("console", "listen")}


# -- addresses ---------------------------------------------------------------


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to ``(host, port)``; ValueError says why not."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("unclosed '[' in IPv6 address")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("expected [host]:port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif text.count(":") == 0:
        host, port_text = text, ""
    else:
        raise ValueError("IPv6 addresses need brackets: [::1]:9337")
    if not host:
        raise ValueError("missing host")
    if not port_text:
        if default_port is None:
            raise ValueError("missing :port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# the listen queue of every TCP door: Twisted's default (50) drops the rest of a
# burst of connects, which the clients retry a second later (the kernel caps it
# at net.core.somaxconn)
LISTEN_BACKLOG = 4096


def tcp_endpoint(address: str) -> str:
    """A Twisted server endpoint string for ``host:port`` (IPv6 colons escaped), with a
    listen backlog long enough for a burst of connects (:data:`LISTEN_BACKLOG`)."""
    host, port = parse_address(address)
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}:backlog={LISTEN_BACKLOG}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- loading ------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(typing.get_args(tp)[0], 'values')}"
    if origin is dict:
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any) -> Any:
    """Value checked against ``tp``; raises TypeError.  ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float (TOML's are unbounded)
            raise TypeError from None
    if tp in (int, float) and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, tp):
        raise TypeError
    return value


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, also for an integer too long for ``repr`` (over
    4300 digits, a ValueError) -- a message must never become a traceback."""
    try:
        return repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "?"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(data: dict[str, Any], path: str | None = None) -> Config:
    """Build a Config from parsed TOML, collecting every problem into one ConfigError."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, section_data in data.items():
        if name not in SECTIONS:
            problems.append(f"[{name}]: unknown section (known: {', '.join(SECTIONS)})")
            continue
        if not isinstance(section_data, dict):
            problems.append(f"[{name}]: must be a table")
            continue
        cls = SECTIONS[name]
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for key, value in section_data.items():
            if name == "policy" and key not in hints and isinstance(value, dict):
                values.setdefault("settings", {})[key] = value
                continue
            if key not in hints or key == "settings":
                problems.append(f"[{name}] {key}: unknown key (known: {', '.join(k for k in hints if k != 'settings')})")
                continue
            try:
                values[key] = _coerce(value, hints[key])
            except TypeError:
                problems.append(
                    f"[{name}] {key}: expected {_type_name(hints[key])}, got {_shown(value)}"
                )
        try:
            sections[name] = cls(**values)
        except TypeError as e:  # pragma: no cover - guarded by the checks above
            problems.append(f"[{name}]: {e}")
    config = Config(**sections, path=path)
    problems += validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def _not_finite(config: Config) -> list[str]:
    """Every float that is NaN or infinite, by key: TOML allows ``nan`` and ``inf``, and
    ``heartbeat_s = nan`` passes every range check (each comparison is false)."""
    problems: list[str] = []
    for name in SECTIONS:
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, float) and not math.isfinite(v):
                    where = f"{f.name}[{i}]" if isinstance(value, list) else f.name
                    problems.append(f"[{name}] {where}: {v} is not a finite number")
    return problems


def validate(config: Config) -> list[str]:
    """Checks that span more than a type: finite numbers, ranges, addresses, levels."""
    problems: list[str] = _not_finite(config)
    for section, key in sorted(ADDRESS_KEYS):
        value = getattr(getattr(config, section), key)
        try:
            parse_address(value)
        except ValueError as e:
            problems.append(f"[{section}] {key}: {value!r} is not a usable address: {e}")
    for i, addr in enumerate(config.mesh.advertise):
        try:
            parse_address(addr, default_port=0)
        except ValueError as e:
            problems.append(f"[mesh] advertise[{i}]: {addr!r}: {e}")
    positive = [
        ("mesh", "heartbeat_s"), ("mesh", "heartbeat_timeout_s"), ("mesh", "rejoin_s"),
        ("mesh", "refresh_s"), ("mesh", "max_frame_bytes"), ("api", "max_body_bytes"),
        ("mesh", "verify_timeout_s"), ("mesh", "connect_timeout_s"), ("mesh", "penalty_s"),
        ("api", "connect_timeout_s"), ("policy", "slow_hook_ms"), ("models", "assign_settle_s"),
        ("llama", "ctx_size"), ("llama", "load_timeout_s"), ("llama", "stop_timeout_s"),
        ("llama", "restart_min_s"), ("llama", "restart_max_s"), ("llama", "restart_reset_s"),
        ("llama", "health_interval_s"), ("llama", "health_timeout_s"),
        ("llama", "live_interval_s"), ("llama", "live_misses"), ("llama", "rpc_cache_max_gb"),
        ("api", "first_byte_timeout_s"), ("api", "stream_idle_timeout_s"),
        ("api", "head_timeout_s"), ("api", "body_timeout_s"), ("api", "client_stall_timeout_s"),
    ]
    for section, key in positive:
        if getattr(getattr(config, section), key) <= 0:
            problems.append(f"[{section}] {key}: must be greater than 0")
    non_negative = [
        ("node", "vram_gb"), ("node", "max_vram_gb"), ("api", "drain_s"), ("llama", "threads"),
        ("models", "min_free_gb"), ("mesh", "penalty_failures"),
    ]
    # 0 would leave every measured peer out of every split
    if not config.models.max_rtt_ms > 0:
        problems.append("[models] max_rtt_ms: must be greater than 0")
    for i, weight in enumerate(config.models.tensor_split):
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight <= 0):
            problems.append(f"[models] tensor_split[{i}]: {weight!r} is not a finite number > 0")
    for section, key in non_negative:
        value = getattr(getattr(config, section), key)
        if value is not None and value < 0:
            problems.append(f"[{section}] {key}: must not be negative")
    if config.mesh.heartbeat_timeout_s < config.mesh.heartbeat_s:
        problems.append("[mesh] heartbeat_timeout_s: must be at least heartbeat_s")
    if config.mesh.max_frame_bytes < 4096:
        problems.append("[mesh] max_frame_bytes: must be at least 4096")
    if config.log.level.lower() not in LOG_LEVELS:
        problems.append(f"[log] level: {config.log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if config.log.format not in LOG_FORMATS:
        problems.append(f"[log] format: {config.log.format!r} is not one of {', '.join(LOG_FORMATS)}")
    name_problem = nodename.problem(config.node.name)
    if name_problem is not None:
        problems.append(f"[node] name: {_shown(config.node.name)} {name_problem}")
    if config.node.client and config.node.standby:
        problems.append("[node] client: a client never serves, so it cannot also be standby")
    for i, gpu in enumerate(config.node.gpus):
        if gpu < 0:
            problems.append(f"[node] gpus[{i}]: GPU index must not be negative")
    for i, arg in enumerate(config.llama.extra_args):
        # meshd gives each llama-server start a key of its own (LLAMA_API_KEY) and
        # sends it on every request: another key would lock meshd out of its backend
        if arg.split("=", 1)[0] in ("--api-key", "--api-key-file"):
            problems.append(f"[llama] extra_args[{i}]: {arg.split('=', 1)[0]} is meshd's to set "
                            "(each llama-server gets a key only meshd holds); remove it")
        if arg == "--no-slots":  # a split host's liveness is asked on /slots
            problems.append(f"[llama] extra_args[{i}]: --no-slots would blind meshd to a "
                            "split llama-server wedged on a dead worker (its liveness check "
                            "asks /slots); remove it")
    if config.llama.bin_dir and not Path(config.llama.bin_dir).is_dir():
        problems.append(f"[llama] bin_dir: {config.llama.bin_dir!r} is not a directory")
    return problems


def default_path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | None = None, *, required: bool | None = None) -> Config:
    """Read and validate the file at ``path`` (default: $MESHD_CONFIG or /etc/meshd.toml).

    A missing default file means "all defaults"; a file the operator named
    (``--config`` or ``$MESHD_CONFIG``) must exist.
    """
    explicit = path is not None or ENV_VAR in os.environ
    path = path or default_path()
    if required is None:
        required = explicit
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError([f"{path}: no such file"]) from None
        return Config()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except Exception as e:  # noqa: BLE001 - the toml package fails on some malformed
        # documents with its own bugs ("[a]\n[[a]]": AttributeError): still a message
        raise ConfigError([f"{path}: not valid TOML ({type(e).__name__}: {e})"]) from None
    try:
        return from_dict(data, path=path)
    except ConfigError as e:
        raise ConfigError([f"{path}: {p}" for p in e.problems]) from None


def to_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as TOML-ready data (None values left out)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        settings = section.pop("settings", None)
        out[name] = {k: v for k, v in section.items() if v is not None}
        if settings:
            out[name].update(settings)
    return out


def dumps(config: Config) -> str:
    header = f"# effective configuration (file: {config.path or 'none, defaults'})\n"
    return header + toml.dumps(to_dict(config))
