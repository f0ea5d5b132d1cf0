"""Request gates that run before any route: the request id, the body-size limit and the API
key.

Both are plain ASGI middleware (not BaseHTTPMiddleware), so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import logging
import uuid

from gemma_serve.server.errors import APIError, BodyTooLargeError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Everything else needs the key (when one is set): deny by default, so a new route, a trailing
# slash or /openapi.json cannot slip past it. Probes and scrapers carry no key.
OPEN_PATHS = frozenset({"/health", "/metrics"})
logger = logging.getLogger(__name__)


def clean_api_key(key: str) -> str:
    """The server's key as clients can send it: surrounding whitespace is stripped (with a
    warning: a key pasted with its newline could never match); an empty key, or one that is not
    printable ASCII (an HTTP header cannot carry it intact), raises ValueError."""
    stripped = key.strip()
    if stripped != key:
        logger.warning("the API key had surrounding whitespace; it was stripped")
    if not stripped:
        raise ValueError("the API key is empty (a blank key would turn authentication off)")
    if not (stripped.isascii() and stripped.isprintable()):
        raise ValueError(
            "the API key must be printable ASCII: clients send it in an HTTP header, which "
            "could never carry it intact"
        )
    return stripped


MAX_REQUEST_ID_LEN = 128


class RequestIdMiddleware:
    """x-request-id: the client's (printable ASCII, at most MAX_REQUEST_ID_LEN characters) or a
    fresh one; echoed on every response and used as the log's request id (vLLM's behaviour)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, b"x-request-id") or "").strip()
        ok = 0 < len(given) <= MAX_REQUEST_ID_LEN and given.isascii() and given.isprintable()
        request_id = given if ok else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(request: Request) -> str:
    """The request's id (RequestIdMiddleware), or a fresh one where the middleware is absent."""
    return str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await BodyTooLargeError(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; the APIError handler answers 413.
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`, on every path but /health and /metrics."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            error = self._check(_header(scope, b"authorization"))
            if error is not None:
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, authorization: str | None) -> APIError | None:
        if not authorization:
            message = "Missing API key: send the header 'Authorization: Bearer <key>'"
            return APIError(401, message, code="invalid_api_key")
        scheme, _, token = authorization.partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key
        )
        return None if ok else APIError(401, "Invalid API key", code="invalid_api_key")


def _protected(path: str) -> bool:
    return path not in OPEN_PATHS


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
