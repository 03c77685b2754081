"""Downloading models from Hugging Face: gated on fit and disk, resumable, verified, atomic.

Public entry: ``Downloader(config, reactor=..., gate=...).download(entry)``
returns a Deferred that fires with the ``LocalModel`` placed in the models
directory, or fails with ``DownloadRefused`` (the gate or the disk said no;
nothing was requested from the hub) or ``DownloadError`` (the hub or the file
let us down; the message is one operator-readable line).  ``entry`` is a
catalog name or ``hf:OWNER/REPO/FILE.gguf``.  ``Downloader.downloads`` (a
``Downloads``) is what ``meshctl status`` shows: ``to_status()`` is the
``downloads`` list of ``meshctl status --json``, ``refused_status()`` the
refusals.  ``python -m meshd.cli.download NAME`` runs one download from a shell.

The order of things, and why:

1. **Gate first.**  The download decision (VRAM must be at least size x 1.1,
   unless peers will share the model in a split: ``meshd.placement.fit``) runs
   before any request for the file, at exactly one call site
   (``Downloader.admit``), which calls the ``gate`` the daemon hands in: a
   closure over ``meshd.placement.rules.allow_download``, i.e. the
   ``meshd_allow_download`` hook.  Without one, the same
   ``placement.allow_download`` decides with the default policy on
   ``vram_bytes()``.  Catalog models carry their size, so a model
   that cannot fit is never asked for; for an ``hf:`` entry the size is only
   known from the hub's HEAD answer, so the gate runs after the HEAD and before
   the GET.  ``[models] min_free_gb`` is checked at the same point.
2. **huggingface_hub does the HTTP**: ``hf_hub_url`` and
   ``get_hf_file_metadata`` (the HEAD: ``HF_ENDPOINT``, ``HF_TOKEN``, redirects,
   its error types), then ``http_get`` with ``resume_size`` (ranged GET,
   retries of transient errors).  ``hf_hub_download`` itself is not used: since
   huggingface_hub 1.x it writes each attempt to a fresh uuid-named temporary
   file and deletes it on failure, so a daemon killed half-way would start
   over.  Here the partial file has a stable name,
   ``<cache_dir>/<target>.<etag>.part``, and a restart resumes it with
   ``Range: bytes=N-``.  ``HF_HUB_OFFLINE=1`` is honoured: then a file is taken
   from the Hugging Face cache (``HF_HOME``) or not at all.
3. **Verify**: the size the hub announced, and the sha256 (the catalog's, else
   the hub's LFS etag, which is the file's sha256).  The hash is computed while
   the bytes arrive.  A mismatch deletes the partial file.
4. **Place atomically**: a hard link from the partial file into the models
   directory (``os.link`` never overwrites), falling back to a copy to a hidden
   temporary name and a rename when the two directories are on different file
   systems.  The scan ignores ``*.part`` and ``*.meshd-tmp``, so a half-written
   model is never offered.

The blocking work runs in the reactor's thread pool (``deferToThreadPool``);
progress reaches the reactor with ``callFromThread``.  ``cancel_all()`` (for
``stopService``) stops the transfers at the next chunk and keeps the partial
files for the next start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from meshd.config import Config
from meshd.models import scan as models
from meshd.models.catalog import Catalog, CatalogEntry, load_catalog
from meshd.models.scan import LocalModel, ModelError
from meshd.placement import rules as placement
from meshd.placement.snapshot import NodeView
from meshd.states import DownloadState
from meshd.units import GIB, bytes_of_gib, gib, mib

log = logging.getLogger("meshd.models.download")

# progress log lines: at every PROGRESS_LOG_STEP of the total, or every PROGRESS_LOG_S
PROGRESS_LOG_STEP = 0.10
PROGRESS_LOG_S = 5.0
# refusals kept for status
MAX_REFUSED = 20
PARTIAL_SUFFIX = ".part"
COPY_SUFFIX = ".meshd-tmp"


class DownloadError(Exception):
    """A download that failed; the message is one line for the operator."""


class DownloadRefused(DownloadError):
    """The gate or the disk check said no; nothing was requested from the hub.

    ``size_bytes`` is set when the gate said no (not the disk): the daemon asks the
    gate again with it when the mesh changes (peers that a split would use joined)."""

    def __init__(self, reason: str, size_bytes: int | None = None):
        super().__init__(reason)
        self.size_bytes = size_bytes


class DownloadCancelled(DownloadError):
    """The daemon is stopping; the partial file stays for the next start."""


# -- the disk check --------------------------------------------------------------------


def check_disk(needed_bytes: int, free_bytes: int, min_free_bytes: int, where: str) -> str | None:
    """None when writing ``needed_bytes`` leaves at least ``min_free_bytes``; else why not."""
    left = free_bytes - needed_bytes
    if left >= min_free_bytes:
        return None
    return (
        f"download needs {gib(needed_bytes)} on {where}, which has {gib(free_bytes)} free: "
        f"{gib(max(left, 0))} would be left, less than [models] min_free_gb = "
        f"{min_free_bytes / GIB:g} GiB: not downloading"
    )


# -- progress ------------------------------------------------------------------------


@dataclass
class Progress:
    name: str
    total_bytes: int
    bytes: int
    started: float
    start_bytes: int
    state: DownloadState = DownloadState.DOWNLOADING
    last_log_at: float = 0.0
    last_log_fraction: float = 0.0

    def rate_bps(self, now: float) -> float:
        elapsed = now - self.started
        return (self.bytes - self.start_bytes) / elapsed if elapsed > 0 else 0.0

    def eta_s(self, now: float) -> float | None:
        rate = self.rate_bps(now)
        return (self.total_bytes - self.bytes) / rate if rate > 0 else None


@dataclass(frozen=True)
class Refusal:
    name: str
    size_bytes: int | None
    reason: str
    at: float


@dataclass
class Downloads:
    """Downloads in progress, refused and failed: what ``meshctl status`` shows.

    Updated on the reactor thread only.  ``clock`` gives the time
    (``IReactorTime``), so rates and ETAs are testable with ``task.Clock``.
    """

    clock: Any
    active: dict[str, Progress] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # extra listeners (the control API's event stream); called with the name
    listeners: list[Callable[[str], None]] = field(default_factory=list)

    def start(self, name: str, total_bytes: int, have_bytes: int) -> None:
        now = self.clock.seconds()
        self.failed.pop(name, None)
        self.active[name] = Progress(name, total_bytes, have_bytes, now, have_bytes,
                                     last_log_at=now,
                                     last_log_fraction=have_bytes / total_bytes if total_bytes else 0)
        self._changed(name)

    def update(self, name: str, done_bytes: int, state: DownloadState = DownloadState.DOWNLOADING) -> None:
        p = self.active.get(name)
        if p is None:
            return
        p.bytes, p.state = done_bytes, state
        now = self.clock.seconds()
        fraction = done_bytes / p.total_bytes if p.total_bytes else 1.0
        step_crossed = int(fraction / PROGRESS_LOG_STEP) > int(p.last_log_fraction / PROGRESS_LOG_STEP)
        if step_crossed or now - p.last_log_at >= PROGRESS_LOG_S:
            p.last_log_at, p.last_log_fraction = now, fraction
            eta = p.eta_s(now)
            log.info(
                "download %s: %s of %s (%d%%), %s/s, ETA %s",
                name, mib(done_bytes), mib(p.total_bytes), int(fraction * 100),
                mib(p.rate_bps(now)), f"{eta:.0f} s" if eta is not None else "unknown",
            )
        self._changed(name)

    def finish(self, name: str) -> None:
        self.active.pop(name, None)
        self._changed(name)

    def fail(self, name: str, reason: str) -> None:
        self.active.pop(name, None)
        self.failed[name] = reason
        self._changed(name)

    def refuse(self, name: str, size_bytes: int | None, reason: str) -> None:
        self.active.pop(name, None)
        self.refused = [r for r in self.refused if r.name != name][-(MAX_REFUSED - 1):]
        self.refused.append(Refusal(name, size_bytes, reason, self.clock.seconds()))
        self._changed(name)

    def to_status(self) -> list[dict[str, Any]]:
        """The ``downloads`` list of ``meshctl status --json``."""
        now = self.clock.seconds()
        out = []
        for p in self.active.values():
            eta = p.eta_s(now)
            out.append({
                "name": p.name, "bytes": p.bytes, "total_bytes": p.total_bytes,
                "rate_bps": round(p.rate_bps(now), 1),
                "eta_s": round(eta, 1) if eta is not None else None,
                "state": p.state,
            })
        return out

    def refused_status(self) -> list[dict[str, Any]]:
        """Refused downloads, newest last (for ``meshctl status``: ``downloads_refused``)."""
        return [{"name": r.name, "size_bytes": r.size_bytes, "reason": r.reason, "at": r.at}
                for r in self.refused]

    def failed_status(self) -> list[dict[str, Any]]:
        return [{"name": n, "error": e} for n, e in self.failed.items()]

    def _changed(self, name: str) -> None:
        for listener in list(self.listeners):
            listener(name)


# -- what to fetch ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where from, where to, and what we know before asking."""

    repo: str
    file: str
    revision: str
    target: str          # file name in the models dir
    sha256: str | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    files: tuple[RemoteFile, ...]
    # known before any request (catalog), else None until the HEAD answers
    size_bytes: int | None
    size_exact: bool


def plan_for(entry: str, catalog: Catalog) -> Plan:
    """What downloading ``entry`` means; ModelError for an entry that is not downloadable."""
    entry = entry.strip()
    if entry.startswith("hf:"):
        repo, file = models.parse_hf_entry(entry)
        files = models.hf_files(file)
        known: CatalogEntry | None = catalog.find_file(repo, file)
        shas: dict[str, str | None] = dict(zip(known.files, known.sha256, strict=True)) if known else {}
        return Plan(
            name=models.served_name(file),
            files=tuple(RemoteFile(repo, f, known.revision if known else "main",
                                   os.path.basename(f), shas.get(f)) for f in files),
            size_bytes=None, size_exact=False,
        )
    known = catalog.get(entry)
    if known is None:
        raise ModelError(
            f"{entry!r} is neither a catalog name nor hf:OWNER/REPO/FILE.gguf: nothing to download"
        )
    return Plan(
        name=known.name,
        files=tuple(RemoteFile(known.repo, f, known.revision, t, s)
                    for f, t, s in zip(known.files, known.target_names(), known.sha256, strict=True)),
        size_bytes=known.size_bytes, size_exact=not known.size_approx,
    )


# -- the blocking part (runs in a thread) ------------------------------------------


@dataclass
class _Head:
    url: str
    size: int
    etag: str
    commit: str | None
    headers: dict[str, str]


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or constants.is_offline_mode()


def _endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_error(rf: RemoteFile, endpoint: str, e: BaseException) -> DownloadError:
    from huggingface_hub import errors

    where = f"{rf.repo}/{rf.file}"
    if isinstance(e, errors.GatedRepoError):
        return DownloadError(f"{rf.repo} is gated on {endpoint}: accept its licence there and set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return DownloadError(
            f"repository {rf.repo} not found on {endpoint} (a private repo needs HF_TOKEN)"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return DownloadError(f"revision {rf.revision!r} of {rf.repo} not found on {endpoint}")
    if isinstance(e, errors.EntryNotFoundError):
        return DownloadError(f"file {rf.file} not found in {rf.repo} on {endpoint}")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return DownloadError(f"{endpoint} answered HTTP {status} for {where}")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return DownloadError(f"HF_HUB_OFFLINE is set: cannot fetch {where}")
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DownloadError(f"fetching {where} from {endpoint} failed: {text}")


class _Sink:
    """The partial file as http_get sees it: counts, hashes, and stops on cancel.

    Flushed after every chunk, so a process killed with -9 leaves every byte
    it received on disk for the resume.
    """

    def __init__(self, f: BinaryIO, hasher: Any, have: int, on_bytes: Callable[[int], None],
                 cancelled: threading.Event):
        self.f, self.hasher, self.done = f, hasher, have
        self.on_bytes, self.cancelled = on_bytes, cancelled

    def write(self, chunk: bytes) -> int:
        if self.cancelled.is_set():
            raise DownloadCancelled("meshd is stopping")
        n = self.f.write(chunk)
        self.f.flush()
        if self.hasher is not None:
            self.hasher.update(chunk)
        self.done += len(chunk)
        self.on_bytes(self.done)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        # http_get rewinds when a server ignores Range and sends the whole file
        pos = self.f.truncate(size)
        self.done = self.f.tell() if size is None else size
        self.hasher = hashlib.sha256() if self.done == 0 else None
        return pos


class _QuietBar:
    """A tqdm stand-in: progress goes to our log and status, not to a terminal bar."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __enter__(self) -> _QuietBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _sha256_file(path: str, start_hasher: Any = None) -> str:
    h = start_hasher or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _looks_sha256(etag: str | None) -> bool:
    return etag is not None and len(etag) == 64 and all(c in "0123456789abcdef" for c in etag)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place(partial: str, target: str) -> None:
    """Put ``partial`` at ``target`` in one step, never over an existing file."""
    os.chmod(partial, 0o644)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name is
    try:
        os.link(partial, target)
    except FileExistsError:
        raise DownloadError(f"{target} already exists; not replacing it") from None
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):  # no hard link here
            raise
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{COPY_SUFFIX}")
        shutil.copyfile(partial, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise DownloadError(f"{target} already exists; not replacing it") from None
        finally:
            os.unlink(tmp)
    os.unlink(partial)
    _fsync_dir(os.path.dirname(target))


class _Job:
    """One model's download, run in a thread; talks to the reactor only via callbacks."""

    def __init__(self, downloader: Downloader, plan: Plan, split_peers_available: bool,
                 on_started: Callable[[], None] | None = None):
        self.d, self.plan, self.split_peers = downloader, plan, split_peers_available
        self.on_started = on_started
        self.cancelled = threading.Event()

    def _from_thread(self, f: Callable[..., Any], *args: Any) -> None:
        self.d.reactor.callFromThread(f, *args)

    def _blocking_in_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return threads.blockingCallFromThread(self.d.reactor, f, *args)

    def run(self) -> LocalModel:
        plan, d = self.plan, self.d
        os.makedirs(d.models_dir, exist_ok=True)
        os.makedirs(d.cache_dir, exist_ok=True)
        targets = [os.path.join(d.models_dir, rf.target) for rf in plan.files]
        if all(os.path.exists(t) for t in targets):
            log.info("download %s: already in %s", plan.name, d.models_dir)
            return self._local(targets)
        if _offline():
            return self._from_hf_cache(targets)
        endpoint = _endpoint()
        heads = [self._head(rf, endpoint) for rf in plan.files]
        total = sum(h.size for h in heads)
        if plan.size_bytes is None:
            # hf: entries: the size is known only now; the gate runs before any GET
            self._blocking_in_reactor(self.d.admit, plan.name, total, self.split_peers)
        elif plan.size_exact and total != plan.size_bytes:
            raise DownloadError(
                f"the hub reports {total} bytes for {plan.name}, the catalog says "
                f"{plan.size_bytes}: not downloading"
            )
        partials = [self._partial_path(rf, h) for rf, h in zip(plan.files, heads, strict=True)]
        have = sum(os.path.getsize(p) if os.path.exists(p) else 0 for p in partials)
        self._blocking_in_reactor(d.check_space, plan.name, total, have)
        self._from_thread(d.downloads.start, plan.name, total, have)
        if self.on_started is not None:  # past every gate: the transfer begins
            self._from_thread(self.on_started)
        before = 0
        for rf, head, partial, target in zip(plan.files, heads, partials, targets, strict=True):
            if os.path.exists(target):
                before += head.size
                continue
            self._fetch(rf, head, partial, before)
            before += head.size
        self._from_thread(d.downloads.update, plan.name, total, "placing")
        for partial, target in zip(partials, targets, strict=True):
            if not os.path.exists(target):
                _place(partial, target)
        model = self._local(targets)
        return model

    def _local(self, targets: list[str]) -> LocalModel:
        try:
            return models.model_from_parts(self.plan.name, targets)
        except (models.GGUFError, OSError) as e:
            raise DownloadError(f"{self.plan.name}: placed, but not readable: {e}") from None

    def _head(self, rf: RemoteFile, endpoint: str) -> _Head:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(rf.repo, rf.file, revision=rf.revision, endpoint=endpoint)
        headers = build_hf_headers(token=self.d.token)
        try:
            meta = get_hf_file_metadata(url, token=self.d.token, headers=dict(headers))
        except Exception as e:  # noqa: BLE001 - mapped to one line for the operator
            raise _hub_error(rf, endpoint, e) from None
        if meta.commit_hash is None or meta.etag is None:
            raise DownloadError(
                f"{endpoint} is not a Hugging Face hub (no X-Repo-Commit / ETag for {rf.repo}/{rf.file})"
            )
        if meta.size is None:
            raise DownloadError(f"{endpoint} did not say how big {rf.repo}/{rf.file} is")
        location = meta.location or url
        if _host(location) != _host(url):
            headers.pop("authorization", None)  # never send the token to a CDN
        return _Head(location, meta.size, meta.etag, meta.commit_hash, headers)

    def _partial_path(self, rf: RemoteFile, head: _Head) -> str:
        tag = "".join(c for c in head.etag if c.isalnum())[:16] or "noetag"
        return os.path.join(self.d.cache_dir, f"{rf.target}.{tag}{PARTIAL_SUFFIX}")

    def _fetch(self, rf: RemoteFile, head: _Head, partial: str, before: int) -> None:
        from huggingface_hub.file_download import http_get

        # partials of an older version of this file (another etag) are of no use now
        prefix = f"{rf.target}."
        for other in os.listdir(self.d.cache_dir):
            path = os.path.join(self.d.cache_dir, other)
            if other.startswith(prefix) and other.endswith(PARTIAL_SUFFIX) and path != partial:
                os.unlink(path)
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        if have > head.size:
            have = 0
            os.truncate(partial, 0)
        expected_sha = rf.sha256 or (head.etag if _looks_sha256(head.etag) else None)
        hasher = None
        if expected_sha:
            hasher = hashlib.sha256()
            if have:
                _sha256_file(partial, hasher)
        if have:
            log.info("download %s: resuming %s at %s of %s", self.plan.name, rf.file, mib(have),
                     mib(head.size))
        else:
            log.info("download %s: fetching %s/%s (%s)", self.plan.name, rf.repo, rf.file,
                     mib(head.size))
        name, downloads = self.plan.name, self.d.downloads

        def on_bytes(done: int) -> None:
            self._from_thread(downloads.update, name, before + done)

        with open(partial, "ab") as f:
            sink = _Sink(f, hasher, have, on_bytes, self.cancelled)
            try:
                if have < head.size:
                    http_get(head.url, sink, resume_size=have, headers=head.headers,  # type: ignore[arg-type]
                             expected_size=head.size, displayed_filename=rf.target,
                             tqdm_class=_QuietBar)
            except DownloadError:
                raise
            except Exception as e:  # noqa: BLE001 - mapped to one line for the operator
                if self.cancelled.is_set():
                    raise DownloadCancelled(f"{name}: stopped; {mib(sink.done)} kept for resume") from None
                raise _hub_error(rf, _endpoint(), e) from None
            hasher = sink.hasher
        size = os.path.getsize(partial)
        if size != head.size:
            raise DownloadError(
                f"{rf.file}: got {size} bytes, the hub announced {head.size}; kept for resume"
            )
        if expected_sha:
            self._from_thread(downloads.update, name, before + size, DownloadState.VERIFYING)
            got = hasher.hexdigest() if hasher is not None else _sha256_file(partial)
            if got != expected_sha:
                os.unlink(partial)
                raise DownloadError(
                    f"{rf.file}: sha256 {got} does not match {expected_sha}; partial file "
                    "removed, the next attempt starts over"
                )
        try:
            models.read_header(partial)
        except models.GGUFError:
            os.unlink(partial)
            raise DownloadError(f"{rf.repo}/{rf.file} is not a GGUF file; removed") from None

    def _from_hf_cache(self, targets: list[str]) -> LocalModel:
        from huggingface_hub import try_to_load_from_cache

        for rf, target in zip(self.plan.files, targets, strict=True):
            if os.path.exists(target):
                continue
            cached = try_to_load_from_cache(rf.repo, rf.file, revision=rf.revision)
            if not isinstance(cached, str):
                raise DownloadError(
                    f"HF_HUB_OFFLINE is set and {rf.repo}/{rf.file} is not in the Hugging Face "
                    "cache: not downloading"
                )
            size = os.path.getsize(cached)
            self._blocking_in_reactor(self.d.check_space, self.plan.name, size, 0)
            tmp = os.path.join(self.d.cache_dir, f"{rf.target}.offline{PARTIAL_SUFFIX}")
            shutil.copyfile(cached, tmp)
            _place(tmp, target)
            log.info("download %s: copied %s from the Hugging Face cache", self.plan.name, rf.file)
        return self._local(targets)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.lower()


# -- the reactor-side object ---------------------------------------------------------


class Downloader:
    """Fetches catalog / ``hf:`` models into the models directory, one job per model.

    ``gate(model, size_bytes, split_peers_available)`` makes the download
    decision and returns something with ``.allowed`` and ``.reason`` (a
    ``meshd.placement.rules.DownloadDecision``): the daemon passes a closure
    over ``placement.allow_download`` with its node view, mesh view and policy
    manager.  Without a gate, ``placement.allow_download`` decides with the
    default policy on ``vram_bytes()``, called at decision time (the GPU
    module's current figure).
    ``disk_usage`` is a test seam (``shutil.disk_usage``).
    """

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        vram_bytes: Callable[[], int] | None = None,
        models_dir: str | None = None,
        cache_dir: str | None = None,
        catalog: Catalog | None = None,
        downloads: Downloads | None = None,
        gate: Callable[[str, int, bool], Any] | None = None,
        token: str | None = None,
        disk_usage: Callable[[str], Any] = shutil.disk_usage,
    ):
        self.config = config
        self.reactor = reactor
        self.vram_bytes = vram_bytes
        self.models_dir = os.path.abspath(models_dir or config.node.models_dir)
        self.cache_dir = os.path.abspath(cache_dir or os.path.join(config.node.state_dir, "downloads"))
        self.catalog = catalog if catalog is not None else load_catalog()
        self.downloads = downloads if downloads is not None else Downloads(clock=reactor)
        if gate is None:
            if vram_bytes is None:
                raise ValueError("Downloader needs a gate or vram_bytes")
            gate = self._built_in_gate
        self.gate = gate
        self.token = token
        self.disk_usage = disk_usage
        self._jobs: dict[str, tuple[_Job, list[defer.Deferred[LocalModel]]]] = {}

    def _built_in_gate(self, name: str, size_bytes: int,
                       split_peers_available: bool) -> placement.DownloadDecision:
        assert self.vram_bytes is not None
        node = NodeView(node_id="this node", vram_bytes=self.vram_bytes())
        return placement.allow_download(name, size_bytes, node,
                                        split_peers_available=split_peers_available)

    def admit(self, name: str, size_bytes: int, split_peers_available: bool) -> None:
        """The one call site of the download decision: raise DownloadRefused, recorded, or return."""
        decision = self.gate(name, size_bytes, split_peers_available)
        if not decision.allowed:
            self.downloads.refuse(name, size_bytes, decision.reason)
            log.warning("download %s refused: %s", name, decision.reason)
            raise DownloadRefused(decision.reason, size_bytes)
        log.info("download %s allowed: %s", name, decision.reason)

    def check_space(self, name: str, total: int, have: int) -> None:
        """Refuse when the download would leave less than ``[models] min_free_gb`` free."""
        min_free = bytes_of_gib(self.config.models.min_free_gb)
        checks: list[tuple[str, int]] = []
        same_fs = _device(self.models_dir) == _device(self.cache_dir)
        if same_fs:
            checks.append((self.models_dir, total - have))
        else:
            checks += [(self.cache_dir, total - have), (self.models_dir, total)]
        for where, needed in checks:
            problem = check_disk(needed, self.disk_usage(where).free, min_free, where)
            if problem:
                self.downloads.refuse(name, total, problem)
                log.warning("download %s refused: %s", name, problem)
                raise DownloadRefused(problem)

    def _partial_bytes(self, plan: Plan) -> int:
        """Bytes already fetched for ``plan`` by an earlier, interrupted attempt."""
        have = 0
        try:
            names = os.listdir(self.cache_dir)
        except OSError:
            return 0
        for rf in plan.files:
            for other in names:
                if other.startswith(f"{rf.target}.") and other.endswith(PARTIAL_SUFFIX):
                    try:
                        have += os.path.getsize(os.path.join(self.cache_dir, other))
                    except OSError:
                        pass
        return have

    def download(self, entry: str, *, split_peers_available: bool = False,
                 on_started: Callable[[], None] | None = None) -> defer.Deferred[LocalModel]:
        """Download ``entry`` (catalog name or ``hf:OWNER/REPO/FILE.gguf``) unless on disk.

        Fires with the placed LocalModel; fails with DownloadRefused,
        DownloadError or ModelError (an entry that names nothing
        downloadable).  A second call for a model already downloading waits
        for the same job.  ``on_started`` is called (in the reactor) once the
        transfer begins, past the gate and the disk check: for an ``hf:`` entry
        the size, and so the gate's answer, is known only after the hub's HEAD.
        """
        try:
            plan = plan_for(entry, self.catalog)
        except ModelError as e:
            return defer.fail(e)
        waiter: defer.Deferred[LocalModel] = defer.Deferred()
        if plan.name in self._jobs:
            self._jobs[plan.name][1].append(waiter)
            return waiter
        targets = [os.path.join(self.models_dir, rf.target) for rf in plan.files]
        if plan.size_bytes is not None and not all(os.path.exists(t) for t in targets):
            try:
                self.admit(plan.name, plan.size_bytes, split_peers_available)
                os.makedirs(self.models_dir, exist_ok=True)
                os.makedirs(self.cache_dir, exist_ok=True)
                self.check_space(plan.name, plan.size_bytes, self._partial_bytes(plan))
            except DownloadRefused as e:
                return defer.fail(e)
            except OSError as e:
                return defer.fail(DownloadError(f"{e.filename}: {e.strerror or e}"))
        job = _Job(self, plan, split_peers_available, on_started)
        self._jobs[plan.name] = (job, [waiter])
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), job.run)
        d.addBoth(self._done, plan.name)
        return waiter

    def _done(self, result: LocalModel | Failure, name: str) -> None:
        _, waiters = self._jobs.pop(name)
        if isinstance(result, Failure):
            if result.check(DownloadRefused):
                pass  # already recorded and logged by the gate / disk check
            elif result.check(DownloadCancelled):
                self.downloads.finish(name)
                log.info("download %s: stopped; the partial file is kept for the next start", name)
            elif result.check(DownloadError):
                self.downloads.fail(name, str(result.value))
                log.warning("download %s failed: %s", name, result.value)
            elif result.check(OSError):
                e = result.value
                result = Failure(DownloadError(f"{name}: {e.filename or ''}: {e.strerror or e}"))
                self.downloads.fail(name, str(result.value))
                log.warning("download %s failed: %s", name, result.value)
            else:
                self.downloads.fail(name, f"unexpected error: {result.value!r}")
                log.error("download %s failed unexpectedly", name, exc_info=result.value)
        else:
            self.downloads.finish(name)
            log.info("download %s: done, %s at %s", name, mib(result.size_bytes), result.path)
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)

    def cancel_all(self) -> None:
        """Stop every transfer at its next chunk (partial files stay for the next start)."""
        for job, _ in self._jobs.values():
            job.cancelled.set()

    def active(self) -> list[str]:
        return list(self._jobs)


def _device(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None
