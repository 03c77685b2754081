"""``meshctl``: the operator's CLI, talking to the local meshd over its control socket.

It must start fast and never print a traceback, so it uses blocking
``http.client`` over an AF_UNIX socket and imports no Twisted.  Every failure is
one line on stderr and an exit status scripts can rely on:

    0 done, 1 the daemon could not be reached (or failed), 2 bad usage,
    3 the daemon refused (or does not support the command).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from meshd import units

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3

DEFAULT_SOCKET = "/run/meshd/control.sock"
DEFAULT_CONFIG = "/etc/meshd.toml"
CONFIG_ENV = "MESHD_CONFIG"
DEFAULT_TIMEOUT_S = 15.0
# joining tries every address in the token; leaving waits for the goodbye broadcast
SLOW_TIMEOUT_S = 120.0


class Fail(Exception):
    """One line for the operator and the exit status that goes with it."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# -- finding and talking to the daemon -----------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("meshd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _socket_from_config(path: str, *, explicit: bool) -> str | None:
    """``[node] control_socket`` of the file at ``path``; None when it does not say."""
    import toml  # only when a config file is involved: it is the slowest import here

    try:
        with open(path) as f:
            data = toml.load(f)
    except FileNotFoundError:
        if explicit:
            raise Fail(f"{path}: no such file", EXIT_USAGE) from None
        return None
    except OSError as e:
        if explicit:
            raise Fail(f"{path}: cannot read: {e.strerror}", EXIT_USAGE) from None
        return None
    except toml.TomlDecodeError as e:
        raise Fail(f"{path}: not valid TOML: {e}", EXIT_USAGE) from None
    value = (data.get("node") or {}).get("control_socket")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Fail(f"{path}: [node] control_socket: expected a path", EXIT_USAGE)
    return value


def find_socket(socket_arg: str | None, config_arg: str | None, env=os.environ) -> str:
    """--socket, else --config's control_socket, else $MESHD_CONFIG's, else /etc/meshd.toml's,
    else the default; a file that does not name a socket means the default."""
    if socket_arg:
        return socket_arg
    if config_arg:
        return _socket_from_config(config_arg, explicit=True) or DEFAULT_SOCKET
    if env.get(CONFIG_ENV):
        return _socket_from_config(env[CONFIG_ENV], explicit=True) or DEFAULT_SOCKET
    return _socket_from_config(DEFAULT_CONFIG, explicit=False) or DEFAULT_SOCKET


def _unreachable(path: str, e: OSError) -> Fail:
    if isinstance(e, FileNotFoundError):
        why = "no such file (is meshd running?)"
    elif isinstance(e, ConnectionRefusedError):
        why = "connection refused (meshd is not running; the socket is stale)"
    elif isinstance(e, PermissionError):
        why = "permission denied (run as root or as a member of the meshd group)"
    elif isinstance(e, socket.timeout | TimeoutError):
        why = "no answer in time"
    else:
        why = e.strerror or str(e) or e.__class__.__name__
    return Fail(f"cannot reach meshd at {path}: {why}", EXIT_UNREACHABLE)


def request(
    path: str, method: str, endpoint: str, body: dict | None = None, *, timeout_s: float
) -> Any:
    """One control request; the decoded JSON answer, or Fail with the right exit status."""
    conn = UnixHTTPConnection(path, timeout_s)
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, endpoint, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except http.client.RemoteDisconnected:
        raise Fail(
            f"meshd at {path} closed the connection without answering", EXIT_UNREACHABLE
        ) from None
    except (http.client.HTTPException, ValueError) as e:
        raise Fail(f"meshd at {path} answered garbage: {e}", EXIT_UNREACHABLE) from None
    except OSError as e:
        raise _unreachable(path, e) from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError:
        raise Fail(
            f"meshd at {path} answered {response.status} with a body that is not JSON",
            EXIT_UNREACHABLE,
        ) from None
    if response.status == 200:
        return data
    reason = data.get("error") if isinstance(data, dict) else None
    reason = " ".join(str(reason or response.reason).split())
    if response.status == 409:
        raise Fail(f"refused: {reason}", EXIT_REFUSED)
    if response.status in (404, 405, 501):
        what = endpoint.split("?")[0].strip("/").replace("/", " ")
        detail = "" if response.status == 501 else f" (HTTP {response.status})"
        raise Fail(f"this meshd does not support {what}{detail}", EXIT_REFUSED)
    if response.status == 400:
        raise Fail(f"bad request: {reason}", EXIT_USAGE)
    raise Fail(f"meshd failed: {reason}", EXIT_UNREACHABLE)


# -- formatting ----------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``30m``, ``24h``, ``7d``, ``1h30m``, ``90s`` or plain seconds, to seconds."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw]?)", text)
    if (
        not text
        or "".join(n + u for n, u in parts) != text
        or (len(parts) > 1 and any(not u for _, u in parts))
    ):
        raise ValueError(f"{text!r} is not a duration (examples: 3600, 30m, 24h, 7d)")
    seconds = sum(float(n) * units[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def human_bytes(n: float | None) -> str:
    """A size as everywhere in meshd (binary units, ``meshd.units``); ``-`` when unknown."""
    return "-" if n is None else units.human_bytes(n)


def short_id(node_id: Any) -> str:
    text = str(node_id or "-")
    return text if len(text) <= 12 else text[:12]


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric and (key.endswith("_bytes") or key.endswith("_bps")):
        text = human_bytes(value)
        return text + "/s" if key.endswith("_bps") else text
    if numeric and key.endswith("_ms"):
        return f"{value:.1f} ms"
    if numeric and key.endswith("_s"):
        return human_duration(value)
    if key == "node_id" or key == "host":
        return short_id(value)
    if key == "hosts" and isinstance(value, list):
        return ", ".join(short_id(h) for h in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(k, v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(key, v) for v in value) or "-"
    # names and reasons come from peers: nothing that moves a terminal's cursor gets through
    return " ".join("".join(c for c in str(value) if c.isprintable() or c.isspace()).split())


def node_label(node_id: Any, name: Any = None) -> str:
    """A node as people know it: ``name (short id)``; the short id alone when it has no name."""
    if not isinstance(name, str) or not name:
        return short_id(node_id)
    return f"{_cell('', name)} ({short_id(node_id)})"


def node_names(s: dict) -> dict[str, str]:
    """node id -> name of every node a status names (itself, its peers, and on a passive
    node the nodes of its routing table)."""
    route = s.get("route")
    table_names = route.get("names") if isinstance(route, dict) else None
    names = ({str(k): str(v) for k, v in table_names.items() if k and v}
             if isinstance(table_names, dict) else {})
    rows = [s, *(p for p in s.get("peers") or [] if isinstance(p, dict))]
    names.update({str(r["node_id"]): str(r["name"]) for r in rows
                  if r.get("node_id") and r.get("name")})
    return names


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Rows of dicts as aligned columns; ``columns`` is (key, heading), default every key seen."""
    if columns is None:
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        columns = [(k, k.upper()) for k in keys]
    cells = [[heading for _, heading in columns]]
    cells += [[_cell(k, row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def section(title: str, rows: Sequence[dict], columns=None, empty: str = "(none)") -> list[str]:
    lines = ["", title]
    if not rows:
        return lines + [f"  {empty}"]
    return lines + ["  " + line for line in table(rows, columns)]


def pairs(items: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in items)
    return [f"{k.ljust(width)}  {v}" for k, v in items]


def generic(data: Any) -> list[str]:
    """Any answer in readable form: scalars as key/value lines, lists of objects as tables."""
    if data is None:
        return []
    if isinstance(data, list):
        if data and all(isinstance(r, dict) for r in data):
            return table(data)
        return [_cell("", v) for v in data]
    if not isinstance(data, dict):
        return [str(data)]
    scalars = [
        (k, _cell(k, v))
        for k, v in data.items()
        if not isinstance(v, list | dict)
        or (isinstance(v, list) and not any(isinstance(x, dict) for x in v))
    ]
    lines = pairs(scalars) if scalars else []
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", key.upper()] + ["  " + line for line in generic(value)]
        elif isinstance(value, list) and any(isinstance(x, dict) for x in value):
            lines += section(key.upper(), value)
    return lines if lines else ["(nothing)"]


PEER_COLUMNS = [
    ("name", "NAME"),  # first: what people call it; the id beside it tells two of one name apart
    ("node_id", "NODE"),
    ("addr", "ADDRESS"),
    ("role", "ROLE"),
    ("serving", "SERVING"),
    ("vram_bytes", "VRAM"),
    ("rtt_ms", "RTT"),
    ("state", "STATE"),
]
MODEL_COLUMNS = [
    ("name", "MODEL"),
    ("state", "STATE"),
    ("hosts", "HOSTS"),
    ("size_bytes", "SIZE"),
]
DOWNLOAD_COLUMNS = [
    ("name", "MODEL"),
    ("bytes", "DONE"),
    ("total_bytes", "TOTAL"),
    ("rate_bps", "RATE"),
    ("eta_s", "ETA"),
]


def _split_parts(split: Any) -> list[dict]:
    """Every node of a split with its share, the host first: ``[{node_id, share}]``."""
    if not isinstance(split, dict):
        return []
    return [w for w in split.get("workers") or [] if isinstance(w, dict)]


def _share(part: dict) -> str:
    """A node's share of the layers; ``-`` until it has one (a split still waiting for
    VRAM lists its group with share 0)."""
    share = part.get("share")
    ok = isinstance(share, int | float) and not isinstance(share, bool) and share > 0
    return f"{share:.0%}" if ok else "-"


def _split_text(split: Any, names: dict[str, str] | None = None) -> str:
    """The MODELS table's SPLIT cell: who holds which share (the tunnels have a section)."""
    if not isinstance(split, dict):
        return "-"
    host = split.get("host")
    parts = [f"{node_label(p.get('node_id'), (names or {}).get(str(p.get('node_id'))))} {_share(p)}"
             + (" (host)" if p.get("node_id") == host else "")
             for p in _split_parts(split)]
    return ", ".join(parts) if parts else f"host {short_id(host)}"


TUNNEL_COLUMNS = [
    ("model", "MODEL"),
    ("node_id", "WORKER"),
    ("share", "SHARE"),
    ("state", "TUNNEL"),
    ("connections", "CONNECTIONS"),
    ("local_port", "PORT"),
]


def _tunnel_rows(models: Sequence[dict]) -> list[dict]:
    """One row per worker of each split this node hosts: its RPC tunnel's state.

    Only the host reports ``tunnels`` (a worker's status has none, and gets no rows);
    a worker of the plan with no entry port yet reads ``none``, and an entry port for
    a node no longer in the plan is still listed, so nothing the host holds is hidden.
    """
    rows = []
    for m in models:
        split = m.get("split")
        if not isinstance(split, dict) or not isinstance(split.get("tunnels"), list):
            continue
        tunnels = {t.get("node_id"): t for t in split["tunnels"] if isinstance(t, dict)}
        workers = [p for p in _split_parts(split) if p.get("node_id") != split.get("host")]
        planned = {p.get("node_id") for p in workers}
        for p in workers + [{"node_id": n} for n in tunnels if n not in planned]:
            t = tunnels.get(p.get("node_id"), {})
            rows.append({
                "model": m.get("name"),
                "node_id": p.get("node_id"),
                "share": _share(p) if "share" in p else "not in the plan",
                "state": t.get("state", "none"),
                "connections": t.get("connections"),
                "local_port": t.get("local_port"),
            })
    return rows


def _download_rows(downloads: list[dict]) -> list[dict]:
    rows = []
    for d in downloads:
        row = {k: d.get(k) for k, _ in DOWNLOAD_COLUMNS}
        for key in ("bytes", "total_bytes"):
            value = d.get(key)
            row[key] = human_bytes(value) if isinstance(value, int | float) else value
        total, done = d.get("total_bytes"), d.get("bytes")
        if isinstance(total, int | float) and total and isinstance(done, int | float):
            row["bytes"] = f"{row['bytes']} ({done / total:.0%})"
        rows.append(row)
    return rows


def format_status(s: dict) -> list[str]:
    serving = s.get("serving")
    model_state = next(
        (m.get("state") for m in s.get("models") or [] if m.get("name") == serving), None
    )
    passive = s.get("passive") or {}
    join = s.get("join") or {}
    mesh = str(s.get("mesh_id") or "-")
    if join:  # not in a mesh: why, and what it does about it
        mesh = f"- ({join.get('state', '?')}: {join.get('reason') or 'no reason given'})"
    names = node_names(s)
    node = str(s.get("node_id") or "-")
    lines = pairs(
        [
            ("node", f"{_cell('', s.get('name'))} ({node})" if s.get("name") else node),
            ("mesh", mesh),
            ("role", str(s.get("role") or "-")),
            ("serving", f"{serving} ({model_state or 'unknown'})" if serving else "nothing"),
            ("state", str(s.get("state") or "-")),
            ("api", str(s.get("api") or "-")),
            ("uptime", human_duration(s.get("uptime_s"))),
            (
                "passive",
                f"{passive.get('clients', 0)} clients, {passive.get('standby', 0)} standby",
            ),
        ]
    )
    lines += section("PEERS", s.get("peers") or [], PEER_COLUMNS)
    raw_models = [m for m in s.get("models") or [] if isinstance(m, dict)]
    models = [dict(m, split=_split_text(m.get("split"), names),
                   hosts=", ".join(node_label(h, names.get(str(h))) for h in m.get("hosts") or []) or None)
              for m in raw_models]
    with_split = any(m["split"] != "-" for m in models)
    lines += section("MODELS", models, MODEL_COLUMNS + ([("split", "SPLIT")] if with_split else []))
    # why a model waits ("need 5.3 GiB, group has 4.0 GiB of 2 nodes"): the numbers to act on
    # and why a split is planned so (peers skipped for RTT, a tensor_split that did not fit)
    for m in raw_models:
        raw_split = m.get("split")
        split: dict[str, Any] = raw_split if isinstance(raw_split, dict) else {}
        if str(m.get("state") or "").startswith("waiting"):
            reason = m.get("reason") or (m.get("local") or {}).get("reason")
            if reason:
                lines.append(f"{m.get('name')} {m.get('state')}: {reason}")
        elif split.get("reason"):
            lines.append(f"{m.get('name')} split: {split['reason']}")
    tunnels = _tunnel_rows(raw_models)
    if tunnels:  # on a split's host: is each worker's rpc-server reachable, and in use
        lines += section("RPC TUNNELS", tunnels, TUNNEL_COLUMNS)
    downloads = s.get("downloads") or []
    if downloads:
        lines += section("DOWNLOADS", _download_rows(downloads), DOWNLOAD_COLUMNS)
    # why a model is not arriving: gated or failed downloads, with their reasons
    for d in s.get("downloads_refused") or []:
        lines.append(f"download refused: {d.get('reason') or d.get('name')}")
    for d in s.get("downloads_failed") or []:
        lines.append(f"download failed: {d.get('name')}: {d.get('error')}")
    # the mesh's decisions: a model dropped here stays dropped until `meshctl serve`
    for d in s.get("desired") or []:
        if isinstance(d, dict) and d.get("state") == "dropped":
            lines.append(f"dropped mesh-wide: {d.get('model')} (by {d.get('by')}, version "
                         f"{d.get('version')}; meshctl serve {d.get('model')} lifts it)")
    return lines


def _hook_rows(hooks: Sequence[Any]) -> list[dict]:
    return [{"hook": str(h.get("hook", "")).removeprefix("meshd_"),
             "by": h.get("answered_by"), "answer": h.get("answer"),
             "asked": ", ".join(h.get("asked") or []) or "-"}
            for h in hooks if isinstance(h, dict)]


HOOK_COLUMNS = [("hook", "HOOK"), ("by", "ANSWERED BY"), ("asked", "ASKED (IN ORDER)"),
                ("answer", "ANSWER")]
# explain's "this node" line, from the election's action (meshd.states.ModelAction)
LOCAL_ACTIONS = {"run": "runs it", "wait": "waits", "worker": "lends its VRAM to the host"}
EXPLAIN_NODE_COLUMNS = [("node", "NODE"), ("role", "ROLE"), ("vram_bytes", "VRAM"),
                        ("rtt", "RTT"), ("file", "FILE"), ("part", "PART"), ("why", "WHY")]


def format_explain(d: dict) -> list[str]:
    """``meshctl explain MODEL``: the last election's inputs, hooks, each node's part or why
    it has none, and the route a request would take."""
    model = d.get("model")
    e = d.get("election") or {}
    items = [("model", str(model)), ("node", node_label(d.get("node_id"), d.get("name")))]
    if d.get("dropped"):
        items.append(("dropped", str(d.get("dropped_reason") or "yes")))
    names = {i.get("node_id"): i.get("name") for i in e.get("inputs") or [] if isinstance(i, dict)}
    if e:
        mode = e.get("mode") or "nothing planned"
        host = f", host {node_label(e['host'], names.get(e['host']))}" if e.get("host") else ""
        items.append(("decision", f"{mode}{host}: {e.get('reason') or '-'}"))
        local = e.get("local")
        if isinstance(local, dict):
            action = LOCAL_ACTIONS.get(str(local.get("action")), str(local.get("action")))
            items.append(("this node", f"{action}: {local.get('reason') or '-'}"))
        items.append(("size", f"{human_bytes(e.get('size_bytes'))}, needs "
                              f"{human_bytes(e.get('need_bytes'))} of VRAM ({e.get('fit_rule')})"))
        st = e.get("settings") or {}
        weights = ", ".join(f"{w:g}" for w in st.get("tensor_split") or []) or "-"
        items.append(("settings", f"split {'on' if st.get('split') else 'off'}, tensor_split "
                                  f"{weights}, max_rtt_ms {st.get('max_rtt_ms', 0):g}"))
        trigger = f" ({e['trigger']})" if e.get("trigger") else ""
        items.append(("planned", f"{human_duration(e.get('age_s'))} ago{trigger}: "
                                 f"{e.get('source')}"))
    else:
        items.append(("decision", "no election on record"))
    lines = pairs(items)
    if e:
        inputs = {i.get("node_id"): i for i in e.get("inputs") or [] if isinstance(i, dict)}
        rows = []
        for p in e.get("nodes") or []:
            if not isinstance(p, dict):
                continue
            i = inputs.get(p.get("node_id"), {})
            on_disk = i.get("on_disk_bytes")
            rows.append({"node": node_label(p.get("node_id"), p.get("name")),
                         "role": i.get("role"), "vram_bytes": i.get("vram_bytes"),
                         "rtt": "-" if i.get("rtt_ms") is None else f"{i['rtt_ms']:.0f} ms",
                         "file": "no" if on_disk is None else human_bytes(on_disk),
                         "part": p.get("part"), "why": p.get("reason")})
        lines += section("NODES", rows, EXPLAIN_NODE_COLUMNS)
        lines += section("HOOKS", _hook_rows(e.get("hooks") or []), HOOK_COLUMNS,
                         empty="(no hook asked)")
    r = d.get("routing") or {}
    lines += ["", f"ROUTING (a request from client {r.get('client_id') or '-'})"]
    for n, h in enumerate(r.get("order") or [], 1):
        if isinstance(h, dict):
            mark = " (this node)" if h.get("local") else ""
            mark += " (its tunnel failed lately)" if h.get("suspect") else ""
            lines.append(f"  {n}. {node_label(h.get('node_id'), h.get('name'))}{mark}")
    lines.append(f"  {r.get('answer') or '-'}")
    for h in _hook_rows(r.get("hooks") or []):
        lines.append(f"  {h['hook']}: answered by {h['by']} (asked: {h['asked']}): {h['answer']}")
    return lines


# -- commands ------------------------------------------------------------------
# Each returns (method, endpoint, body, formatter for the human output).

Formatter = Callable[[Any, argparse.Namespace], list[str]]
Command = tuple[str, str, dict[str, Any] | None, Formatter]


def cmd_status(a: argparse.Namespace) -> Command:
    return "GET", "/status", None, lambda d, a: format_status(d)


def cmd_peers(a: argparse.Namespace) -> Command:
    def fmt(d, a):
        peers = d.get("peers", d) if isinstance(d, dict) else d
        return table(peers, PEER_COLUMNS) if peers else ["no peers"]

    return "GET", "/peers", None, fmt


def cmd_models(a: argparse.Namespace) -> Command:
    return "GET", "/models?catalog=1" if a.catalog else "/models", None, lambda d, a: generic(d)


def cmd_gpus(a: argparse.Namespace) -> Command:
    return "GET", "/gpus", None, lambda d, a: generic(d) if d else ["no GPUs reported"]


def cmd_token(a: argparse.Namespace) -> Command:
    if a.revoke:
        if a.ttl is not None or a.once:
            raise Fail("token --revoke takes no --ttl or --once", EXIT_USAGE)
        return "POST", "/token/revoke", {"id": a.revoke}, lambda d, a: [f"revoked token {a.revoke}"]

    def fmt(d, a):
        expires = d.get("expires_at")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
            + f" (in {human_duration(expires - time.time())})"
            if isinstance(expires, int | float)
            else "-"
        )
        once = " (one use)" if a.once else ""
        # the token is the last line, so `meshctl token | tail -1` is the token
        return [f"token id  {d.get('id', '-')}{once}", f"expires   {when}", d["token"]]

    body: dict[str, Any] = {"once": bool(a.once)}
    if a.ttl is not None:
        body["ttl_s"] = a.ttl
    return "POST", "/token", body, fmt


def cmd_join(a: argparse.Namespace) -> Command:
    return "POST", "/join", {"token": a.token}, lambda d, a: generic(d) or ["joined"]


def cmd_leave(a: argparse.Namespace) -> Command:
    return "POST", "/leave", None, lambda d, a: ["meshd left the mesh and is stopping"]


def cmd_drop(a: argparse.Namespace) -> Command:
    return (
        "POST",
        "/drop",
        {"model": a.model},
        lambda d, a: generic(d) if d != {"ok": True} else [f"dropped {a.model}"],
    )


def cmd_serve(a: argparse.Namespace) -> Command:
    def fmt(d: Any, a: argparse.Namespace) -> list[str]:
        if not isinstance(d, dict) or "serving" not in d:
            return generic(d)
        was = "the drop is lifted" if d.get("was_dropped") else "it was not dropped"
        return [f"serving {d['serving']} mesh-wide again: {was}; told {d.get('told_peers', 0)} "
                f"peer(s) (decision version {d.get('version')})"]

    return "POST", "/serve", {"model": a.model}, fmt


def cmd_download(a: argparse.Namespace) -> Command:
    return "POST", "/download", {"name": a.name}, lambda d, a: generic(d)


def reload_lines(d: Any) -> list[str]:
    """``meshctl reload``: what was applied, what needs a restart, the plugins' order."""
    if not isinstance(d, dict) or "applied" not in d:  # an older meshd: it only rescanned
        return generic(d) if d != {"ok": True} else ["reloaded"]
    lines = [f"reloaded {d['reloaded']}"]
    if not d["applied"] and not d["restart_needed"]:
        lines.append("no setting changed")
    lines += [f"applied: {c['key']} {c['change']}" for c in d["applied"]]
    lines += [f"needs a restart: {c['key']} {c['change']} (systemctl restart meshd)"
              for c in d["restart_needed"]]
    lines += [f"note: {n}" for n in d.get("notes", [])]
    if d.get("plugins"):
        lines.append("policy plugins, asked in this order:")
        lines += [f"  {i}. {p}" for i, p in enumerate(d["plugins"], 1)]
    return lines


def cmd_explain(a: argparse.Namespace) -> Command:
    from urllib.parse import urlencode

    query = {"model": a.model, **({"client": a.client} if a.client else {})}
    return "GET", f"/explain?{urlencode(query)}", None, lambda d, a: format_explain(d)


def cmd_reload(a: argparse.Namespace) -> Command:
    return "POST", "/reload", None, lambda d, a: reload_lines(d)


SLOW = {"join", "leave", "download", "reload"}


def _ttl(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshctl",
        description="Control the meshd daemon on this machine through its control socket.",
        epilog=(
            f"The socket is --socket, else [node] control_socket of --config, of ${CONFIG_ENV}, "
            f"or of {DEFAULT_CONFIG}, else {DEFAULT_SOCKET}. It is mode 0660 root:meshd: run as "
            "root or as a member of the meshd group. Exit status: 0 done, 1 meshd could not be "
            "reached or failed, 2 bad usage, 3 meshd refused or does not support the command."
        ),
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the control socket to talk to")
    where.add_argument(
        "--config", metavar="PATH", help="take the socket from this meshd config file"
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        help=f"how long to wait for meshd's answer (default {DEFAULT_TIMEOUT_S:g}, "
        f"{SLOW_TIMEOUT_S:g} for join, leave, download and reload)",
    )
    json_help = "print meshd's answer as JSON, for scripts"
    p.add_argument("--json", action="store_true", help=json_help)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
        c.set_defaults(func=func)
        return c

    command("status", cmd_status, "this node, its peers, models, passive counts and downloads")
    command("peers", cmd_peers, "the peer table")
    c = command("models", cmd_models, "models in the mesh and on this node's disk")
    c.add_argument(
        "--catalog", action="store_true", help="also list the catalog, with what is on disk"
    )
    c = command(
        "token",
        cmd_token,
        "print an invite token for this mesh (the token is the last line), or revoke one",
    )
    c.add_argument(
        "--ttl", metavar="D", type=_ttl, help="valid for D: seconds, or 30m, 24h, 7d (default 24h)"
    )
    c.add_argument("--once", action="store_true", help="the token works for one join only")
    c.add_argument("--revoke", metavar="ID", help="revoke the token with this id instead")
    c = command("join", cmd_join, "join the mesh this invite token names, now")
    c.add_argument("token", metavar="TOKEN")
    command("leave", cmd_leave, "leave the mesh cleanly and stop the daemon")
    c = command("drop", cmd_drop, "stop serving MODEL everywhere in the mesh, until `serve`")
    c.add_argument("model", metavar="MODEL")
    c = command("serve", cmd_serve,
                "serve MODEL again everywhere in the mesh: lift its drop (the opposite of drop)")
    c.add_argument("model", metavar="MODEL")
    c = command(
        "download", cmd_download, "download a model by catalog name (refused when it would not fit)"
    )
    c.add_argument("name", metavar="NAME")
    command("gpus", cmd_gpus, "what VRAM detection found")
    c = command("explain", cmd_explain,
                "why MODEL is where it is: the last election's inputs, which plugin answered "
                "each hook, why each node was left out, and the hosts a request would try")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--client", metavar="ID",
                   help="the client whose host order to show: a request's 'user' field, else "
                        "its IP address (default 127.0.0.1)")
    command("reload", cmd_reload, "read the configuration again and apply what can be applied "
            "live (log level, policy plugins, [api] api_key, [models] serve); answers once "
            "applied, or exits 3 with why when the file is broken (nothing changes)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        method, endpoint, body, fmt = args.func(args)
        path = find_socket(args.socket, args.config)
        timeout_s = args.timeout or (SLOW_TIMEOUT_S if args.command in SLOW else DEFAULT_TIMEOUT_S)
        data = request(path, method, endpoint, body, timeout_s=timeout_s)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            try:
                lines = fmt(data, args)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                # an answer of a shape this meshctl does not know: still usable with --json
                raise Fail(
                    f"cannot show meshd's answer ({e}); try --json", EXIT_UNREACHABLE
                ) from None
            for line in lines:
                print(line)
    except Fail as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `meshctl status | head` closed the pipe: not an error worth a word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
