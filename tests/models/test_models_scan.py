"""The models scan and ``[models] serve`` resolution, on tiny GGUFs written by the test.

Permission problems are real ones: as root a chmod 000 does not stop a read,
so those scans run in a child process that drops to ``nobody`` first.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from gguf import GGUFReader

from meshd.models.catalog import parse_catalog
from meshd.models.scan import (
    ModelError,
    model_from_parts,
    resolve,
    scan,
)
from tests.conftest import ROOT
from tests.harness.localhub import gguf_bytes

CATALOG = parse_catalog({"models": {
    "tiny-chat": {"repo": "acme/tiny-GGUF", "file": "Tiny-Chat-Q4_K_M.gguf", "size_bytes": 4096,
                  "draft": "mini"},
    "mini": {"repo": "acme/mini-GGUF", "file": "mini.gguf", "size_bytes": 1000},
    "big": {"repo": "acme/big-GGUF", "size_bytes": 3000,
            "files": ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf"]},
}})


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- what is found ----------------------------------------------------------------------


def test_single_gguf_is_a_model_named_after_its_stem(tmp_path):
    data = gguf_bytes(name="Tiny", context_length=4096)
    write(tmp_path / "tiny-q4.gguf", data)
    result = scan([str(tmp_path)])
    model = result.models["tiny-q4"]
    assert model.path == str(tmp_path / "tiny-q4.gguf")
    assert model.parts == (model.path,)
    assert model.size_bytes == len(data)
    assert result.problems == []


def test_metadata_is_read_from_the_header(tmp_path):
    write(tmp_path / "m.gguf", gguf_bytes("qwen2", name="Tiny Qwen", context_length=4096,
                                          file_type=7, tensors=3))
    meta = scan([str(tmp_path)]).models["m"].metadata
    assert (meta.architecture, meta.title, meta.context_length, meta.quantization) == (
        "qwen2", "Tiny Qwen", 4096, "Q8_0")
    assert meta.parameter_count == 3 * 4 * 8


def test_metadata_agrees_with_gguf_reader(tmp_path):
    path = write(tmp_path / "m.gguf", gguf_bytes("llama", context_length=8192, tensors=4))
    reader = GGUFReader(str(path))
    meta = model_from_parts("m", [str(path)]).metadata
    assert meta.architecture == reader.fields["general.architecture"].contents()
    assert meta.context_length == reader.fields["llama.context_length"].contents()
    assert meta.parameter_count == sum(int(t.n_elements) for t in reader.tensors)


def test_metadata_of_the_real_gemma_file(gemma_model_path):
    model = model_from_parts("gemma", [gemma_model_path])
    assert model.metadata.architecture == "gemma3"
    assert model.metadata.quantization == "Q4_K_M"
    assert model.metadata.context_length == 32768
    assert 250_000_000 < model.metadata.parameter_count < 290_000_000
    assert model.size_bytes == os.path.getsize(gemma_model_path)


def test_split_set_is_one_model_with_the_summed_size(tmp_path):
    parts = [write(tmp_path / f"big-{i:05d}-of-00003.gguf", gguf_bytes(tensors=i))
             for i in (1, 2, 3)]
    result = scan([str(tmp_path)])
    assert list(result.models) == ["big"]
    model = result.models["big"]
    assert model.path == str(parts[0])
    assert model.parts == tuple(map(str, parts))
    assert model.size_bytes == sum(p.stat().st_size for p in parts)
    assert model.metadata.parameter_count == (1 + 2 + 3) * 32
    assert result.problems == []


def test_split_set_with_a_missing_part_is_reported_and_not_offered(tmp_path):
    write(tmp_path / "big-00001-of-00003.gguf", gguf_bytes())
    write(tmp_path / "big-00003-of-00003.gguf", gguf_bytes())
    result = scan([str(tmp_path)])
    assert result.models == {}
    assert result.problems == [
        f"model big: split set in {tmp_path} is incomplete (missing part 2 of 3): not offered"
    ]


def test_partial_downloads_and_hidden_files_are_ignored(tmp_path):
    for name in ("a.gguf.part", "b.gguf.incomplete", ".c.gguf", ".d.gguf.meshd-tmp",
                 "e.gguf.tmp"):
        write(tmp_path / name, b"GGUF half written")
    write(tmp_path / ".partial" / "f.gguf", gguf_bytes())
    result = scan([str(tmp_path)])
    assert (result.models, result.problems) == ({}, [])


def test_files_that_are_not_gguf_by_name_are_ignored(tmp_path):
    write(tmp_path / "README.md", b"# models")
    write(tmp_path / "model.safetensors", b"\0" * 64)
    result = scan([str(tmp_path)])
    assert (result.models, result.problems) == ({}, [])


def test_gguf_named_file_with_other_content_is_reported_and_others_still_found(tmp_path):
    write(tmp_path / "junk.gguf", b"<html>404</html>")
    write(tmp_path / "good.gguf", gguf_bytes())
    result = scan([str(tmp_path)])
    assert list(result.models) == ["good"]
    assert result.problems == [
        f"{tmp_path / 'junk.gguf'}: not a GGUF file (it does not start with 'GGUF')"
    ]


def test_truncated_gguf_is_reported(tmp_path):
    data = gguf_bytes()
    write(tmp_path / "cut.gguf", data[:40])
    result = scan([str(tmp_path)])
    assert result.models == {}
    assert len(result.problems) == 1 and "truncated" in result.problems[0]


def test_fifo_named_like_a_model_is_reported_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.gguf")
    result = scan([str(tmp_path)])
    assert result.problems == [f"{tmp_path / 'pipe.gguf'}: not a regular file"]


def test_dangling_symlink_is_reported(tmp_path):
    (tmp_path / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")
    result = scan([str(tmp_path)])
    assert result.problems == [f"{tmp_path / 'gone.gguf'}: cannot read: No such file or directory"]


def test_model_in_a_subfolder_is_found(tmp_path):
    write(tmp_path / "Q4_K_M" / "deep.gguf", gguf_bytes())
    assert list(scan([str(tmp_path)]).models) == ["deep"]


def test_vision_projector_is_not_a_model(tmp_path):
    write(tmp_path / "mmproj-x.gguf", gguf_bytes("clip", extra={"general.type": "mmproj"}))
    assert scan([str(tmp_path)]).models == {}


def test_same_name_in_two_directories_first_wins_and_is_reported(tmp_path):
    first = write(tmp_path / "a" / "m.gguf", gguf_bytes())
    second = write(tmp_path / "b" / "m.gguf", gguf_bytes())
    result = scan([str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.models["m"].path == str(first)
    assert result.problems == [f"model m: also found at {second}; using {first}"]


def test_missing_models_directory_is_reported(tmp_path):
    result = scan([str(tmp_path / "nope")])
    assert result.problems == [f"{tmp_path / 'nope'}: models directory does not exist"]


def scan_as_nobody(directory: str) -> dict:
    """scan() in a child that is user nobody, so file permissions apply even under root."""
    code = (
        "import json, os, sys\n"
        "from meshd.models.scan import scan\n"  # imported while still allowed to read site-packages
        "if os.getuid() == 0:\n"
        "    os.setgid(65534); os.setuid(65534)\n"
        "r = scan([sys.argv[1]])\n"
        "print(json.dumps({'models': sorted(r.models), 'problems': r.problems}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, directory], env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture
def world_dir():
    """A directory user nobody can reach (pytest's tmp_path is private to root)."""
    try:
        pwd.getpwuid(65534)
    except KeyError:
        pytest.skip("no user nobody (uid 65534) to drop to")
    d = tempfile.mkdtemp(prefix="meshd-scan-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        for root, dirs, _ in os.walk(d):
            for sub in dirs:
                os.chmod(os.path.join(root, sub), 0o755)
        shutil.rmtree(d)


def test_unreadable_file_is_reported_and_others_still_found(world_dir):
    write(world_dir / "good.gguf", gguf_bytes()).chmod(0o644)
    write(world_dir / "secret.gguf", gguf_bytes()).chmod(0o000)
    result = scan_as_nobody(str(world_dir))
    assert result == {"models": ["good"], "problems": [
        f"{world_dir / 'secret.gguf'}: cannot read: Permission denied"]}


def test_unreadable_directory_is_reported_and_others_still_found(world_dir):
    write(world_dir / "good.gguf", gguf_bytes()).chmod(0o644)
    write(world_dir / "locked" / "hidden.gguf", gguf_bytes())
    (world_dir / "locked").chmod(0o000)
    result = scan_as_nobody(str(world_dir))
    assert result == {"models": ["good"], "problems": [
        f"{world_dir / 'locked'}: cannot read directory: Permission denied"]}


# -- resolve ------------------------------------------------------------------------------


def test_path_entry_is_served_under_its_stem(tmp_path):
    path = write(tmp_path / "gemma-3-270m-q4_k_m.gguf", gguf_bytes())
    r = resolve(str(path), scan([]), CATALOG)
    assert (r.name, r.source, r.path, r.size_bytes) == (
        "gemma-3-270m-q4_k_m", "path", str(path), path.stat().st_size)


def test_path_to_the_first_part_of_a_split_set_serves_the_set(tmp_path):
    parts = [write(tmp_path / f"s-{i:05d}-of-00002.gguf", gguf_bytes()) for i in (1, 2)]
    r = resolve(str(parts[0]), scan([]), CATALOG)
    assert (r.name, r.path, r.size_bytes) == ("s", str(parts[0]),
                                             sum(p.stat().st_size for p in parts))


def test_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"), scan([]), CATALOG)


def test_path_to_a_file_that_is_not_gguf_is_an_error(tmp_path):
    path = write(tmp_path / "x.gguf", b"not a model at all")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve(str(path), scan([]), CATALOG)


def test_repo_path_without_hf_prefix_gets_a_hint():
    with pytest.raises(ModelError, match="write hf:acme/tiny-GGUF/x.gguf"):
        resolve("acme/tiny-GGUF/x.gguf", scan([]), CATALOG)


def test_local_name_is_served_from_disk(tmp_path):
    path = write(tmp_path / "mine.gguf", gguf_bytes())
    r = resolve("mine", scan([str(tmp_path)]), CATALOG)
    assert (r.source, r.path, r.needs_download) == ("local", str(path), False)


def test_catalog_name_not_on_disk_needs_a_download():
    r = resolve("tiny-chat", scan([]), CATALOG)
    assert (r.name, r.source, r.path, r.size_bytes, r.repo, r.files, r.draft) == (
        "tiny-chat", "catalog", None, 4096, "acme/tiny-GGUF", ("Tiny-Chat-Q4_K_M.gguf",), "mini")
    assert r.needs_download


def test_catalog_name_stored_under_the_repo_file_name_is_served_from_disk(tmp_path):
    path = write(tmp_path / "Tiny-Chat-Q4_K_M.gguf", gguf_bytes())
    r = resolve("tiny-chat", scan([str(tmp_path)]), CATALOG)
    assert (r.name, r.source, r.path) == ("tiny-chat", "catalog", str(path))


def test_hf_entry_names_the_repo_file_and_its_stem():
    r = resolve("hf:acme/tiny-GGUF/Q4_K_M/Tiny-Chat-Q4_K_M.gguf", scan([]), CATALOG)
    assert (r.name, r.source, r.repo, r.files, r.path) == (
        "Tiny-Chat-Q4_K_M", "hf", "acme/tiny-GGUF", ("Q4_K_M/Tiny-Chat-Q4_K_M.gguf",), None)


def test_hf_entry_for_a_split_file_names_every_part():
    r = resolve("hf:acme/big-GGUF/big-00001-of-00002.gguf", scan([]), CATALOG)
    assert r.name == "big"
    assert r.files == ("big-00001-of-00002.gguf", "big-00002-of-00002.gguf")
    assert r.size_bytes == 3000  # known from the catalog entry holding that file


def test_hf_entry_already_on_disk_is_served_from_there(tmp_path):
    path = write(tmp_path / "mini.gguf", gguf_bytes())
    r = resolve("hf:acme/mini-GGUF/mini.gguf", scan([str(tmp_path)]), CATALOG)
    assert (r.path, r.needs_download) == (str(path), False)


@pytest.mark.parametrize("entry", ["hf:acme/x.gguf", "hf:acme/tiny-GGUF/readme.md",
                                   "hf:acme//x.gguf", "hf:acme/tiny-GGUF/../x.gguf"])
def test_malformed_hf_entry_is_an_error(entry):
    with pytest.raises(ModelError, match=entry.replace(".", r"\.")):
        resolve(entry, scan([]), CATALOG)


def test_unknown_name_is_an_error_that_suggests_close_names():
    with pytest.raises(ModelError, match="unknown model 'tiny-caht'.*did you mean tiny-chat"):
        resolve("tiny-caht", scan([]), CATALOG)


def test_empty_entry_is_an_error():
    with pytest.raises(ModelError, match="empty"):
        resolve("  ", scan([]), CATALOG)


def test_gemma_without_a_chat_template_falls_back_to_the_shipped_gemma_template(tmp_path):
    from meshd.models.scan import fallback_chat_template

    bare = tmp_path / "g.gguf"
    bare.write_bytes(gguf_bytes("gemma3"))
    template = fallback_chat_template(str(bare))
    # a file of Jinja source: this llama-server reads a bare name as the template text
    assert template is not None and template.endswith("gemma.jinja")
    text = Path(template).read_text()
    assert "<start_of_turn>" in text and "add_generation_prompt" in text


def test_a_model_with_its_own_chat_template_keeps_it(tmp_path):
    from meshd.models.scan import fallback_chat_template

    own = tmp_path / "g.gguf"
    own.write_bytes(gguf_bytes("gemma3", extra={"tokenizer.chat_template": "{{ messages }}"}))
    assert fallback_chat_template(str(own)) is None
    other = tmp_path / "l.gguf"
    other.write_bytes(gguf_bytes("llama"))
    assert fallback_chat_template(str(other)) is None
    assert fallback_chat_template(str(tmp_path / "missing.gguf")) is None
