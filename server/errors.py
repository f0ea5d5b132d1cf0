"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Route code raises `APIError` (or lets an engine exception through); the handlers installed by
`install_error_handlers` turn each into its HTTP status. Bad input is never a 500.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gemma_serve.server.engine.errors import EngineDeadError, QueueFullError, RequestTooLongError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger(__name__)
VALIDATION_ERRORS = (pydantic.ValidationError, RequestValidationError)

# vLLM's convention: the error type names the HTTP status.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error with its HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status) or f"HTTP{status}Error"

    def body(self) -> dict[str, Any]:
        """The JSON body: exactly error.{message, type, param, code}."""
        fields = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**fields, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class BodyTooLargeError(APIError):
    """The request body exceeds the server's limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body too large: the limit is {limit} bytes", code=413)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; FastAPI's leading 'body' is dropped."""
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(errors: list[Any]) -> APIError:
    """The first pydantic error as a 400 naming its parameter."""
    if not errors:
        return bad_request("Invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"Invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}")
    param = _param_from_loc(tuple(err.get("loc", ())))
    if param is None:
        return bad_request(f"Invalid request body: {err['msg']}")
    message = f"Invalid value for '{param}': {err['msg']}"
    if err.get("type") != "missing":
        message += f" (got {_short(err.get('input'))})"
    return bad_request(message, param=param)


RETRY_AFTER_S = 1  # a 429's Retry-After: the queue moves on within about a second


def install_error_handlers(app: FastAPI) -> None:
    """Maps every exception a route can raise to its status and the OpenAI error body."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        return exc.response() if isinstance(exc, APIError) else await on_unexpected(request, exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, VALIDATION_ERRORS) else []
        return validation_error(list(errors)).response()

    async def on_http(_: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        message = "Not found: no such route" if status == 404 else HTTPStatus(status).phrase
        return APIError(status, message, code=status).response()

    async def on_queue_full(_: Request, exc: Exception) -> Response:
        message = f"Server busy: {exc or 'the request queue is full'}; retry later"
        response = APIError(429, message, code="queue_full").response()
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    async def on_too_long(_: Request, exc: Exception) -> Response:
        return APIError(400, str(exc), code="context_length_exceeded").response()

    async def on_engine_dead(_: Request, exc: Exception) -> Response:
        return APIError(503, f"The engine has stopped: {exc}", code="engine_dead").response()

    async def on_disconnect(request: Request, _: Exception) -> Response:
        # Nobody is listening any more; 499 is what the access log shows (nginx's convention).
        logger.debug("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The traceback goes to the log only; the client learns the exception class.
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        message = f"Internal server error ({type(exc).__name__}); see the server log"
        return APIError(500, message, code=500).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(pydantic.ValidationError, on_validation)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(QueueFullError, on_queue_full)
    app.add_exception_handler(RequestTooLongError, on_too_long)
    app.add_exception_handler(EngineDeadError, on_engine_dead)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)
