"""Every client path routed by its model, errors in the client's own shape, /v1/models/{id},
the served-by headers and both API key headers: against tests/harness/fakebackend.py on
loopback, in memory where a stream must break at an exact point, and with the official
openai and anthropic SDKs (in a thread) where the question is which exception they raise.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from meshd.config import ApiConfig
from meshd.passive.router import PassiveRouter
from meshd.serving import routes
from meshd.serving.api import ApiServer
from meshd.serving.routes import ModelFrom, Shape
from meshd.serving.routetable import HostEntry, RouteTable
from meshd.serving.routing import Upstream
from tests.conftest import free_port
from tests.harness.fakebackend import ECHO_PATHS, FakeBackend
from tests.serving.test_api import (
    SSE_HEAD,
    MemoryUpstreams,
    Router,
    chat,
    error_of,
    get,
    post,
    sse,
)

JSON_ROUTES = [r for r in routes.ROUTES if r.model_from is not ModelFrom.FORM]
NODE_A, NODE_B = "a" * 26, "b" * 26


def upstream(node_id: str, port: int) -> Upstream:
    return Upstream(name=node_id, endpoint=lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                    pool_key=f"{node_id}:{port}", node_id=node_id)


@pytest.fixture
def fake():
    backend = FakeBackend(chunks=3, model="fake-one")
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture
def fake2():
    backend = FakeBackend(chunks=3, model="fake-two")
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture
def serve():
    """serve(router, relay=False, **api_config) -> (ApiServer, base URL) on a loopback port."""
    ports, servers = [], []

    def start(router, relay=False, **config):
        api = ApiServer(router, ApiConfig(**config), reactor=reactor, relay=relay)
        port = reactor.listenTCP(0, api.site, interface="127.0.0.1")
        ports.append(port)
        servers.append(api)
        return api, f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for api in servers:
        api.pool.close()
    for port in ports:
        port.stopListening()


async def anthropic_error_of(response, status: int) -> dict:
    """The response has ``status`` and an Anthropic-shaped error body; returns its "error"."""
    body = await response.json()
    assert response.code == status, body
    assert body["type"] == "error" and set(body) == {"type", "error"}
    err = body["error"]
    assert set(err) == {"type", "message"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def multipart(fields: dict[str, bytes], boundary: str = "meshd-test-boundary") -> tuple[bytes, str]:
    parts = []
    for name, value in fields.items():
        extra = '; filename="a.wav"' if name == "file" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n'
                     f"\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- the table ---------------------------------------------------------------------------------


def test_the_table_names_each_path_once_and_the_fake_backend_answers_every_routed_one():
    paths = [r.path for r in routes.ROUTES]
    assert len(paths) == len(set(paths))
    assert set(paths) <= ECHO_PATHS | {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert not set(paths) & set(routes.NOT_ROUTED)
    assert not set(paths) & set(routes.OWN)
    for must in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                 "/v1/rerank", "/v1/messages", "/v1/messages/count_tokens",
                 "/v1/chat/completions/input_tokens", "/v1/responses/input_tokens",
                 "/tokenize", "/detokenize", "/apply-template", "/infill",
                 "/v1/audio/transcriptions"):
        assert must in paths, must
    assert {r.path for r in routes.ROUTES if r.shape is Shape.ANTHROPIC} == {
        "/v1/messages", "/v1/messages/count_tokens"}


def test_unknown_lists_llama_paths_the_table_does_not_place():
    known = [r.path for r in routes.ROUTES] + list(routes.NOT_ROUTED) + list(routes.OWN)
    assert routes.unknown(known) == []
    assert routes.unknown(["/v1/chat/completions", "/v1/new-thing", "/props"]) == ["/v1/new-thing"]
    assert routes.unknown(["POST /v1/messages", "GET /slots", "DELETE /v1/new", ""]) == ["/v1/new"]


# -- routing each path -------------------------------------------------------------------------


@pytest.mark.parametrize("route", JSON_ROUTES, ids=lambda r: r.path)
@pytest_twisted.ensureDeferred
async def test_each_json_path_goes_to_the_host_of_the_model_its_body_names(serve, fake, fake2,
                                                                          route):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)],
                           "two": [upstream(NODE_B, fake2.port)]}))
    r = await post(url + route.path, {"model": "two", "prompt": "x", "max_tokens": 2})
    assert r.code == 200
    await r.content()
    assert (fake.paths, fake2.paths) == ([], [route.path])
    assert fake2.headers[-1]["x-meshd-model"] == "two"  # the relay of a tunnel reads it
    assert r.headers.getRawHeaders("X-Meshd-Node") == [NODE_B]
    assert r.headers.getRawHeaders("X-Meshd-Model") == ["two"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/apply-template", "/infill",
                                  "/completion"])
@pytest_twisted.ensureDeferred
async def test_a_llama_path_without_a_model_goes_to_the_only_model_of_the_mesh(serve, fake,
                                                                              path):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)]}))
    r = await post(url + path, {"content": "hello"})
    assert r.code == 200
    assert (await r.json())["x_meshd_model"] == "one"
    assert fake.paths == [path]
    assert json.loads(fake.bodies[-1]) == {"content": "hello"}  # the body is not rewritten


@pytest_twisted.ensureDeferred
async def test_a_llama_path_without_a_model_in_a_mesh_of_two_is_400_naming_both(serve, fake):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)], "two": []}))
    err = await error_of(await post(url + "/tokenize", {"content": "hello"}), 400)
    assert err["code"] == "missing_model"
    assert "one" in err["message"] and "two" in err["message"] and "/tokenize" in err["message"]
    assert fake.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_llama_path_naming_its_model_goes_to_that_model_in_a_mesh_of_two(serve, fake,
                                                                                fake2):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)],
                           "two": [upstream(NODE_B, fake2.port)]}))
    r = await post(url + "/detokenize", {"model": "one", "tokens": [1, 2]})
    assert r.code == 200 and (await r.json())["model"] == "fake-one"
    assert r.headers.getRawHeaders("X-Meshd-Node") == [NODE_A]


@pytest_twisted.ensureDeferred
async def test_an_openai_path_without_a_model_is_400_even_with_one_model(serve, fake):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)]}))
    err = await error_of(await post(url + "/v1/responses", {"input": "hi"}), 400)
    assert err["code"] == "missing_model"
    assert fake.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_transcription_goes_by_its_form_model_and_its_body_arrives_whole(serve, fake,
                                                                                fake2):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)],
                           "two": [upstream(NODE_B, fake2.port)]}))
    body, ctype = multipart({"file": bytes(range(256)) * 4, "model": b"two"})
    r = await post(url + "/v1/audio/transcriptions", data=body,
                   headers={"Content-Type": [ctype]})
    assert r.code == 200
    assert (await r.json())["model"] == "fake-two"
    assert fake2.bodies[-1] == body
    assert fake2.headers[-1]["content-type"] == ctype


@pytest_twisted.ensureDeferred
async def test_a_form_whose_content_type_is_spelled_oddly_is_still_read_as_a_form(serve, fake,
                                                                                  fake2):
    # the API skips twisted.web's form parsing for bodies that cannot be forms (a JSON
    # body's Content-Type costs the email package's parser): case and spaces do not fool it
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)],
                           "two": [upstream(NODE_B, fake2.port)]}))
    body, ctype = multipart({"file": b"RIFF....", "model": b"two"})
    odd = " Multipart/Form-Data" + ctype.removeprefix("multipart/form-data")
    r = await post(url + "/v1/audio/transcriptions", data=body, headers={"Content-Type": [odd]})
    assert r.code == 200 and (await r.json())["model"] == "fake-two"


def test_only_a_body_that_can_be_a_form_is_parsed_as_one():
    from meshd.httpbounds import _may_be_form

    assert _may_be_form(b"multipart/form-data; boundary=x")
    assert _may_be_form(b"\tAPPLICATION/X-WWW-FORM-URLENCODED")
    assert not _may_be_form(b"application/json")
    assert not _may_be_form(b"text/plain; charset=multipart/form-data")


@pytest_twisted.ensureDeferred
async def test_a_transcription_without_a_form_model_is_400(serve, fake):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)]}))
    body, ctype = multipart({"file": b"RIFF...."})
    r = await post(url + "/v1/audio/transcriptions", data=body, headers={"Content-Type": [ctype]})
    err = await error_of(r, 400)
    assert "'model' field" in err["message"]
    assert fake.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_routed_path_takes_post_only(serve):
    _, url = serve(Router({}))
    r = await get(url + "/v1/responses")
    err = await error_of(r, 405)
    assert err["code"] == "method_not_allowed"
    assert r.headers.getRawHeaders("Allow") == ["POST"]


@pytest.mark.parametrize("path", ["/props", "/slots/0", "/v1/stream", "/lora-adapters"])
@pytest_twisted.ensureDeferred
async def test_a_per_backend_path_is_404_saying_meshd_does_not_route_it(serve, fake, path):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)]}))
    err = await error_of(await post(url + path, {"model": "one"}), 404)
    assert "does not route" in err["message"] and path in err["message"]
    assert fake.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_relay_routes_by_the_model_the_requesting_node_named(serve, fake):
    # the far end of a tunnel lists the whole mesh: the body alone could not say
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)], "two": []}), relay=True)
    r = await post(url + "/tokenize", {"content": "x"}, headers={"X-Meshd-Model": ["one"]})
    assert r.code == 200 and (await r.json())["model"] == "fake-one"


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_steer_routing_with_the_model_header(serve, fake, fake2):
    _, url = serve(Router({"one": [upstream(NODE_A, fake.port)],
                           "two": [upstream(NODE_B, fake2.port)]}))
    r = await post(url + "/v1/completions", {"model": "one", "prompt": "x"},
                   headers={"X-Meshd-Model": ["two"]})
    assert r.code == 200 and r.headers.getRawHeaders("X-Meshd-Node") == [NODE_A]


# -- the served-by headers ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_after_a_failover_the_headers_name_the_node_that_answered(serve, fake):
    router = Router({"m": [upstream(NODE_A, free_port()), upstream(NODE_B, fake.port)]})
    _, url = serve(router)
    r = await post(url + "/v1/chat/completions", chat(stream=True))
    assert r.code == 200
    await r.content()
    assert [name for name, _ in router.failed] == [NODE_A]
    assert r.headers.getRawHeaders("X-Meshd-Node") == [NODE_B]
    assert r.headers.getRawHeaders("X-Meshd-Model") == ["m"]


@pytest_twisted.ensureDeferred
async def test_an_upstream_outside_a_mesh_is_named_by_its_upstream_name(serve, fake):
    up = Upstream(name=f"127.0.0.1:{fake.port}", pool_key="s",
                  endpoint=lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", fake.port))
    _, url = serve(Router({"m": [up]}))
    r = await post(url + "/v1/chat/completions", chat())
    await r.content()
    assert r.headers.getRawHeaders("X-Meshd-Node") == [f"127.0.0.1:{fake.port}"]


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_answer_carries_the_headers_too(serve, fake):
    fake.errors["/infill"] = 400
    _, url = serve(Router({"m": [upstream(NODE_A, fake.port)]}))
    r = await post(url + "/infill", {"input_prefix": "def "})
    body = await r.json()
    assert r.code == 400 and body["error"]["message"] == "fake error on /infill"  # as llama said
    assert r.headers.getRawHeaders("X-Meshd-Node") == [NODE_A]


@pytest_twisted.ensureDeferred
async def test_meshd_own_errors_name_no_node(serve):
    _, url = serve(Router({"m": []}))
    r = await post(url + "/v1/chat/completions", chat("nope"))
    await error_of(r, 404)
    assert r.headers.getRawHeaders("X-Meshd-Node") is None


# -- Anthropic's error shape ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_anthropic_paths_answer_errors_in_anthropic_shape(serve):
    _, url = serve(Router({"m": []}, not_ready={"m"}))
    err = await anthropic_error_of(await post(url + "/v1/messages", {"model": "nope"}), 404)
    assert err["type"] == "not_found_error" and "m" in err["message"]
    r = await post(url + "/v1/messages/count_tokens", {"model": "m"})
    assert (await anthropic_error_of(r, 503))["type"] == "overloaded_error"
    assert r.headers.getRawHeaders("Retry-After") == ["7"]
    err = await anthropic_error_of(await post(url + "/v1/messages", {"max_tokens": 3}), 400)
    assert err["type"] == "invalid_request_error"
    await anthropic_error_of(await post(url + "/v1/messages", data=b"{"), 400)
    assert (await anthropic_error_of(await get(url + "/v1/messages"), 405))["type"] \
        == "invalid_request_error"


@pytest_twisted.ensureDeferred
async def test_openai_and_llama_paths_keep_openai_shape(serve):
    _, url = serve(Router({"m": []}))
    for path in ("/v1/responses", "/tokenize", "/v1/rerank"):
        err = await error_of(await post(url + path, {"model": "nope"}), 404)
        assert err["code"] == "model_not_found"


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_on_an_anthropic_path_is_put_in_anthropic_shape(serve, fake):
    fake.errors["/v1/messages"] = 400
    _, url = serve(Router({"m": [upstream(NODE_A, fake.port)]}))
    r = await post(url + "/v1/messages", {"model": "m", "max_tokens": 2, "messages": []})
    err = await anthropic_error_of(r, 400)
    assert err == {"type": "invalid_request_error", "message": "fake error on /v1/messages"}
    assert r.headers.getRawHeaders("X-Meshd-Node") == [NODE_A]


@pytest_twisted.ensureDeferred
async def test_a_401_on_an_anthropic_path_is_anthropic_shaped(serve):
    _, url = serve(Router({}), api_key="sekrit")
    err = await anthropic_error_of(await post(url + "/v1/messages", {"model": "m"}), 401)
    assert err["type"] == "authentication_error"


def test_a_broken_anthropic_stream_ends_with_an_anthropic_error_event():
    clock = Clock()
    ups = MemoryUpstreams()
    router = Router({"m": [Upstream(name="mem", endpoint=ups.endpoint, pool_key="mem")]})
    api = ApiServer(router, ApiConfig(), reactor=clock)
    channel = api.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(client)
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 5, "messages": []}).encode()
    channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    upstream_conn = ups.connections[0]
    upstream_conn.dataReceived(SSE_HEAD + sse(0))
    upstream_conn.transport.loseConnection()
    text = client.value().decode()
    event = text.rsplit("event: error\ndata: ", 1)[1].split("\n\n")[0]
    doc = json.loads(event)
    assert doc["type"] == "error" and doc["error"]["type"] == "api_error"


# -- API keys -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_api_key_is_accepted_as_x_api_key_as_well_as_bearer(serve, fake):
    _, url = serve(Router({"m": [upstream(NODE_A, fake.port)]}), api_key="sekrit")
    for headers in ({"x-api-key": ["sekrit"]}, {"Authorization": ["Bearer sekrit"]},
                    {"Authorization": ["Basic nope"], "x-api-key": ["sekrit"]}):
        r = await post(url + "/v1/messages", {"model": "m", "max_tokens": 2}, headers=headers)
        assert r.code == 200, headers
        await r.content()
    r = await get(url + "/v1/models", headers={"x-api-key": ["sekriT"]})
    await error_of(r, 401)
    assert fake.requests == 3
    assert all("x-api-key" not in h and "authorization" not in h for h in fake.headers)


# -- /v1/models/{id} ------------------------------------------------------------------------------


class ListingRouter(Router):
    def models(self):
        return [{"id": m, "object": "model", "owned_by": "meshd",
                 "meshd": {"hosts": [NODE_A], "nodes": 1, "state": "warm"}}
                for m in sorted(self.table)]


@pytest_twisted.ensureDeferred
async def test_a_model_is_answered_as_v1_models_lists_it(serve):
    _, url = serve(ListingRouter({"gemma": [], "org/llama": []}))
    listed = {m["id"]: m for m in (await (await get(url + "/v1/models")).json())["data"]}
    r = await get(url + "/v1/models/gemma")
    assert r.code == 200 and await r.json() == listed["gemma"]
    for path in ("/v1/models/org/llama", "/v1/models/org%2Fllama"):
        assert await (await get(url + path)).json() == listed["org/llama"], path


@pytest_twisted.ensureDeferred
async def test_an_unknown_model_is_an_openai_shaped_404(serve):
    _, url = serve(ListingRouter({"gemma": []}))
    err = await error_of(await get(url + "/v1/models/nope"), 404)
    assert err["code"] == "model_not_found" and "gemma" in err["message"]


@pytest_twisted.ensureDeferred
async def test_a_passive_node_answers_a_model_from_its_routing_table(serve, fake):
    router = PassiveRouter(
        "c" * 26, started_at=0,
        endpoint_for=lambda nid, model: TCP4ClientEndpoint(reactor, "127.0.0.1", fake.port))
    router.update(RouteTable("t.1.1", "mesh1", NODE_A, hosts=(
        HostEntry("m1", NODE_A, ("127.0.0.1:1",)), HostEntry("m1", NODE_B, ("127.0.0.1:2",)),
        HostEntry("m2", NODE_B, ("127.0.0.1:2",), state="loading"))))
    _, url = serve(router)
    m1 = await (await get(url + "/v1/models/m1")).json()
    assert (m1["id"], m1["object"], m1["owned_by"]) == ("m1", "model", "meshd")
    assert m1["meshd"]["state"] == "warm" and sorted(m1["meshd"]["hosts"]) == [NODE_A, NODE_B]
    assert (await (await get(url + "/v1/models/m2")).json())["meshd"]["state"] == "loading"
    await error_of(await get(url + "/v1/models/m3"), 404)
    # and its answers name the host its tunnel reached
    r = await post(url + "/v1/chat/completions", chat("m1", user="u"))
    await r.content()
    assert r.headers.getRawHeaders("X-Meshd-Node")[0] in (NODE_A, NODE_B)


# -- what the official SDKs make of it -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_sdk_raises_its_own_not_found_and_503_errors(serve):
    _, url = serve(ListingRouter({"gemma": [], "slow": []}, not_ready={"slow"}))
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    ant = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=10)

    def calls() -> list[type[Exception] | str]:
        out: list[type[Exception] | str] = []
        attempts = [
            lambda: oai.models.retrieve("nope"),
            lambda: oai.responses.create(model="nope", input="hi"),
            lambda: ant.messages.create(model="nope", max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}]),
            lambda: ant.messages.count_tokens(model="nope",
                                              messages=[{"role": "user", "content": "hi"}]),
            lambda: oai.chat.completions.create(model="slow", messages=[]),
            lambda: ant.messages.create(model="slow", max_tokens=2, messages=[]),
        ]
        for attempt in attempts:
            try:
                attempt()
                out.append("no error")
            except Exception as e:  # noqa: BLE001 - the class is the answer
                out.append(type(e))
        return out

    got = await threads.deferToThread(calls)
    assert got == [openai.NotFoundError, openai.NotFoundError,
                   anthropic.NotFoundError, anthropic.NotFoundError,
                   openai.InternalServerError, anthropic.ServiceUnavailableError]
    model = await threads.deferToThread(oai.models.retrieve, "gemma")
    assert model.id == "gemma" and model.owned_by == "meshd"


# -- the operator's guide ---------------------------------------------------------------------------


def test_the_operators_guide_names_every_routed_and_every_unrouted_path():
    from tests.conftest import ROOT

    text = (ROOT / "docs/operators.md").read_text()
    section = text.split("## What the API answers", 1)[1].split("\n## ", 1)[0]
    for path in [r.path for r in routes.ROUTES] + list(routes.NOT_ROUTED) + list(routes.OWN):
        shown = path.replace(":id_slot", "{id}")
        assert f"`{shown}`" in section or f"`GET {shown}`" in section, path
