"""The engine requests behind one HTTP request: submitted together, merged, and always cleaned up.

A completion with n choices (or a batch of prompts) becomes several engine requests
"<id>-<i>". `GenerationGroup` runs them concurrently, hands their outputs over in arrival order,
feeds the metrics, logs each finished request, and aborts whatever is left when the client goes
away. Engine errors that happen before the first output (queue full, too long, invalid) surface
from `start()`, so they become HTTP errors rather than a broken 200 stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gemma_serve.server import sse
from gemma_serve.server.engine.errors import RequestTooLongError
from gemma_serve.server.engine.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    RequestOutput,
    TokenLogprob,
)
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine_client import EngineClient
from gemma_serve.server.errors import APIError, bad_request
from gemma_serve.server.metrics import Metrics
from gemma_serve.server.protocol import PromptTokensDetails, Usage
from gemma_serve.server.sse import SSEResponse
from gemma_serve.server.state import server_state
from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SubRequest:
    """One engine request: choice `index` of the HTTP response."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    counts_prompt: bool = True  # False for the 2nd..nth choice of a prompt (usage counts once)
    submitted: bool = False
    finished: bool = False
    failed: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class ChoiceResult:
    """A whole choice, accumulated from its outputs (non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text.append(out.new_text)
        self.logprobs.extend(out.new_logprobs or ())
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


class GenerationGroup:
    """Runs `subs` on the engine and merges their outputs."""

    def __init__(self, engine: EngineClient, metrics: Metrics, subs: list[SubRequest]) -> None:
        self.subs = subs
        self._engine = engine
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[SubRequest, RequestOutput | Exception]] = asyncio.Queue()
        self._buffer: list[tuple[SubRequest, RequestOutput]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def start(self) -> None:
        """Submits every request and waits for each one's first output; raises the first
        engine error (after aborting the others)."""
        limit = self._engine.max_queued_requests
        if len(self.subs) > limit:  # could never be queued at once, however idle the server
            raise bad_request(
                f"This request makes {len(self.subs)} completions (prompts x n), more than the "
                f"server queues at once (--max-queued-requests {limit})",
                param="n",
            )
        for sub in self.subs:
            sub.submitted = True
            self._tasks.append(asyncio.create_task(self._pump(sub), name=sub.request_id))
        waiting = {sub.index for sub in self.subs}
        try:
            while waiting:
                sub, item = await self._queue.get()
                if isinstance(item, Exception):
                    raise _as_client_error(item)
                waiting.discard(sub.index)
                self._buffer.append((sub, item))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[SubRequest, RequestOutput]]:
        """Every output, in arrival order, until every request has finished."""
        buffered, self._buffer = self._buffer, []
        remaining = len(self.subs) - sum(out.finished for _, out in buffered)
        for item in buffered:
            yield item
        while remaining:
            sub, item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item.finished
            yield sub, item

    async def collect(self) -> dict[int, ChoiceResult]:
        """Every choice in full, by index."""
        results = {sub.index: ChoiceResult() for sub in self.subs}
        async for sub, out in self.outputs():
            results[sub.index].add(out)
        return results

    def usage(self) -> Usage:
        """Prompt tokens once per prompt, completion tokens of every choice (OpenAI's usage)."""
        prompt = sum(s.num_prompt_tokens for s in self.subs if s.counts_prompt)
        cached = sum(s.num_cached_tokens for s in self.subs if s.counts_prompt)
        completion = sum(s.num_output_tokens for s in self.subs)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def close(self) -> None:
        """Aborts every unfinished request. Synchronous, so a pending cancellation (the client
        went away) cannot interrupt it; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for sub in self.subs:
            if sub.submitted and not sub.finished and not sub.failed:
                sub.finished = True
                self._engine.abort(sub.request_id)
                self._metrics.on_abort(sub.request_id)
                logger.info(
                    "request %s aborted: prompt_tokens=%d completion_tokens=%d reason=abort",
                    sub.request_id,
                    sub.num_prompt_tokens,
                    sub.num_output_tokens,
                )

    async def _pump(self, sub: SubRequest) -> None:
        last: RequestOutput | None = None
        try:
            gen = self._engine.generate(sub.request_id, sub.prompt_ids, sub.params)
            async with contextlib.aclosing(gen):  # type: ignore[type-var]
                async for out in gen:
                    last = out
                    self._record(sub, out)
                    self._queue.put_nowait((sub, out))
        except Exception as exc:
            sub.failed = not sub.finished
            self._queue.put_nowait((sub, exc))
            return
        if last is None or not last.finished:
            # The engine dropped the request without a final output; finish it here so that
            # consumers never wait forever.
            final = RequestOutput.ended(
                sub.request_id, len(sub.prompt_ids), sub.num_output_tokens, FINISH_ABORT
            )
            self._record(sub, final)
            self._queue.put_nowait((sub, final))

    def _record(self, sub: SubRequest, out: RequestOutput) -> None:
        sub.num_prompt_tokens = out.num_prompt_tokens
        sub.num_cached_tokens = out.num_cached_tokens
        sub.num_output_tokens = out.num_output_tokens
        self._metrics.on_output(out, count_prompt=sub.counts_prompt)
        if out.finished:
            sub.finished = True
            _log_finished(out)


def _as_client_error(exc: Exception) -> Exception:
    # The engine raises ValueError for requests it cannot take; RequestTooLongError (also a
    # ValueError) and the others have their own handlers.
    if isinstance(exc, ValueError) and not isinstance(exc, RequestTooLongError):
        return bad_request(str(exc))
    return exc


def _log_finished(out: RequestOutput) -> None:
    t = out.times
    ttft = t.first_token - t.arrival if t and t.first_token is not None else None
    total = t.finished - t.arrival if t and t.finished is not None else None
    logger.info(
        "request %s finished: prompt_tokens=%d completion_tokens=%d ttft=%s total=%s reason=%s",
        out.request_id,
        out.num_prompt_tokens,
        out.num_output_tokens,
        "-" if ttft is None else f"{ttft:.3f}s",
        "-" if total is None else f"{total:.3f}s",
        out.finish_reason,
    )


async def run_unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits `awaitable`; if the client disconnects first, cancels it and raises
    ClientDisconnect. (The body has been read by then, so the next ASGI message is the
    disconnect.)"""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.done():
        return work.result()
    raise ClientDisconnect()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(
    request: Request,
    group: GenerationGroup,
    *,
    stream: bool,
    events: Callable[[], AsyncIterator[str]],
    build: Callable[[dict[int, ChoiceResult]], BaseModel],
) -> Response:
    """Starts the group, then streams `events()` or answers with `build(results)` as JSON."""
    await run_unless_disconnected(request, group.start())
    if stream:
        return SSEResponse(events(), on_close=group.close)
    try:
        results = await run_unless_disconnected(request, group.collect())
    finally:
        group.close()
    failed = next((r for r in results.values() if r.finish_reason == FINISH_ERROR), None)
    if failed is not None:
        raise APIError(500, f"Generation failed: {failed.error or 'engine error'}", code=500)
    if any(r.finish_reason == FINISH_ABORT for r in results.values()):
        # Only the engine stopping aborts a request whose client still listens: a truncated
        # 200 would pass for a whole answer.
        message = "The server is shutting down: the request was aborted before it finished"
        raise APIError(503, message, code="server_shutdown")
    # pydantic serializes a -inf logprob as null, where json.dumps would fail.
    body = await server_state(request).off_loop(lambda: build(results).model_dump_json())
    return Response(body, media_type="application/json")


async def stream_events(
    group: GenerationGroup,
    *,
    prelude: list[str],
    chunk: Callable[[SubRequest, RequestOutput], str | None],
    usage_chunk: Callable[[Usage], str] | None,
) -> AsyncIterator[str]:
    """SSE frames: `prelude`, a chunk per engine output (unless `chunk` has nothing to send),
    the usage chunk, then [DONE].
    A failure mid-stream becomes an error event (the 200 status is already sent)."""
    try:
        for frame in prelude:
            yield frame
        async for sub, out in group.outputs():
            if out.finish_reason == FINISH_ERROR:
                error = APIError(500, f"Generation failed: {out.error or 'engine error'}", code=500)
                yield sse.event(json.dumps(error.body()))
                break
            frame = chunk(sub, out)
            if frame is not None:  # None: nothing to send yet (text held back)
                yield sse.event(frame)
        else:
            if usage_chunk is not None:
                yield sse.event(usage_chunk(group.usage()))
    except Exception as exc:
        logger.error("stream failed", exc_info=exc)
        error = APIError(
            500, f"Generation failed ({type(exc).__name__}); see the server log", code=500
        )
        yield sse.event(json.dumps(error.body()))
    yield sse.DONE
