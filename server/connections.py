"""Connection hygiene under uvicorn: a connection limit, a request-read deadline, 431, lingering.

uvicorn bounds neither the number of open connections (its --limit-concurrency answers 503 to
every request, /health included, once reached) nor the time a client may take to send a request.
`GuardedH11Protocol` is uvicorn's h11 protocol with:

- a bound on open connections (`ConnectionLimits.max_connections`, --limit-concurrency). Only
  connections that hold a request (received whole, response not finished) are kept at all
  costs: when the limit is reached, the connection idle the longest (keep-alive, never sent a
  byte, or halfway through its head or body) is closed to make room. If every connection
  holds a request, a new one still gets in on a small reserve (`probe_reserve`) where /health
  and /metrics are answered and any other path gets an OpenAI-shaped 503; when the reserve is
  full, its oldest connection not answering a probe makes room, and failing that the new one
  gets a 503 and is closed.
- a deadline for receiving a request's headers and body (`request_read_timeout_s`,
  --timeout-request-read), from the connection's start (first request) or the request's first
  byte (later ones): a connection that sends nothing is closed, one that sent part of a request
  gets a 408 first. The keep-alive idle timeout between requests stays uvicorn's.
- 431 (instead of uvicorn's 400 and an immediate close, which the client sees as a reset) for
  headers over --h11-max-incomplete-event-size; error replies are followed by a lingering close
  (read and discard for up to `linger_s`), so that a client still sending reads the answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from gemma_serve.server.errors import APIError
from gemma_serve.server.middleware import OPEN_PATHS
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn imports it too
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)
DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0
PROBE_RESERVE = 16  # connections beyond the limit that may still ask /health or /metrics
LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    """The server's connection hygiene settings (see the module docstring)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_read_timeout_s: float = DEFAULT_REQUEST_READ_TIMEOUT_S
    probe_reserve: int = PROBE_RESERVE
    linger_s: float = LINGER_S

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"--limit-concurrency must be >= 1, got {self.max_connections}")
        if not self.request_read_timeout_s > 0:
            raise ValueError(
                f"--timeout-request-read must be > 0, got {self.request_read_timeout_s}"
            )


class ConnectionGuard:
    """The open connections of one server, sorted into idle (oldest first) and busy ones."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._idle: dict[GuardedH11Protocol, None] = {}  # insertion order = idle since
        self._busy: set[GuardedH11Protocol] = set()
        self._probes: dict[GuardedH11Protocol, None] = {}  # the reserve, oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def open(self) -> int:
        return len(self._idle) + len(self._busy) + len(self._probes)

    def admit(self, conn: GuardedH11Protocol) -> str:
        """'normal', 'probe' (on the reserve: /health and /metrics only) or 'refuse'."""
        if len(self._idle) + len(self._busy) >= self.limits.max_connections:
            victim = next(iter(self._idle), None)
            if victim is not None:
                self.evicted += 1
                logger.warning(
                    "connection limit (%d) reached: closing the longest idle connection",
                    self.limits.max_connections,
                )
                self.forget(victim)
                victim.close_idle()
            elif len(self._probes) < self.limits.probe_reserve or self._free_a_probe():
                self._probes[conn] = None
                return "probe"
            else:
                self.refused += 1
                logger.warning(
                    "connection limit (%d) reached with every connection serving a request: "
                    "refusing a new connection",
                    self.limits.max_connections,
                )
                return "refuse"
        self._idle[conn] = None
        return "normal"

    def _free_a_probe(self) -> bool:
        """Closes the oldest reserve connection not answering a probe (one left open)."""
        victim = next((c for c in self._probes if not c.serving), None)
        if victim is None:
            return False
        self.evicted += 1
        self.forget(victim)
        victim.close_idle()
        return True

    def mark_busy(self, conn: GuardedH11Protocol) -> None:
        if conn in self._idle:
            del self._idle[conn]
            self._busy.add(conn)

    def mark_idle(self, conn: GuardedH11Protocol) -> None:
        if conn in self._busy or conn in self._idle:
            self._busy.discard(conn)
            self._idle.pop(conn, None)
            self._idle[conn] = None  # to the end: idle the shortest

    def is_idle(self, conn: GuardedH11Protocol) -> bool:
        return conn in self._idle

    def forget(self, conn: GuardedH11Protocol) -> None:
        self._idle.pop(conn, None)
        self._busy.discard(conn)
        self._probes.pop(conn, None)


def error_bytes(error: APIError, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s OpenAI body, closing the connection;
    written to the socket directly where no ASGI cycle exists (or can still answer)."""
    body = json.dumps(error.body()).encode()
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _busy_error() -> APIError:
    message = "Server busy: the connection limit is reached; retry later"
    return APIError(503, message, code="connection_limit")


def probe_only(app: ASGIApp) -> ASGIApp:
    """`app` for /health and /metrics, an OpenAI-shaped 503 otherwise; the connection closes
    after the one response (it is on the reserve)."""

    async def probe_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in OPEN_PATHS:
            response = _busy_error().response()
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_closing)

    return probe_app


def _head_too_large(max_bytes: int) -> APIError:
    message = f"Request headers too large: the limit is {max_bytes} bytes"
    return APIError(431, message, code=431)


def head_limited(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """`app`, but a 431 for a request head over `max_bytes`. h11 refuses only heads that
    arrive in pieces and outgrow its buffer; a whole head in one read passes it."""

    async def limited_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope["raw_path"]) + len(scope["query_string"])
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > max_bytes:
                response = _head_too_large(max_bytes).response()
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return limited_app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection limit, the read deadline and 431."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._max_event = config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.app = head_limited(self.app, self._max_event)
        self._deadline: asyncio.TimerHandle | None = None
        self._discarding = False  # after an error reply: read and drop until closed

    @classmethod
    def factory(cls, guard: ConnectionGuard) -> Any:
        """What uvicorn.Config(http=...) takes: the class with the guard bound."""
        return functools.partial(cls, guard=guard)

    # -- connection life cycle ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admission = self.guard.admit(self)
        if admission == "refuse":
            self._discarding = True
            transport.write(error_bytes(_busy_error()))
            transport.close()
            return
        if admission == "probe":
            self.app = probe_only(self.app)
        self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self.guard.forget(self)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Closes a connection that holds no request (evicted to make room for a new one)."""
        self._cancel_deadline()
        if not self.transport.is_closing():
            self.transport.close()

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._start_deadline()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        self._after_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.guard.mark_idle(self)
        self._after_events()

    @property
    def serving(self) -> bool:
        """A whole request is in and its response is not finished: the connection holds work
        (one still sending its head or body can be closed to make room)."""
        received = self.conn.their_state not in (h11.IDLE, h11.SEND_BODY)
        return received and self.cycle is not None and not self.cycle.response_complete

    def _after_events(self) -> None:
        """Deadline off once the request is fully in; busy while it is being served."""
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._cancel_deadline()
        if self.serving and self.guard.is_idle(self):
            self.guard.mark_busy(self)

    # -- deadline ---------------------------------------------------------------------------

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        timeout = self.guard.limits.request_read_timeout_s
        self._deadline = self.loop.call_later(timeout, self._on_read_timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_read_timeout(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.guard.timed_out += 1
        serving = self.cycle is not None and not self.cycle.response_complete
        if serving:
            # The route is waiting for the rest of the body: it sees a disconnect.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if serving and self.cycle.response_started:
            self.transport.close()
        elif serving or self.conn.trailing_data[0]:
            timeout = self.guard.limits.request_read_timeout_s
            message = f"Request not received in time: the limit is {timeout:g} s"
            logger.warning("closing a connection: request not received within %g s", timeout)
            self.reply_and_close(APIError(408, message, code=408))
        else:
            self.transport.close()  # nothing sent at all: no answer owed

    # -- errors ------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's reply to a malformed request: 431 when the headers outgrew the limit."""
        if len(self.conn.trailing_data[0]) > self._max_event:
            self.reply_and_close(_head_too_large(self._max_event))
        else:
            self.reply_and_close(APIError(400, f"Invalid HTTP request: {msg}", code=400))

    def reply_and_close(self, error: APIError) -> None:
        """Writes `error` and closes after a lingering read: closing with unread data would
        reset the connection before the client reads the reply."""
        self._cancel_deadline()
        self._discarding = True
        self.transport.write(error_bytes(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.guard.limits.linger_s, self.transport.close)
