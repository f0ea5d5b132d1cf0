"""Server-sent events: `data: {json}\n\n` frames, `data: [DONE]\n\n`, and a response that
always runs its clean-up, whether the stream ends, fails, or the client goes away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def event(payload_json: str) -> str:
    """One SSE frame carrying an already-serialized JSON payload."""
    return f"data: {payload_json}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response; `on_close` runs once the response is over for any reason.

    Starlette cancels the streaming task when the client disconnects, which may leave the event
    generator suspended at a `yield` and never finalized promptly; `on_close` (synchronous, so a
    pending cancellation cannot interrupt it) is where the engine requests get aborted.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        # no-cache and no proxy buffering: each token should reach the client as it is made.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
