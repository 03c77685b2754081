"""Which client paths the API routes to a model's llama-server, and how it picks the model.

One table, :data:`ROUTES`, so that the API, the operator's guide and the test that
compares it with the pinned llama-server's own routes read the same list.  Every
llama-server route is in exactly one of three places:

- :data:`ROUTES`: forwarded to a host of the request's model (always ``POST``);
- :data:`OWN`: answered by meshd itself (``/health``, ``/metrics``, ``/v1/models``
  for the whole mesh);
- :data:`NOT_ROUTED`: per-backend internals, answered 404 with the reason, because
  what they name (a slot, a resumable stream, a LoRA, a live completion) lives in
  one llama-server, and a mesh of several cannot say which without more state
  than the request carries.

How the model is chosen (:class:`ModelFrom`): the JSON body's ``model`` on the
OpenAI and Anthropic paths (required, as those APIs require it); on llama.cpp's own
paths and aliases, whose bodies usually carry none, the body's ``model`` when
present, else the one model the mesh lists, else a 400 that names the models; for
the multipart ``/v1/audio/transcriptions``, the form's ``model`` field.

Errors take the shape of the API the path belongs to (:class:`Shape`), so each
official SDK raises its own exception class for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from meshd import jsonbounds


class ModelFrom(StrEnum):
    """Where a routed request names its model."""

    BODY = "body"  # the JSON body's "model", required
    BODY_OR_ONLY = "body-or-only"  # the JSON body's "model", else the mesh's only model
    FORM = "form"  # the multipart form's "model" field, required


class Shape(StrEnum):
    """The error body shape a path's clients parse."""

    OPENAI = "openai"  # {"error": {"message", "type", "code"}}; llama-server's own shape too
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}


@dataclass(frozen=True)
class Route:
    """One client path forwarded to a host of the request's model."""

    path: str
    model_from: ModelFrom
    shape: Shape = Shape.OPENAI
    method: str = "POST"


_B, _ONLY, _FORM = ModelFrom.BODY, ModelFrom.BODY_OR_ONLY, ModelFrom.FORM

ROUTES: tuple[Route, ...] = (
    # OpenAI
    Route("/v1/chat/completions", _B),
    Route("/v1/completions", _B),
    Route("/v1/embeddings", _B),
    Route("/v1/responses", _B),
    Route("/v1/rerank", _B),
    Route("/v1/reranking", _B),
    Route("/v1/chat/completions/input_tokens", _B),
    Route("/v1/responses/input_tokens", _B),
    Route("/v1/audio/transcriptions", _FORM),
    # Anthropic
    Route("/v1/messages", _B, Shape.ANTHROPIC),
    Route("/v1/messages/count_tokens", _B, Shape.ANTHROPIC),
    # llama.cpp's own
    Route("/tokenize", _ONLY),
    Route("/detokenize", _ONLY),
    Route("/apply-template", _ONLY),
    Route("/infill", _ONLY),
    Route("/v1/systemone", _ONLY),
    # llama.cpp's aliases of the OpenAI paths (and its legacy /completion, /embedding)
    Route("/completion", _ONLY),
    Route("/completions", _ONLY),
    Route("/chat/completions", _ONLY),
    Route("/embedding", _ONLY),
    Route("/embeddings", _ONLY),
    Route("/responses", _ONLY),
    Route("/rerank", _ONLY),
    Route("/reranking", _ONLY),
    Route("/chat/completions/input_tokens", _ONLY),
    Route("/responses/input_tokens", _ONLY),
    Route("/audio/transcriptions", _FORM),
)

BY_PATH: Mapping[bytes, Route] = {r.path.encode(): r for r in ROUTES}

# llama-server routes meshd answers itself, for the whole mesh
OWN: Mapping[str, str] = {
    "/health": "meshd's own health (the node's, not one llama-server's)",
    "/metrics": "meshd's own metrics (Prometheus text)",
    "/v1/models": "every model of the mesh, from the routing table",
    "/v1/models/{id}": "one model of the mesh, from the routing table",
}

# llama-server routes not forwarded, and why (the 404 says it)
_PER_BACKEND = "each llama-server has its own; meshd cannot tell which one the client means"
NOT_ROUTED: Mapping[str, str] = {
    "/v1/stream": "a resumable stream lives on the llama-server that started it",
    "/v1/streams/lookup": "a resumable stream lives on the llama-server that started it",
    "/v1/chat/completions/control": "a completion in flight lives on one llama-server",
    "/props": _PER_BACKEND,
    "/slots": _PER_BACKEND,
    "/slots/:id_slot": _PER_BACKEND,
    "/lora-adapters": _PER_BACKEND,
    "/v1/health": "meshd answers /health",
    "/models": "meshd answers /v1/models",
    # llama-server's router mode (several models in one process) and its web UI's helpers
    "/models/load": "llama-server's router mode; meshd places models itself",
    "/models/unload": "llama-server's router mode; meshd places models itself",
    "/models/sse": "llama-server's router mode; meshd places models itself",
    "/cors-proxy": "llama-server's web UI helper",
    "/tools": "llama-server's web UI helper",
}


def route_of(path: bytes) -> Route | None:
    return BY_PATH.get(path)


def not_routed_reason(path: bytes) -> str | None:
    """Why ``path`` is not forwarded, for the 404 (``/slots/3`` is ``/slots/:id_slot``)."""
    text = path.decode(errors="replace")
    if text.startswith("/slots/"):
        text = "/slots/:id_slot"
    return NOT_ROUTED.get(text)


def unknown(llama_routes: Iterable[str]) -> list[str]:
    """The llama-server paths that meshd neither routes, answers, nor names as not routed.

    The route-list test feeds it the routes the pinned llama-server registers
    (``"/path"`` or ``"METHOD /path"`` each): a new llama.cpp that adds a client
    route shows up here until this module places it.
    """
    known = {r.path for r in ROUTES} | set(OWN) | set(NOT_ROUTED)
    paths = {line.split()[-1] for line in llama_routes if line.strip()}
    return sorted(p for p in paths if p not in known)


# -- error bodies ----------------------------------------------------------------------------

# Anthropic's error types by HTTP status (its SDK picks the exception by status;
# ``type`` is what the exception's ``.type`` reads)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_doc(shape: Shape, status: int, message: str, type_: str,
              code: str | None) -> dict[str, object]:
    """An error body as a dict; ``type_`` and ``code`` are the OpenAI ones (Anthropic's
    type follows from ``status``)."""
    if shape is Shape.ANTHROPIC:
        return {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    return {"error": {"message": message, "type": type_, "code": code}}


def error_body(shape: Shape, status: int, message: str, type_: str, code: str | None) -> bytes:
    return json.dumps(error_doc(shape, status, message, type_, code)).encode()


def reshape_error(shape: Shape, status: int, body: bytes) -> bytes | None:
    """An upstream's error body in ``shape``, or None to pass it on as it is.

    llama-server answers errors in OpenAI's shape on every path, /v1/messages too;
    the Anthropic SDK reads ``error.type`` and ``error.message`` from its own shape.
    """
    if shape is not Shape.ANTHROPIC or status < 400:
        return None
    try:
        doc = jsonbounds.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("type") == "error":
        return None
    err = doc.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    return error_body(shape, status, err["message"], "", None)
