"""Live reload: read the configuration again and apply what can be applied without a restart.

``systemctl reload meshd`` (the unit's ``ExecReload=`` is a ``meshctl reload``
that returns once the reload is done), ``meshctl reload`` and SIGHUP all end in
:meth:`Reloader.reload`, which:

1. refuses while the daemon is still starting or already stopping;
2. tells systemd ``RELOADING=1`` with ``MONOTONIC_USEC`` (the reload protocol of
   ``Type=notify``; systemd 252 ignores the field, newer ones match the reload by it);
3. reads the file again (the command-line flags still win over it) and validates it
   as ``meshd --check-config`` does: the schema, the ``[models] serve`` entries, the
   join tokens, and every policy plugin, drop-in files imported afresh.  Any problem
   and nothing changes: the answer (``meshctl`` exit 3, a failed ``systemctl
   reload``) and the log say why;
4. compares it with the running configuration key by key (:func:`changes`): the keys
   of :data:`LIVE_KEYS` are applied, every other change is logged as needing a
   restart, naming the key, and the running value stays;
5. applies: ``[log] level`` and ``format``; the policy plugins and their settings
   (entry-point and module plugins keep the code imported at start: a new version
   of one needs a restart, and the log says so); ``[api] api_key`` for the next
   request; ``[models] serve`` (this node's model started or stopped through the
   election, the others announced as wanted);
6. ``READY=1``, with the node's status line.

Connections are never touched: a stream in flight, a tunnel, a peer link and a
llama-server that keeps its model all run on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from meshd import config as configmod
from meshd.config import Config
from meshd.errors import Refused

if TYPE_CHECKING:
    from meshd.daemon.node import Node
    from meshd.daemon.sdnotify import Notifier
    from meshd.models.scan import Resolved
    from meshd.placement.plugins import PolicyManager

log = logging.getLogger("meshd.daemon.reload")

# (section, key) applied by a reload; every other key needs a restart
LIVE_KEYS = frozenset(
    {
        ("log", "level"),
        ("log", "format"),
        ("api", "api_key"),
        ("models", "serve"),
        ("policy", "plugins"),
        ("policy", "disable"),
        ("policy", "plugins_dir"),
        ("policy", "slow_hook_ms"),
        ("policy", "settings"),
    }
)
# never written into a log line or an answer
SECRET_KEYS = frozenset({("api", "api_key"), ("mesh", "join")})
RESTART_HINT = "systemctl restart meshd"


class Effect(StrEnum):
    APPLIED = "applied"
    RESTART = "needs a restart"


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the running configuration and the file."""

    key: str  # "[log] level", "[policy.pinned]"
    effect: Effect
    change: str  # "info -> debug"; "changed" for a secret

    @property
    def line(self) -> str:
        """``[log] level 'info' -> 'debug'``, ``[api] api_key changed``."""
        return f"{self.key} {self.change}"

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "change": self.change}


def changes(old: Config, new: Config) -> list[Change]:
    """Every key that differs, in the order of the schema; ``[policy.<name>]`` tables one each."""
    out: list[Change] = []
    for section in configmod.SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(before):
            a, b = getattr(before, f.name), getattr(after, f.name)
            if a == b:
                continue
            if (section, f.name) == ("policy", "settings"):
                for name in sorted(set(a) | set(b)):
                    if a.get(name) != b.get(name):
                        what = (
                            "added" if name not in a else "removed" if name not in b else "changed"
                        )
                        out.append(Change(f"[policy.{name}]", Effect.APPLIED, what))
                continue
            live = (section, f.name) in LIVE_KEYS
            shown = (
                _secret_change(a, b)
                if (section, f.name) in SECRET_KEYS
                else (f"{_shown(a)} -> {_shown(b)}")
            )
            out.append(
                Change(f"[{section}] {f.name}", Effect.APPLIED if live else Effect.RESTART, shown)
            )
    return out


def running_config(old: Config, new: Config) -> Config:
    """What the daemon runs with after a reload: ``old`` with the live keys of ``new``
    (a key that needs a restart keeps its running value until the restart)."""
    config = dataclasses.replace(old, path=new.path)
    for section in configmod.SECTIONS:
        live = {key: getattr(getattr(new, section), key) for (s, key) in LIVE_KEYS if s == section}
        if live:
            config = config.replace(section, **live)
    return config


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _secret_change(old: Any, new: Any) -> str:
    if not old:
        return "set"
    return "removed" if not new else "changed"


class KeyHolder(Protocol):
    """What checks ``[api] api_key`` (the API, the console's chat proxy)."""

    def use_api_key(self, key: str) -> None: ...


class Backends(Protocol):
    """What the reload needs of this node's llama-servers (``meshd.daemon.backends``)."""

    def serve(self, name: str, path: str, size_bytes: int) -> None: ...

    def stop_split_or_solo(self, name: str, *, kill: bool = False) -> Any: ...


def _default_policy_loader(config: Config) -> tuple[PolicyManager, list[str]]:
    from meshd.placement import plugins

    return plugins.load_checked(config)


def _default_checks(config: Config) -> list[str]:
    from meshd.daemon import service

    return service.model_problems(config) + service.join_token_problems(config)


class Reloader:
    """The daemon's reload, built by ``meshd.daemon.service.create_daemon``.

    ``config`` is the running configuration (what the last start or reload
    applied); ``reread()`` reads the file again with the command-line flags on
    top, raising ``ConfigError``.  ``not_now()`` says why a reload cannot run now
    (starting, stopping) or None.  ``fetch(resolved)`` downloads a model that is
    not on disk and then serves it (the start-up's own path).  The seams
    (``checks``, ``load_policy``, ``apply_log``) are the real ones by default.
    """

    def __init__(
        self,
        config: Config,
        *,
        node: Node,
        notifier: Notifier,
        reread: Callable[[], Config],
        key_holders: Sequence[KeyHolder] = (),
        backends: Backends | None = None,
        first: str | None = None,
        fetch: Callable[[Resolved], Any] | None = None,
        not_now: Callable[[], str | None] = lambda: None,
        on_applied: Callable[[Config], None] = lambda config: None,
        checks: Callable[[Config], list[str]] = _default_checks,
        load_policy: Callable[[Config], tuple[PolicyManager, list[str]]] = _default_policy_loader,
        apply_log: Callable[[str, str], None] | None = None,
    ):
        self.config = config
        self.node = node
        self.notifier = notifier
        self.reread = reread
        self.key_holders = list(key_holders)
        self.backends = backends
        # the model [models] serve names first, which this node serves itself
        self.first = first
        self.fetch = fetch
        self.not_now = not_now
        self.on_applied = on_applied
        self.checks = checks
        self.load_policy = load_policy
        if apply_log is None:
            from meshd import logs

            apply_log = logs.apply
        self.apply_log = apply_log
        self.reloads = 0  # applied reloads, for tests and status

    @property
    def where(self) -> str:
        return self.config.path or configmod.default_path()

    def reload(self) -> dict[str, Any]:
        """Read, validate and apply the configuration; the answer says what changed.

        Raises ``Refused`` (nothing changed) with every problem on one line."""
        why = self.not_now()
        if why is not None:
            log.warning("reload refused: %s", why)
            raise Refused(why)
        began = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.reloading(f"reloading {self.where}", monotonic_usec=began)
        status = None
        try:
            answer = self._reload()
        except Refused:
            status = (
                f"last reload refused, nothing changed (journalctl -u meshd says why); "
                f"{self.node.status_line()}"
            )
            raise
        finally:
            # a reload always ends with READY=1: systemd must not stay in "reloading"
            self.notifier.ready(status or self.node.status_line())
        return answer

    def _reload(self) -> dict[str, Any]:
        log.info("reloading %s", self.where)
        try:
            new = self.reread()
        except configmod.ConfigError as e:
            self._refuse(e.problems)
        problems = self.checks(new)
        policy, plugin_problems = self.load_policy(new)
        problems += plugin_problems
        if problems:
            self._refuse(problems)
        found = changes(self.config, new)
        old = self.config
        self.config = running_config(old, new)
        for c in found:
            if c.effect == Effect.RESTART:
                log.warning(
                    "reload: %s: needs a restart (%s); running with the old value until then",
                    c.line,
                    RESTART_HINT,
                )
            else:
                log.info("reload: %s: applied", c.line)
        notes: list[str] = []
        self._apply_log(old, new)
        self._use_policy(policy, notes)
        if new.api.api_key != old.api.api_key:
            for holder in self.key_holders:
                holder.use_api_key(new.api.api_key)
        self.node.config = self.config
        self.node.rescan()
        if new.models.serve != old.models.serve:
            notes += self._serve(new.models.serve)
        self.on_applied(self.config)
        self.reloads += 1
        for note in notes:
            log.info("reload: %s", note)
        applied = [c.to_dict() for c in found if c.effect == Effect.APPLIED]
        restart = [c.to_dict() for c in found if c.effect == Effect.RESTART]
        log.info(
            "reloaded %s: %d change(s) applied, %d needing a restart%s",
            self.where,
            len(applied),
            len(restart),
            f" ({RESTART_HINT})" if restart else "",
        )
        scan = self.node.scan
        return {
            "reloaded": self.where,
            "applied": applied,
            "restart_needed": restart,
            "plugins": policy.summary(),
            "notes": notes,
            "models_on_disk": len(scan.models) if scan is not None else 0,
        }

    def _refuse(self, problems: list[str]) -> Any:
        for problem in problems:
            log.error("reload refused, nothing changed: %s", problem)
        raise Refused(
            f"{self.where} not reloaded, nothing changed: "
            + "; ".join(p.removeprefix(f"{self.where}: ") for p in problems)
        )

    # -- what is applied ------------------------------------------------------------

    def _apply_log(self, old: Config, new: Config) -> None:
        if (old.log.level, old.log.format) != (new.log.level, new.log.format):
            self.apply_log(new.log.level, new.log.format)
            log.debug("reload: logging at %s now", new.log.level)

    def _use_policy(self, policy: PolicyManager, notes: list[str]) -> None:
        """The new plugins from the next hook call on; the election asks them at once."""
        node = self.node
        node.policy = policy
        passive = node.passive
        if passive is not None:  # a client or standby asks them for routing and promotion
            passive.policy = policy
            passive.router.policy = policy
        log.info("reload: policy plugins, asked in this order: %s", "; ".join(policy.summary()))
        for p in policy.ordered():
            if p.origin.startswith(("entry point ", "module ")):
                notes.append(
                    f"plugin {p.name} ({p.origin}): settings read again, code as "
                    f"imported at start: a new version of it needs a restart "
                    f"({RESTART_HINT})"
                )
        if node.router is not None:
            node.router.invalidate()
        rebalancer = node.rebalancer
        if rebalancer is not None and rebalancer.target is not None:
            rebalancer.evaluate("policy plugins reloaded")

    def _serve(self, entries: list[str]) -> list[str]:
        """``[models] serve`` changed: the first entry is this node's model (started through
        the election, downloaded first when it is not on disk), the others are announced
        as models the mesh should serve."""
        from meshd.models import scan as modelsmod
        from meshd.models.catalog import load_catalog

        node = self.node
        if node.roles.passive:
            return [
                f"[models] serve: not used by a {node.role} node (serves nothing of "
                "its own); the running value is kept for a restart as an active node"
            ]
        scan = node.scan if node.scan is not None else modelsmod.ScanResult()
        try:  # checked before the reload, but the disk may have changed since
            resolved = [modelsmod.resolve(e, scan, load_catalog()) for e in entries]
        except modelsmod.ModelError as e:
            return [f"[models] serve: {e}; this node's models are unchanged"]
        notes: list[str] = []
        node.wanted = [r.name for r in resolved[1:]]
        first = resolved[0] if resolved else None
        name = first.name if first is not None else None
        if name != self.first:
            notes += self._serve_first(first)
        if node.wanted:
            notes.append(f"models wanted from the mesh: {', '.join(node.wanted)}")
        if node.mesh is not None:
            node.mesh.local_changed()
        node.status_changed()
        return notes

    def _serve_first(self, first: Resolved | None) -> list[str]:
        node, rebalancer, backends = self.node, self.node.rebalancer, self.backends
        name = first.name if first is not None else None
        old, self.first = self.first, name
        notes = []
        current = (
            rebalancer.target if rebalancer is not None else (old if old in node.served else None)
        )
        # another model this node was assigned gives way to one the file names; with
        # none named, only the one the file named before stops
        if current is not None and current != name and (name is not None or current == old):
            notes.append(
                f"stopped serving {current}: [models] serve names "
                f"{name if name is not None else 'no model'} first now"
            )
            if rebalancer is not None:
                rebalancer.forget(current)
            elif backends is not None:
                backends.stop_split_or_solo(current)
        if first is None:
            if rebalancer is not None:
                rebalancer.on_event()  # idle now: the mesh may have a model for it
            return notes
        if first.name in node.dropped:
            notes.append(f"not serving {first.name}: it was dropped mesh-wide (meshctl drop)")
            return notes
        if current == first.name:
            return notes
        if first.path is None:
            notes.append(f"serving {first.name}: not on disk, downloading it first")
            if self.fetch is not None:
                self.fetch(first)
        elif backends is not None:
            notes.append(f"serving {first.name} ({first.path})")
            backends.serve(first.name, str(first.path), first.size_bytes or 0)
        return notes
