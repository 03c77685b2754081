"""Loading placement plugins, and calling them so that none can hurt the daemon.

Where plugins come from, in the order they are asked (first answer wins):

1. ``[policy] plugins`` in ``/etc/meshd.toml``, in the order listed: module
   names importable on ``sys.path`` (``mycompany.meshd_policy``), bare names
   of the shipped examples (``least_loaded``), file paths and globs
   (``/srv/meshd/*.py``);
2. every ``*.py`` in ``/etc/meshd/plugins.d/`` (when the directory exists),
   by file name;
3. the ``meshd.policies`` entry-point group of installed packages;
4. ``default`` (``meshd.placement.default``), always last, even behind an
   operator's ``@hookimpl(trylast=True)`` (see :meth:`PolicyManager._keep_default_last`).

Only functions carrying the ``meshd`` hookimpl marker are hooks; a ``meshd_``
function without it is refused, so a forgotten marker is not a plugin that
silently does nothing.

A plugin's name is its file's stem, the last part of its module name, or its
entry-point name; ``[policy.<name>]`` holds its settings and ``[policy]
disable`` takes out a whole plugin (``"pinned"``, not even imported) or one
hook of one plugin (``"default:select_host"``; the ``meshd_`` prefix is
optional).

Each hook function is registered wrapped (see :meth:`PolicyManager._guard`):
the wrapper hands the plugin its own settings, times the call, and turns an
exception or an invalid answer into ``None`` with one log line naming the
plugin, so pluggy moves on to the next plugin and in the end to the default
(or, for the hooks of ``hookspecs.FAIL_CLOSED``, into their refusal).
"""

from __future__ import annotations

import difflib
import functools
import glob
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pluggy
from pluggy import HookImpl

from meshd.config import Config
from meshd.placement import hookspecs
from meshd.placement.snapshot import freeze

log = logging.getLogger("meshd.policy")

DEFAULT_PLUGINS_DIR = "/etc/meshd/plugins.d"
ENTRY_POINT_GROUP = "meshd.policies"
TRACE_ENV = "MESHD_TRACE_HOOKS"
DEFAULT_PLUGIN = "default"
# a hook call longer than this is reported (hooks are synchronous: they stall the reactor)
SLOW_CALL_S = 0.05
# the same complaint about the same plugin and hook at most this often
REPORT_EVERY_S = 60.0

_EMPTY: Mapping[str, Any] = freeze({})
# how a plugin marks its hooks, for messages
MARKER_HINT = 'hookimpl = pluggy.HookimplMarker("meshd")'
_SOURCE_CHECKOUT_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def example_dirs() -> list[str]:
    """Where bare plugin names (``least_loaded``) are looked up when not importable."""
    dirs = []
    if (_SOURCE_CHECKOUT_PLUGINS.parent / "setup.cfg").exists():
        dirs.append(str(_SOURCE_CHECKOUT_PLUGINS))
    dirs.append("/usr/share/meshd/plugins")
    return dirs


class PluginError(Exception):
    """Plugins that cannot be used; ``problems`` has one line for each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class LoadedPlugin:
    """One registered plugin, for status and ``--check-config``."""

    name: str
    # where it came from: a file path, "module x.y", "entry point n = x.y"
    origin: str
    obj: object
    hooks: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    # meshd_configure, unwrapped, when the plugin has one
    configure: Callable[..., Any] | None = None
    # hooks marked @hookimpl(tryfirst=True) / (trylast=True)
    tryfirst: tuple[str, ...] = ()
    trylast: tuple[str, ...] = ()


class _Limiter:
    """Lets one log line per key through every ``every_s``, counting the rest."""

    def __init__(self, clock: Callable[[], float], every_s: float):
        self._clock = clock
        self._every_s = every_s
        self._next: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}

    def allow(self, key: Any) -> int | None:
        """None: stay quiet; else how many were suppressed since the last line."""
        now = self._clock()
        if now < self._next.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next[key] = now + self._every_s
        return self._suppressed.pop(key, 0)


class PolicyManager:
    """The pluggy manager for the ``meshd`` project, plus isolation and timing.

    ``timer`` measures hook calls and ``clock`` paces repeated warnings; both
    are parameters so tests control time instead of sleeping.
    """

    def __init__(
        self,
        *,
        slow_call_s: float = SLOW_CALL_S,
        report_every_s: float = REPORT_EVERY_S,
        timer: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.monotonic,
        trace: bool | None = None,
    ):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, LoadedPlugin] = {}
        self.slow_call_s = slow_call_s
        self._timer = timer
        self._limiter = _Limiter(clock, report_every_s)
        # the plugin whose answer the last call returned (the reactor is one thread)
        self.last_answer: str | None = None
        self._specs = {
            name: inspect.signature(getattr(hookspecs, name)) for name in hookspecs.hook_names()
        }
        if trace is None:
            trace = os.environ.get(TRACE_ENV, "").lower() in ("1", "true", "yes", "on")
        if trace:
            self.pm.add_hookcall_monitoring(self._trace_before, self._trace_after)

    # -- registering ------------------------------------------------------------

    def add(
        self,
        obj: object,
        name: str,
        *,
        origin: str = "",
        settings: Mapping[str, Any] | None = None,
        disabled_hooks: Iterable[str] = (),
    ) -> list[str]:
        """Register ``obj``'s hook functions under ``name``; return the problems found.

        Nothing is registered when there is a problem, so a half-broken
        plugin never takes part.
        """
        origin = origin or _origin_of(obj)
        label = f"plugin {name} ({origin})"
        if name in self.plugins:
            return [f"{label}: the name {name!r} is already used by {self.plugins[name].origin}"]
        disabled = {_hook_name(h) for h in disabled_hooks}
        settings = freeze(dict(settings or {}))
        problems: list[str] = []
        proxy = types.SimpleNamespace()
        hooks: list[str] = []
        tryfirst: set[str] = set()
        trylast: set[str] = set()
        configure = None
        found = _hook_functions(self.pm, obj)
        if not found:
            problems.append(f"{label}: defines no hooks (functions marked @hookimpl, where {MARKER_HINT})")
        for attr, fn, opts in found:
            marked = opts is not None
            opts = opts or {}
            hook = opts.get("specname") or attr
            where = _where(fn)
            if hook not in self._specs:
                if opts.get("optionalhook"):
                    continue
                close = difflib.get_close_matches(hook, list(self._specs), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{where}: {label}: {hook} matches no meshd hook{hint}")
                continue
            if not marked:
                # pluggy would ignore it; meshd says so rather than let the plugin do nothing
                problems.append(
                    f"{where}: {label}: {hook} is not marked as a hook, so it would never be "
                    f"called: put @hookimpl above it ({MARKER_HINT})"
                )
                continue
            if opts.get("hookwrapper") or opts.get("wrapper"):
                problems.append(
                    f"{where}: {label}: {hook} is a hook wrapper; placement hooks take "
                    "plain functions (return None to let the next plugin decide)"
                )
                continue
            if hook in disabled:
                continue
            spec_args = tuple(self._specs[hook].parameters)
            try:
                args = _positional_args(fn)
            except ValueError as e:
                problems.append(f"{where}: {label}: {hook}{_signature_text(fn)}: {e}")
                continue
            unknown = [a for a in args if a not in spec_args]
            if unknown:
                problems.append(
                    f"{where}: {label}: {hook}({', '.join(args)}): "
                    f"{', '.join(repr(a) for a in unknown)} not among the hook's arguments "
                    f"({', '.join(spec_args)})"
                )
                continue
            if hook in hooks:
                problems.append(f"{where}: {label}: {hook} is implemented twice")
                continue
            hooks.append(hook)
            if name == DEFAULT_PLUGIN:
                opts = {**opts, "tryfirst": False, "trylast": True}  # asked after every plugin
            if opts.get("tryfirst"):
                tryfirst.add(hook)
            if opts.get("trylast"):
                trylast.add(hook)
            if hook == "meshd_configure":
                # called directly, once, with this plugin's settings (see configure())
                configure = fn
                continue
            setattr(proxy, hook, self._guard(name, hook, fn, args, spec_args, settings, opts))
        unknown_disabled = sorted(disabled - set(self._specs))
        for hook in unknown_disabled:
            problems.append(f"[policy] disable: {name}:{hook}: {hook} is not a meshd hook")
        if problems:
            return problems
        try:
            self.pm.register(proxy, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            return [f"{label}: {e}"]
        self.plugins[name] = LoadedPlugin(
            name=name,
            origin=origin,
            obj=obj,
            hooks=tuple(h for h in hooks),
            disabled=tuple(sorted(disabled & set(self._specs))),
            settings=settings,
            configure=configure,
            tryfirst=tuple(h for h in hooks if h in tryfirst),
            trylast=tuple(h for h in hooks if h in trylast),
        )
        if name != DEFAULT_PLUGIN and trylast:
            self._keep_default_last()
        return []

    def _keep_default_last(self) -> None:
        """Put the default back behind a plugin that registered ``trylast`` hooks.

        pluggy asks ``trylast`` implementations last, the last registered of
        them last of all.  Every hook of the default is ``trylast``, so
        registering it again puts it behind every other ``trylast`` one (an
        operator's ``@hookimpl(trylast=True)`` means "after the other
        plugins", never "after the default"), and changes nothing else.
        """
        proxy = self.pm.get_plugin(DEFAULT_PLUGIN)
        if proxy is None:
            return
        self.pm.unregister(name=DEFAULT_PLUGIN)
        self.pm.register(proxy, name=DEFAULT_PLUGIN)

    def hook_order(self, hook: str) -> list[str]:
        """The plugins that answer ``hook``, the one asked first first (as pluggy calls them)."""
        caller = getattr(self.pm.hook, hook, None)
        if caller is None:
            return []
        return [impl.plugin_name for impl in reversed(caller.get_hookimpls())]

    def check_pending(self) -> list[str]:
        """pluggy's own check that every registered hookimpl has a spec."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            return [f"plugin {e.plugin}: {e}"]
        return []

    def configure(self) -> list[str]:
        """Hand each plugin its settings through ``meshd_configure``; collect rejections."""
        problems = []
        for p in self.plugins.values():
            if p.configure is None:
                continue
            try:
                args = _positional_args(p.configure)
                p.configure(*[p.settings for _ in args])
            except Exception as e:  # a plugin's rejection, or its bug: both are one line
                msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                problems.append(f"[policy.{p.name}] {msg} (plugin {p.name}, {p.origin})")
        return problems

    def summary(self) -> list[str]:
        """One line per plugin, in the order they are asked (``(tryfirst)`` / ``(trylast)``
        mark a hook asked before / after the other plugins' same hook)."""
        lines = []
        for p in self.ordered():
            hooks = ", ".join(_hook_label(h, p) for h in p.hooks) or "none"
            extra = f"; disabled: {', '.join(h.removeprefix('meshd_') for h in p.disabled)}" if p.disabled else ""
            lines.append(f"{p.name} ({p.origin}): {hooks}{extra}")
        return lines

    def ordered(self) -> list[LoadedPlugin]:
        """Registered plugins, the one asked first first (pluggy calls the last registered
        first), the default last whenever it was registered."""
        names = [n for n in reversed(list(self.plugins)) if n != DEFAULT_PLUGIN]
        if DEFAULT_PLUGIN in self.plugins:
            names.append(DEFAULT_PLUGIN)
        return [self.plugins[n] for n in names]

    # -- calling ----------------------------------------------------------------

    def call(self, hook: str, **kwargs: Any) -> tuple[Any, str | None]:
        """Ask the plugins; return the first valid answer and who gave it.

        ``(None, None)`` when no plugin answered.  Never raises for a plugin's
        sake: every hook function is guarded.
        """
        self.last_answer = None
        try:
            result = getattr(self.pm.hook, hook)(settings=_EMPTY, **kwargs)
        except Exception as e:  # pragma: no cover - the guards catch plugin errors
            log.error("policy hook %s could not be called: %s: %s", hook, type(e).__name__, e)
            return None, None
        return result, (self.last_answer if result is not None else None)

    def _guard(
        self,
        plugin: str,
        hook: str,
        fn: Callable[..., Any],
        args: tuple[str, ...],
        spec_args: tuple[str, ...],
        settings: Mapping[str, Any],
        opts: Mapping[str, Any],
    ) -> Callable[..., Any]:
        """``fn`` wrapped to take all the hook's arguments and never raise.

        pluggy passes the wrapper every argument of the spec (it wraps the
        spec's function); it picks the ones ``fn`` asked for, puts this plugin's own
        settings in place of ``settings``, times the call, and checks the
        answer with ``hookspecs.RESULT_CHECKS``.
        """
        picks = tuple(None if a == "settings" else spec_args.index(a) for a in args)
        check = hookspecs.RESULT_CHECKS.get(hook)
        closed = hookspecs.FAIL_CLOSED.get(hook)
        then = closed.consequence if closed is not None else "using the next plugin's answer"
        timer = self._timer
        slow_s = self.slow_call_s

        def failed(why: str) -> Any:
            if closed is None:
                return None  # the next plugin, in the end the default, decides
            self.last_answer = plugin
            return closed.answer(why)

        def inner(call_args: tuple[Any, ...]) -> Any:
            mine = [settings if i is None else call_args[i] for i in picks]
            start = timer()
            try:
                result = fn(*mine)
            except Exception as e:
                where = self._report_failure(plugin, hook, fn, e, then)
                return failed(f"{type(e).__name__}: {e}, {where}")
            finally:
                elapsed = timer() - start
                if elapsed > slow_s:
                    self._report_slow(plugin, hook, elapsed)
            if result is None:
                return None
            if check is not None:
                problem = check(result, dict(zip(spec_args, call_args, strict=True)))
                if problem is not None:
                    self._report(
                        plugin, hook, "invalid",
                        "plugin %s: %s returned an invalid answer: %s; %s",
                        plugin, hook, problem, then,
                    )
                    return failed(f"an invalid answer: {problem}")
            self.last_answer = plugin
            return result

        # pluggy reads which arguments an implementation takes from the code
        # of ``inspect.unwrap(function)``; wrapping the hookspec's own function
        # makes it pass this guard every argument of the spec, in the spec's
        # order, without the guard having to spell the parameters out.
        @functools.wraps(getattr(hookspecs, hook))
        def guarded(*call_args: Any) -> Any:
            return inner(call_args)

        guarded.__qualname__ = f"{plugin}.{hook}"
        return hookspecs.hookimpl(
            tryfirst=bool(opts.get("tryfirst")), trylast=bool(opts.get("trylast"))
        )(guarded)

    def _report(self, plugin: str, hook: str, kind: str, msg: str, *args: Any) -> None:
        suppressed = self._limiter.allow((plugin, hook, kind))
        if suppressed is None:
            return
        if suppressed:
            msg += f" ({suppressed} more since the last report)"
        log.warning(msg, *args)

    def _report_failure(
        self, plugin: str, hook: str, fn: Callable[..., Any], e: Exception, then: str
    ) -> str:
        """Log the failure (rate-limited); return where in the plugin it happened."""
        where = _error_location(e, fn)
        self._report(
            plugin, hook, "error",
            "plugin %s: %s failed: %s: %s (%s); %s",
            plugin, hook, type(e).__name__, e, where, then,
        )
        log.debug("plugin %s: %s traceback", plugin, hook, exc_info=e)
        return where

    def _report_slow(self, plugin: str, hook: str, elapsed: float) -> None:
        self._report(
            plugin, hook, "slow",
            "plugin %s: %s took %.0f ms (hooks must return within %.0f ms; "
            "they run on the reactor thread and stall every request meanwhile)",
            plugin, hook, elapsed * 1000, self.slow_call_s * 1000,
        )

    def _trace_before(self, hook: str, impls: Sequence[HookImpl], kwargs: Mapping[str, Any]) -> None:
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k != "settings")
        order = ", ".join(i.plugin_name for i in reversed(impls))
        log.info("trace: %s(%s) asking %s", hook, args, order)

    def _trace_after(
        self, outcome: pluggy.Result[Any], hook: str, impls: Sequence[HookImpl], kwargs: Mapping[str, Any]
    ) -> None:
        if outcome.exception is not None:
            log.info("trace: %s raised %s", hook, outcome.exception)
            return
        result = outcome.get_result()
        by = self.last_answer if result is not None else "nobody"
        log.info("trace: %s -> %s (answered by %s)", hook, _short(result), by)


# -- loading --------------------------------------------------------------------


_FROM_CONFIG: Any = object()


def load(
    config: Config,
    *,
    plugins_dir: str | None = _FROM_CONFIG,
    search_dirs: Iterable[str] | None = None,
    entry_points: Iterable[Any] | None = None,
    **manager_options: Any,
) -> PolicyManager:
    """Load every plugin the configuration names; raise PluginError with every problem.

    ``plugins_dir``: the drop-in directory (None: none; default: ``[policy]
    plugins_dir``, ``/etc/meshd/plugins.d`` unless set; a directory other
    than that default that does not exist is a problem).
    ``search_dirs``: where bare names are looked up as ``<name>.py`` when not
    importable (default: :func:`example_dirs`).  ``entry_points``: objects
    with ``name``, ``value`` and ``load()`` (default: the installed
    ``meshd.policies`` group).  Other options go to :class:`PolicyManager`;
    ``slow_call_s`` defaults to ``[policy] slow_hook_ms``.
    """
    manager, problems = _load(config, plugins_dir=plugins_dir, search_dirs=search_dirs,
                              entry_points=entry_points, **manager_options)
    if problems:
        raise PluginError(problems)
    log.info("policy plugins, asked in this order: %s", "; ".join(manager.summary()))
    return manager


def load_checked(config: Config, **options: Any) -> tuple[PolicyManager, list[str]]:
    """The manager and every problem, neither raised nor logged: a reload
    (``meshd.daemon.reload``) uses the manager only when there is no problem at all.
    Drop-in files are imported afresh each time; modules and entry points come from
    ``sys.modules`` when they were imported before (their settings are read again)."""
    return _load(config, **options)


def check(config: Config, **options: Any) -> list[str]:
    """Every plugin problem as one line each, for ``meshd --check-config``."""
    return report(config, **options)[0]


def report(config: Config, **options: Any) -> tuple[list[str], list[str]]:
    """``(problems, order)`` for ``meshd --check-config``: every problem, one line each
    (none hides another), and one line per plugin that loaded, in the order asked."""
    manager, problems = _load(config, **options)
    return problems, manager.summary()


def _load(
    config: Config,
    *,
    plugins_dir: str | None = _FROM_CONFIG,
    search_dirs: Iterable[str] | None = None,
    entry_points: Iterable[Any] | None = None,
    **manager_options: Any,
) -> tuple[PolicyManager, list[str]]:
    """The manager with every plugin that loaded, and every problem found on the way."""
    policy = config.policy
    if plugins_dir is _FROM_CONFIG:
        plugins_dir = getattr(policy, "plugins_dir", DEFAULT_PLUGINS_DIR)
    slow_ms = getattr(policy, "slow_hook_ms", None)
    if slow_ms is not None:
        manager_options.setdefault("slow_call_s", slow_ms / 1000)
    manager = PolicyManager(**manager_options)
    problems: list[str] = []
    whole, per_hook, disable_problems = parse_disable(policy.disable)
    problems += disable_problems
    search = list(example_dirs() if search_dirs is None else search_dirs)

    # (name, origin, object), the one asked first first
    found: list[tuple[str, str, object]] = []
    seen_files: set[str] = set()
    # every name we tried, loaded or not: a settings table for a plugin that
    # failed to load is not reported a second time
    attempted: set[str] = set(whole)
    # every plugin name configured or found, disabled or not: what [policy] disable may name
    candidates: set[str] = {DEFAULT_PLUGIN}

    def add_file(path: str) -> None:
        real = os.path.realpath(path)
        if real in seen_files:
            return
        seen_files.add(real)
        name = Path(path).stem
        attempted.add(name)
        candidates.add(name)
        if name in whole:
            log.info("plugin %s (%s) disabled by [policy] disable", name, path)
            return
        try:
            found.append((name, path, _import_file(path, name)))
        except PluginError as e:
            problems.extend(e.problems)

    for entry in policy.plugins:
        if _looks_like_path(entry):
            pattern = os.path.expanduser(entry)
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    problems.append(f"[policy] plugins: {entry}: matches no file")
                for path in matches:
                    add_file(path)
            elif not os.path.isfile(pattern):
                problems.append(f"[policy] plugins: {entry}: no such file")
            else:
                add_file(pattern)
            continue
        name = entry.rpartition(".")[2]
        attempted.add(name)
        candidates.add(name)
        if name in whole:
            log.info("plugin %s disabled by [policy] disable", name)
            continue
        try:
            module = _import_module(entry, search)
        except PluginError as e:
            problems.extend(e.problems)
            continue
        if isinstance(module, str):  # found as a file in a search dir
            add_file(module)
        else:
            found.append((name, f"module {entry}", module))

    if plugins_dir and os.path.isdir(plugins_dir):
        for path in sorted(glob.glob(os.path.join(glob.escape(plugins_dir), "*.py"))):
            add_file(path)
    elif plugins_dir and os.path.exists(plugins_dir):
        problems.append(f"[policy] plugins_dir: {plugins_dir}: not a directory")
    elif plugins_dir and os.path.normpath(plugins_dir) != os.path.normpath(DEFAULT_PLUGINS_DIR):
        # the default may well not exist; a directory someone configured must
        problems.append(f"[policy] plugins_dir: {plugins_dir}: no such directory")

    # what pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP) does, one entry point
    # at a time, so a broken one is one problem naming it rather than an exception
    eps = entry_points
    if eps is None:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in eps:
        attempted.add(ep.name)
        candidates.add(ep.name)
        if ep.name in whole:
            log.info("plugin %s (entry point) disabled by [policy] disable", ep.name)
            continue
        origin = f"entry point {ep.name} = {getattr(ep, 'value', '?')}"
        try:
            found.append((ep.name, origin, ep.load()))
        except SyntaxError as e:
            problems.append(f"{e.filename}:{e.lineno}: plugin {ep.name} ({origin}): syntax error: {e.msg}")
        except (Exception, SystemExit) as e:
            problems.append(f"plugin {ep.name} ({origin}): cannot import: {type(e).__name__}: {e}")

    if DEFAULT_PLUGIN not in whole:
        from meshd.placement import default

        found.append((DEFAULT_PLUGIN, "built in, meshd.placement.default", default))

    # pluggy asks the last registered first: register the default first
    registered: dict[int, str] = {}
    for name, origin, obj in reversed(found):
        if id(obj) in registered:
            continue  # the same module named twice
        registered[id(obj)] = name
        problems += manager.add(
            obj, name, origin=origin,
            settings=policy.settings.get(name),
            disabled_hooks=per_hook.get(name, ()),
        )

    attempted.add(DEFAULT_PLUGIN)
    loaded = set(manager.plugins)
    for name in sorted(whole - candidates):
        problems.append(
            f"[policy] disable: {name!r}: no plugin of that name is configured or found "
            f"({_names(candidates - whole, 'known')})"
        )
    for name in sorted(per_hook):
        if name not in attempted:
            problems.append(f"[policy] disable: no plugin named {name!r} is loaded ({_names(loaded)})")
    for name in sorted(policy.settings):
        if name not in attempted:
            problems.append(f"[policy.{name}]: no plugin named {name!r} is loaded ({_names(loaded)})")
    problems += manager.check_pending()
    # the plugins that did load check their settings even when others failed, so one
    # --check-config run shows every problem, not the first kind only
    problems += manager.configure()
    return manager, problems


@lru_cache(maxsize=1)
def default_manager() -> PolicyManager:
    """A manager with only the default plugin, for callers not handed one."""
    manager = PolicyManager()
    from meshd.placement import default

    problems = manager.add(default, DEFAULT_PLUGIN, origin="built in, meshd.placement.default")
    assert not problems, problems  # the built-in plugin is tested to register cleanly
    return manager


def parse_disable(entries: Iterable[str]) -> tuple[set[str], dict[str, list[str]], list[str]]:
    """``[policy] disable`` into whole plugins and ``{plugin: [hook, ...]}``.

    ``"pinned"`` takes out a plugin; ``"default:select_host"`` (or
    ``"default:meshd_select_host"``) one hook of one plugin.
    """
    whole: set[str] = set()
    per_hook: dict[str, list[str]] = {}
    problems: list[str] = []
    for entry in entries:
        name, sep, hook = entry.partition(":")
        name, hook = name.strip(), hook.strip()
        if not name or (sep and not hook):
            problems.append(f"[policy] disable: {entry!r}: expected \"plugin\" or \"plugin:hook\"")
        elif sep:
            per_hook.setdefault(name, []).append(_hook_name(hook))
        else:
            whole.add(name)
    return whole, per_hook, problems


# -- helpers ----------------------------------------------------------------------


def _hook_label(hook: str, p: LoadedPlugin) -> str:
    short = hook.removeprefix("meshd_")
    if p.name == DEFAULT_PLUGIN:
        return short  # always last: nothing to say
    if hook in p.tryfirst:
        return f"{short} (tryfirst)"
    if hook in p.trylast:
        return f"{short} (trylast)"
    return short


def _hook_name(text: str) -> str:
    return text if text.startswith("meshd_") else "meshd_" + text


def _names(names: Iterable[str], what: str = "loaded") -> str:
    names = sorted(names)
    return f"{what}: " + ", ".join(names) if names else f"none {what}"


def _looks_like_path(entry: str) -> bool:
    return "/" in entry or entry.endswith(".py") or glob.has_magic(entry) or entry.startswith("~")


def _hook_functions(
    pm: pluggy.PluginManager, obj: object
) -> list[tuple[str, Callable[..., Any], Mapping[str, Any] | None]]:
    """``(attribute, function, hookimpl options)`` for each hook candidate of ``obj``.

    A hook is a function that carries the ``meshd`` hookimpl marker.  Functions
    whose name starts with ``meshd_`` are candidates too, marked or not
    (options ``None`` when not), so that a forgotten marker or a misspelled
    name is an error rather than a function that is silently never called.
    In a module, only functions defined there count: a plugin that imports
    ``meshd_select_host`` from another does not implement it.
    """
    module_name = obj.__name__ if isinstance(obj, types.ModuleType) else None
    out: list[tuple[str, Callable[..., Any], Mapping[str, Any] | None]] = []
    for attr in sorted(dir(obj)):
        try:
            value = getattr(obj, attr)
        except Exception:
            continue
        try:
            opts = pm.parse_hookimpl_opts(obj, attr)
        except Exception:
            opts = None
        if not attr.startswith("meshd_") and opts is None:
            continue
        if not callable(value) or inspect.isclass(value) or isinstance(value, types.ModuleType):
            continue
        if module_name is not None and getattr(value, "__module__", module_name) != module_name:
            continue
        out.append((attr, value, dict(opts) if opts is not None else None))
    return out


def _positional_args(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments ``fn`` takes, each of which meshd will pass.

    pluggy passes an implementation only its positional arguments without a
    default.  Anything else in a signature would silently never be passed:
    ``settings=None`` stays ``None`` (and a download gate written that way
    crashes on every call), ``*args`` stays empty.  Such signatures are
    refused here, at load time, with what to write instead.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot read its signature: {e}") from None
    args = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL or p.kind is p.VAR_KEYWORD:
            stars = "*" if p.kind is p.VAR_POSITIONAL else "**"
            raise ValueError(
                f"{stars}{p.name} would always be empty: meshd passes a hook only the "
                "arguments it names; name each one it needs")
        if p.default is not p.empty:
            raise ValueError(
                f"argument {p.name!r} has a default ({p.name}={p.default!r}), so meshd would "
                f"never pass it (only arguments without a default are passed): write "
                f"{p.name!r}, not {p.name}={p.default!r}")
        if p.kind is p.KEYWORD_ONLY:
            raise ValueError(f"keyword-only argument {p.name!r} would never be passed")
        args.append(p.name)
    return tuple(args)


def _signature_text(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _where(fn: Callable[..., Any]) -> str:
    fn = inspect.unwrap(fn)
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None:
        return "?"
    return f"{code.co_filename}:{code.co_firstlineno}"


def _error_location(e: BaseException, fn: Callable[..., Any]) -> str:
    """``file:line`` of the innermost frame in the plugin's file, else the innermost."""
    frames = traceback.extract_tb(e.__traceback__)
    plugin_file = _where(fn).rpartition(":")[0]
    mine = [f for f in frames if f.filename == plugin_file]
    chosen = mine or list(frames)
    if not chosen:
        return "?"
    return f"{Path(chosen[-1].filename).name}:{chosen[-1].lineno}"


def _origin_of(obj: object) -> str:
    path = getattr(obj, "__file__", None)
    return path or f"object {type(obj).__name__}"


def _import_file(path: str, name: str) -> types.ModuleType:
    """Import a plugin file as module ``meshd_plugin_<name>``; one problem line when it fails."""
    modname = f"meshd_plugin_{name}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise PluginError([f"{path}: plugin {name}: not a Python file"])
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(modname)
    sys.modules[modname] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        _restore(modname, previous)
        raise PluginError([f"{e.filename or path}:{e.lineno}: plugin {name}: syntax error: {e.msg}"]) from None
    except (Exception, SystemExit) as e:
        _restore(modname, previous)
        line = _line_in(e, path)
        raise PluginError(
            [f"{path}:{line}: plugin {name}: cannot import: {type(e).__name__}: {e}"]
        ) from None
    return module


def _import_module(entry: str, search_dirs: list[str]) -> types.ModuleType | str:
    """The module ``entry`` names, or the path of ``<entry>.py`` in a search dir."""
    try:
        spec = importlib.util.find_spec(entry)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        if "." not in entry:
            for d in search_dirs:
                path = os.path.join(d, entry + ".py")
                if os.path.isfile(path):
                    return path
        where = f", nor {entry}.py in {', '.join(search_dirs)}" if search_dirs and "." not in entry else ""
        raise PluginError([f"[policy] plugins: {entry}: no module named {entry!r} on sys.path{where}"])
    try:
        return importlib.import_module(entry)
    except SyntaxError as e:
        raise PluginError([f"{e.filename}:{e.lineno}: plugin {entry}: syntax error: {e.msg}"]) from None
    except (Exception, SystemExit) as e:
        origin = spec.origin or entry
        raise PluginError(
            [f"{origin}:{_line_in(e, origin)}: plugin {entry}: cannot import: {type(e).__name__}: {e}"]
        ) from None


def _line_in(e: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return str(frames[-1].lineno) if frames else "?"


def _restore(modname: str, previous: types.ModuleType | None) -> None:
    if previous is None:
        sys.modules.pop(modname, None)
    else:
        sys.modules[modname] = previous


def _short(value: Any) -> str:
    """A hook argument for a trace line: node ids rather than whole views."""
    from meshd.placement.snapshot import MeshView, NodeView

    if isinstance(value, MeshView):
        return f"<mesh {value.self_id}: {len(value.nodes)} nodes>"
    if isinstance(value, NodeView):
        return f"<node {value.node_id}>"
    if isinstance(value, tuple) and value and all(isinstance(v, NodeView) for v in value):
        return "(" + ", ".join(v.node_id for v in value) + ")"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
