"""The OpenAPI document (GET /openapi.json) with the real request and response schemas.

The routes parse their bodies themselves (strict JSON, OpenAI-shaped errors), so FastAPI cannot
see the pydantic models behind them; this module puts them back into the document: each POST
route's request body, its 200 response, and the error body every route may answer with.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from gemma_serve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeRequest,
)
from gemma_serve.server.responses_protocol import ResponseObject, ResponsesRequest
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
# Statuses a route answers with besides 200 (server/errors.py), all with the error body.
ERROR_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "Request queue full",
    "500": "Engine failure",
    "503": "Model loading or engine stopped",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(BaseModel):
    """Every non-200 answer: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


# path -> (request model, 200 response model, streamed chunk model or None).
POST_ROUTES: dict[str, tuple[type[BaseModel], type[BaseModel], type[BaseModel] | None]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
    "/tokenize": (TokenizeRequest, TokenizeResponse, None),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse, None),
    # Its stream is the Responses API's typed events (server/responses.py), not chunks + [DONE].
    "/v1/responses": (ResponsesRequest, ResponseObject, None),
}
# OpenAPI 3.1 cannot type the events of a stream: `x-event-data` names each data line's schema.
SSE_DESCRIPTION = (
    'With "stream": true, server-sent events: `data: <x-event-data JSON>` lines (or an error '
    "body if generation fails midway), then `data: [DONE]`."
)


def install_openapi(app: FastAPI) -> None:
    """Makes `app.openapi()` (and so /openapi.json) describe the POST bodies and errors."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}

    error = {"content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}
    for path, (request, response, chunk) in POST_ROUTES.items():
        op = doc["paths"][path]["post"]
        body = {"application/json": {"schema": ref(request, "validation")}}
        op["requestBody"] = {"required": True, "content": body}
        ok: dict[str, Any] = {"application/json": {"schema": ref(response, "serialization")}}
        if chunk is not None:
            ok["text/event-stream"] = {
                "schema": {"type": "string", "description": SSE_DESCRIPTION},
                "x-event-data": ref(chunk, "serialization"),
            }
        op["responses"] = {"200": {"description": "Success", "content": ok}}
        op["responses"].update(
            {status: {"description": why, **error} for status, why in ERROR_STATUSES.items()}
        )
    return doc
