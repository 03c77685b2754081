"""The model catalog: short names for GGUF files on Hugging Face.

The catalog ships with meshd (``meshd/models/catalog.toml``; its header documents
every field) so an operator can write ``serve = ["gemma-3-270m-q4_k_m"]``
instead of a repo and file name, and so a node knows a model's size *before*
asking the hub for it: the download gate and the disk check run on that size,
and a model that cannot fit is never requested.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import toml

from meshd.models.names import served_name, split_name

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KEYS = {"repo", "file", "files", "size_bytes", "size_approx", "sha256", "revision", "draft",
        "description", "note"}


class CatalogError(Exception):
    """A catalog file with problems; ``problems`` lists each one, naming the entry and key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog."""

    name: str
    repo: str
    # the repo files, in order (several for a split model)
    files: tuple[str, ...]
    size_bytes: int
    size_approx: bool = False
    # one per file, or None where unknown
    sha256: tuple[str | None, ...] = ()
    revision: str = "main"
    draft: str | None = None
    description: str = ""
    note: str = ""

    @property
    def split(self) -> bool:
        return len(self.files) > 1

    def target_names(self) -> tuple[str, ...]:
        """The file names a download is stored under in the models dir: served as ``name``."""
        if not self.split:
            return (f"{self.name}.gguf",)
        n = len(self.files)
        return tuple(f"{self.name}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1))


@dataclass(frozen=True)
class Catalog:
    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    path: str | None = None

    def get(self, name: str) -> CatalogEntry | None:
        return self.entries.get(name)

    def find_file(self, repo: str, file: str) -> CatalogEntry | None:
        """The entry that holds ``file`` of ``repo`` (any part of a split model), if any."""
        for entry in self.entries.values():
            if entry.repo == repo and file in entry.files:
                return entry
        return None


def _entry(name: str, data: Any, problems: list[str]) -> CatalogEntry | None:
    where = f"[models.\"{name}\"]"
    if not isinstance(data, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    if not NAME_RE.match(name):
        problems.append(f"{where}: a name may hold letters, digits, '.', '_' and '-' only")
    for key in sorted(set(data) - KEYS):
        problems.append(f"{where} {key}: unknown key (known: {', '.join(sorted(KEYS))})")
    repo = data.get("repo")
    if not isinstance(repo, str) or not REPO_RE.match(repo):
        problems.append(f"{where} repo: expected OWNER/NAME, got {repo!r}")
    if ("file" in data) == ("files" in data):
        problems.append(f"{where}: give exactly one of file (one GGUF) or files (a split GGUF)")
        files: list[Any] = []
    else:
        files = [data["file"]] if "file" in data else data["files"]
    if not isinstance(files, list) or not files or not all(
        isinstance(f, str) and f.lower().endswith(".gguf") for f in files
    ):
        problems.append(f"{where} file(s): expected .gguf file names, got {files!r}")
        files = []
    if len(files) > 1:
        parsed = [split_name(f.rsplit("/", 1)[-1]) for f in files]
        n = len(files)
        if any(p is None or p[1] != i + 1 or p[2] != n for i, p in enumerate(parsed)):
            problems.append(f"{where} files: expected NAME-00001-of-{n:05d}.gguf ... in order")
    size = data.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        problems.append(f"{where} size_bytes: expected a positive integer, got {size!r}")
    approx = data.get("size_approx", False)
    if not isinstance(approx, bool):
        problems.append(f"{where} size_approx: expected true or false")
    sha = data.get("sha256")
    shas: list[Any]
    if sha is None:
        shas = [None] * len(files)
    else:
        shas = sha if isinstance(sha, list) else [sha]
        if len(shas) != len(files) or not all(
            isinstance(s, str) and SHA256_RE.match(s.lower()) for s in shas
        ):
            problems.append(f"{where} sha256: expected one 64-hex-digit sha256 per file")
    for key in ("revision", "draft", "description", "note"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{where} {key}: expected a string")
    if len(problems) > before:
        return None
    assert isinstance(repo, str) and isinstance(size, int)  # checked above
    return CatalogEntry(
        name=name, repo=repo, files=tuple(files), size_bytes=size, size_approx=approx,
        sha256=tuple(s.lower() if s else None for s in shas),
        revision=data.get("revision", "main"), draft=data.get("draft"),
        description=data.get("description", ""), note=data.get("note", ""),
    )


def parse_catalog(data: dict[str, Any], path: str | None = None) -> Catalog:
    """A Catalog from parsed TOML; CatalogError lists every problem."""
    problems: list[str] = []
    models = data.get("models", {})
    for key in sorted(set(data) - {"models"}):
        problems.append(f"[{key}]: unknown section (entries go under [models.\"NAME\"])")
    if not isinstance(models, dict):
        problems.append("[models]: must be a table")
        models = {}
    entries: dict[str, CatalogEntry] = {}
    for name, body in models.items():
        entry = _entry(name, body, problems)
        if entry is not None:
            entries[name] = entry
    for entry in entries.values():
        if entry.draft is not None and entry.draft not in entries:
            problems.append(f"[models.\"{entry.name}\"] draft: {entry.draft!r} is not in the catalog")
    if problems:
        prefix = f"{path}: " if path else ""
        raise CatalogError([prefix + p for p in problems])
    return Catalog(entries=entries, path=path)


def load_catalog(path: str | None = None) -> Catalog:
    """The catalog at ``path``, or the one shipped with meshd; CatalogError if it is broken."""
    if path is None:
        ref = resources.files("meshd.models").joinpath("catalog.toml")
        text, path = ref.read_text(), str(ref)
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise CatalogError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise CatalogError([f"{path}: not valid TOML: {e}"]) from None
    return parse_catalog(data, path=path)


class _OnDiskModel(Protocol):
    @property
    def path(self) -> str: ...


class _Scan(Protocol):
    """What the listing needs of a scan (``meshd.models.scan.ScanResult``).

    A protocol rather than an import: the scanner resolves names through the
    catalog, so the catalog must not depend on the scanner.
    """

    @property
    def models(self) -> Mapping[str, _OnDiskModel]: ...


def catalog_listing(catalog: Catalog, scan: _Scan) -> list[dict[str, Any]]:
    """Rows for ``meshctl models --catalog``: each catalog model and whether it is on disk.

    A model counts as on disk under its catalog name (how meshd stores a
    download) or under the stem of its repo file (a file copied by hand).
    """
    rows = []
    for entry in sorted(catalog.entries.values(), key=lambda e: e.name):
        local = scan.models.get(entry.name) or scan.models.get(served_name(entry.files[0]))
        rows.append({
            "name": entry.name,
            "repo": entry.repo,
            "files": list(entry.files),
            "size_bytes": entry.size_bytes,
            "size_approx": entry.size_approx,
            "on_disk": local is not None,
            "path": local.path if local else None,
            "draft": entry.draft,
            "description": entry.description,
        })
    return rows
