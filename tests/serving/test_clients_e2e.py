"""The official openai and anthropic SDKs, and curl on llama.cpp's own paths, through a
two-node mesh of real meshd nodes with real llama-servers and the real Gemma model.

Node A serves ``m-local``, node B ``m-remote`` (both Gemma, under two names); every
request goes to A, so each call is made once for a model A answers itself and once
for one a tunnel carries to B, and ``X-Meshd-Node`` must name the right node.  Gemma
270M has no FIM tokens and B runs no reranker: ``/infill`` and ``/v1/rerank`` prove
they are routed by llama-server's own error coming back, in OpenAI's shape.  Each
generation is a few tokens: the point is the routing, not the model.
"""

from __future__ import annotations

import json
import subprocess
import time

import anthropic
import openai
import pytest

from tests.serving.test_mesh_routing_e2e import node, token, wait_listed

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Say hello."}]


def curl(base: str, path: str, body: dict) -> tuple[int, dict[str, str], dict]:
    """POST ``body`` with ``curl -s -i``: status, headers (lower-cased names), JSON body."""
    out = subprocess.run(
        ["curl", "-s", "-i", "-X", "POST", base + path, "-H", "Content-Type: application/json",
         "--data-binary", json.dumps(body), "--max-time", "60"],
        capture_output=True, timeout=90, check=True).stdout.decode()  # bytes: keep the CRLFs
    head, _, text = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(text)


def check_sdk_calls(oai: openai.OpenAI, ant: anthropic.Anthropic, model: str, host: str) -> None:
    """Chat (reading the served-by headers), responses and messages, streamed and not."""
    raw = oai.chat.completions.with_raw_response.create(model=model, max_tokens=4,
                                                        messages=PROMPT)
    assert raw.headers["x-meshd-node"] == host and raw.headers["x-meshd-model"] == model
    assert raw.parse().model == model

    raw_r = oai.responses.with_raw_response.create(model=model, input="Say hello.",
                                                   max_output_tokens=6)
    assert raw_r.headers["x-meshd-node"] == host
    r = raw_r.parse()
    assert r.status == "completed" and r.output_text, r
    kinds = [e.type for e in oai.responses.create(model=model, input="Say hello.",
                                                  max_output_tokens=6, stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds

    raw_m = ant.messages.with_raw_response.create(model=model, max_tokens=6, messages=PROMPT)
    assert raw_m.headers["x-meshd-node"] == host and raw_m.headers["x-meshd-model"] == model
    m = raw_m.parse()
    assert m.type == "message" and m.content[0].type == "text" and m.content[0].text, m
    with ant.messages.stream(model=model, max_tokens=6, messages=PROMPT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert stream.response.headers["x-meshd-node"] == host
    raw_c = ant.messages.with_raw_response.count_tokens(model=model, messages=PROMPT)
    assert raw_c.headers["x-meshd-node"] == host and raw_c.parse().input_tokens > 0

    got = oai.models.retrieve(model)
    assert (got.id, got.owned_by) == (model, "meshd")
    assert got.model_extra["meshd"]["hosts"] == [host]
    assert got.model_extra["meshd"]["state"] == "warm"


def test_the_official_sdks_and_llama_paths_through_a_two_node_mesh(tmp_path, llama_bin_dir,
                                                                    gemma_model_path):
    a = node(tmp_path, "a", llama_bin_dir, gemma_model_path, ["m-local"], serve=["m-local"])
    nodes = [a]
    try:
        a.start()
        a.wait_running()
        b = node(tmp_path, "b", llama_bin_dir, gemma_model_path, ["m-remote"],
                 serve=["m-remote"], join=token(a))
        nodes.append(b)
        b.start()
        wait_listed(a, "m-local")
        wait_listed(a, "m-remote")
        a_id, b_id = a.status()["node_id"], b.status()["node_id"]
        oai = openai.OpenAI(base_url=f"{a.api}/v1", api_key="x", max_retries=0, timeout=120)
        ant = anthropic.Anthropic(base_url=a.api, api_key="x", max_retries=0, timeout=120)

        # -- every SDK call, for the local model and for the one B serves -------------------
        t0 = time.monotonic()
        for model, host in (("m-local", a_id), ("m-remote", b_id)):
            check_sdk_calls(oai, ant, model, host)
        print(f"SDK calls for both models took {time.monotonic() - t0:.1f} s")

        # -- an unknown model: each SDK's NotFoundError --------------------------------------
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve("m-nowhere")
        with pytest.raises(openai.NotFoundError):
            oai.responses.create(model="m-nowhere", input="hi", max_output_tokens=4)
        with pytest.raises(anthropic.NotFoundError) as e:
            ant.messages.create(model="m-nowhere", max_tokens=4, messages=PROMPT)
        assert e.value.type == "not_found_error" and "m-remote" in e.value.api_message

        # -- llama.cpp's own paths, with curl ---------------------------------------------
        status, headers, doc = curl(a.api, "/tokenize", {"model": "m-remote", "content": "Hello"})
        assert status == 200 and headers["x-meshd-node"] == b_id, doc
        tokens = doc["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        status, headers, doc = curl(a.api, "/detokenize", {"model": "m-remote", "tokens": tokens})
        assert status == 200 and "Hello" in doc["content"], doc
        status, headers, doc = curl(a.api, "/apply-template",
                                    {"model": "m-local", "messages": PROMPT})
        assert status == 200 and headers["x-meshd-node"] == a_id
        # llama-server's rendering with the Gemma template meshd hands it (the GGUF has none)
        assert "<start_of_turn>user" in doc["prompt"] and "Say hello." in doc["prompt"], doc
        # two models in the mesh: a body without one is a clear 400
        status, _, doc = curl(a.api, "/tokenize", {"content": "Hello"})
        assert status == 400 and "m-local" in doc["error"]["message"], doc

        # -- routed, and llama-server's own error comes back in OpenAI's shape ------------------
        status, headers, doc = curl(a.api, "/infill", {"model": "m-remote", "input_prefix": "def ",
                                                       "input_suffix": "", "max_tokens": 2})
        assert status == 501 and headers["x-meshd-node"] == b_id, doc
        assert "Infill is not supported" in doc["error"]["message"]
        assert doc["error"]["type"] == "not_supported_error"
        status, headers, doc = curl(a.api, "/v1/rerank", {"model": "m-local", "query": "q",
                                                          "documents": ["a", "b"]})
        assert status == 501 and headers["x-meshd-node"] == a_id, doc
        assert "--reranking" in doc["error"]["message"]
        # llama-server's own error on an Anthropic path (no mmproj: no images), through the
        # tunnel, in Anthropic's shape: the SDK reads its type and message
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}}
        with pytest.raises(anthropic.InternalServerError) as e:
            ant.messages.create(model="m-remote", max_tokens=2,
                                messages=[{"role": "user", "content": [image]}])
        assert e.value.type == "api_error" and "image input" in e.value.api_message
        assert e.value.response.headers["x-meshd-node"] == b_id
    finally:
        for n in nodes:
            n.stop()
