"""``meshctl status`` for a split model: the shares in MODELS, the host's RPC tunnels in a
section of their own, and a worker's status (which has no tunnels) still readable."""

from __future__ import annotations

import copy

from meshd.cli import meshctl

HOST = "a1b2c3d4e5f6a7b8c9d0"
WORKER = "ffee00112233445566"
OTHER = "0123456789abcdef01"
MODEL = "llama-70b-q4_k_m"

HOST_STATUS = {
    "node_id": HOST,
    "mesh_id": "mesh-42",
    "role": "host",
    "serving": MODEL,
    "state": "ready",
    "peers": [],
    "models": [
        {
            "name": MODEL,
            "state": "warm",
            "hosts": [HOST],
            "size_bytes": 40 * 2**30,
            "split": {
                "host": HOST,
                "workers": [{"node_id": HOST, "share": 0.57}, {"node_id": WORKER, "share": 0.43}],
                "tunnels": [
                    {"node_id": WORKER, "state": "open", "local_port": 40123, "connections": 2}
                ],
            },
        },
        {"name": "tiny", "state": "warm", "hosts": [OTHER], "size_bytes": 2**20, "split": None},
    ],
}


def worker_status() -> dict:
    """The same split as the worker reports it: the plan, no tunnels."""
    s = copy.deepcopy(HOST_STATUS)
    s["node_id"], s["serving"] = WORKER, None
    del s["models"][0]["split"]["tunnels"]
    return s


def block(lines: list[str], title: str) -> list[str]:
    """The rows of one section (after its heading line), up to the next blank line."""
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def cells(line: str) -> list[str]:
    return line.split()


def test_models_table_gives_each_nodes_share_with_the_host_marked():
    models = block(meshctl.format_status(HOST_STATUS), "MODELS")
    assert cells(models[0])[-1] == "SPLIT"
    row = next(r for r in models if r.split()[0] == MODEL)
    assert row.endswith(f"{HOST[:12]} 57% (host), {WORKER[:12]} 43%")
    solo = next(r for r in models if r.split()[0] == "tiny")
    assert solo.endswith(" -")


def test_the_host_shows_each_workers_tunnel_state_and_connections():
    tunnels = block(meshctl.format_status(HOST_STATUS), "RPC TUNNELS")
    assert cells(tunnels[0]) == ["MODEL", "WORKER", "SHARE", "TUNNEL", "CONNECTIONS", "PORT"]
    assert [cells(r) for r in tunnels[1:]] == [[MODEL, WORKER[:12], "43%", "open", "2", "40123"]]


def test_a_worker_of_the_plan_without_an_entry_port_reads_none():
    s = copy.deepcopy(HOST_STATUS)
    split = s["models"][0]["split"]
    split["workers"].append({"node_id": OTHER, "share": 0.1})
    split["tunnels"].append({"node_id": "gone0000000000", "state": "closed",
                             "local_port": 40200, "connections": 0})
    rows = [cells(r) for r in block(meshctl.format_status(s), "RPC TUNNELS")[1:]]
    assert rows == [
        [MODEL, WORKER[:12], "43%", "open", "2", "40123"],
        [MODEL, OTHER[:12], "10%", "none", "-", "-"],
        [MODEL, "gone00000000", "not", "in", "the", "plan", "closed", "0", "40200"],
    ]


def test_a_worker_shows_the_split_and_no_tunnel_section():
    lines = meshctl.format_status(worker_status())
    row = next(r for r in block(lines, "MODELS") if r.split()[0] == MODEL)
    assert row.endswith(f"{HOST[:12]} 57% (host), {WORKER[:12]} 43%")
    assert "RPC TUNNELS" not in lines


def test_a_split_waiting_for_vram_shows_no_share_yet():
    s = worker_status()
    s["models"][0]["split"]["workers"] = [{"node_id": HOST, "share": 0.0},
                                          {"node_id": WORKER, "share": 0.0}]
    row = next(r for r in block(meshctl.format_status(s), "MODELS") if r.split()[0] == MODEL)
    assert row.endswith(f"{HOST[:12]} - (host), {WORKER[:12]} -")


def test_a_waiting_model_says_why_under_the_models():
    s = worker_status()
    s["models"][0].update(state="waiting-for-vram",
                          reason="need 44.0 GiB, group has 36.0 GiB of 3 nodes")
    lines = meshctl.format_status(s)
    assert (f"{MODEL} waiting-for-vram: need 44.0 GiB, group has 36.0 GiB of 3 nodes"
            in lines)
    assert not any(line.startswith("tiny ") for line in lines)  # warm: nothing to say


def test_a_split_says_why_it_is_planned_so():
    s = copy.deepcopy(HOST_STATUS)
    s["models"][0]["split"]["reason"] = (
        "fits no single node: split over 2 nodes; [models] tensor_split has 3 weights for "
        "2 nodes: shares follow VRAM")
    assert (f"{MODEL} split: fits no single node: split over 2 nodes; [models] tensor_split "
            "has 3 weights for 2 nodes: shares follow VRAM") in meshctl.format_status(s)


def test_odd_split_shapes_do_not_break_the_status():
    s = copy.deepcopy(HOST_STATUS)
    s["models"][0]["split"] = {"host": HOST, "workers": None, "tunnels": [None, "x"]}
    lines = meshctl.format_status(s)
    row = next(r for r in block(lines, "MODELS") if r.split()[0] == MODEL)
    assert row.endswith(f"host {HOST[:12]}")
    assert "RPC TUNNELS" not in lines
