"""meshd's route list against the routes the pinned llama-server really serves.

``scripts/build-llama.sh`` records them from the source at build time
(``server-routes.txt`` beside ``bin/``), so this test still runs after the
source is gone; a newer llama.cpp that adds a client route fails it until
``meshd.serving.routes`` places the path (routed, answered by meshd, or named as
not routed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.serving import routes

pytestmark = pytest.mark.e2e  # needs the llama.cpp build (made once, cached)


def recorded_routes(llama_bin_dir: str) -> list[str]:
    path = Path(llama_bin_dir).parent / "server-routes.txt"
    assert path.exists(), (f"{path} is missing: scripts/build-llama.sh records llama-server's "
                           "routes there (run it again; it adds the file without a rebuild)")
    return path.read_text().splitlines()


def test_every_route_of_the_pinned_llama_server_is_placed(llama_bin_dir):
    lines = recorded_routes(llama_bin_dir)
    # the recording is real: the client routes everyone uses are in it
    assert {"POST /v1/chat/completions", "POST /v1/messages", "POST /tokenize"} <= set(lines)
    assert routes.unknown(lines) == []


def test_a_route_meshd_does_not_know_is_reported(llama_bin_dir):
    lines = recorded_routes(llama_bin_dir) + ["POST /v1/some-new-endpoint"]
    assert routes.unknown(lines) == ["/v1/some-new-endpoint"]
