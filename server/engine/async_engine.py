"""The engine loop on its own thread, with an asyncio face for the HTTP server.

Requests and aborts cross into the engine thread through a command queue; outputs cross back
with loop.call_soon_threadsafe (once per step) into one asyncio.Queue per request. The event
loop never runs model code, so health checks, metrics and new requests stay responsive during
long steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gemma_serve.server.engine import host_memory
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.errors import EngineDeadError, QueueFullError
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.outputs import FINISH_ERROR, RequestOutput, StepStats
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import CompileResult, StructuredSpec

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, compile_layers: bool = False) -> None:
        """compile_layers: compile the decode layers in the background once started
        (LLMEngine.compile_layers; the server does, tests keep the eager layers)."""
        self.engine = engine
        self._compile_layers = compile_layers
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.max_queued_requests = engine.config.max_queued_requests
        self._commands: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_stats: StepStats | None = None
        self._failure_listeners: list[Callable[[BaseException], None]] = []
        self.failure: EngineDeadError | None = None  # why the engine stopped by itself

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    @property
    def is_running(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def add_failure_listener(self, fn: Callable[[BaseException], None]) -> None:
        """fn(error) is called on the event loop if the engine stops by itself (a
        tensor-parallel rank failed), after every request in flight has got its error."""
        self._failure_listeners.append(fn)

    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        if self._compile_layers:  # from here, not at load: its imports hold the GIL for ~1 s
            self.engine.compile_layers(background=True)

    async def shutdown(self) -> None:
        """Abort whatever is in flight and stop the engine thread.

        The aborts are queued before the stop sentinel, so the engine thread handles them (and
        every waiting consumer gets its final output) before it exits.
        """
        for rid in list(self._queues):
            self.abort(rid)
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        await asyncio.to_thread(self.engine.close)  # stops the other tensor-parallel ranks

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def compile_structured(self, spec: StructuredSpec) -> CompileResult:
        """Compile an output constraint; thread-safe, slow: call it on a worker thread."""
        return self.engine.compile_structured(spec)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; aborts it if the consumer stops early."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.engine.check_request(prompt_ids, params)  # read-only: safe off the engine thread
        # Waiting means queued behind others: requests that free sequence slots will take at
        # once (in the scheduler's queue or still in the command queue) do not count.
        scheduler = self.engine.scheduler
        free_slots = max(0, scheduler.max_num_seqs - len(scheduler.running))
        waiting = max(0, len(scheduler.waiting) + self._commands.qsize() - free_slots)
        if waiting >= self.max_queued_requests:
            raise QueueFullError(
                f"{waiting} requests are waiting (--max-queued-requests {self.max_queued_requests})"
            )
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        self._commands.put(_Add(request_id, list(prompt_ids), params))
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # -- engine thread ----------------------------------------------------------------------

    def _emit(self, *outs: RequestOutput) -> None:
        """Hand outputs to their consumers: one event-loop wake-up for a whole step."""

        def put() -> None:
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

        assert self._loop is not None
        if outs:
            self._loop.call_soon_threadsafe(put)

    def _drain_commands(self, block: bool) -> bool:
        """Handle queued adds and aborts; False once the stop sentinel arrives."""
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while cmd is not None:
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
                except Exception as e:  # rejected late: report on the request's own stream
                    self._emit(
                        RequestOutput.ended(
                            cmd.request_id, len(cmd.prompt_ids), 0, FINISH_ERROR, str(e)
                        )
                    )
            elif isinstance(cmd, _Abort):
                out = self.engine.abort(cmd.request_id)
                if out is not None:
                    self._emit(out)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _run(self) -> None:
        try:
            self._loop_steps()
        except EngineDeadError as exc:
            self._die(exc)
        log.info("engine loop stopped")

    def _die(self, exc: EngineDeadError) -> None:
        """The engine cannot run any more: every request in flight (and every one still in
        the command queue, or arriving now) ends with the error, then the listeners hear."""
        log.error("the engine stopped: %s", exc)
        self.failure = exc
        message = f"the engine stopped: {exc}"
        self._emit(*self.engine.fail_all(message))

        def fail_rest() -> None:  # on the loop: the queues left are requests never added
            for rid, q in self._queues.items():
                q.put_nowait(RequestOutput.ended(rid, 0, 0, FINISH_ERROR, message))
            for fn in self._failure_listeners:
                fn(exc)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(fail_rest)

    def _loop_steps(self) -> None:
        running = True
        while running:
            running = self._drain_commands(block=not self.engine.has_work)
            self.engine.check_alive()
            if running and self.engine.has_work:
                try:
                    self._emit(*self.engine.step())
                except EngineDeadError:
                    raise
                except Exception:  # never let the loop die: the engine fails the batch itself
                    log.exception("unexpected error in the engine loop")
                stats = self.engine.stats()
                if not self.engine.has_work:  # idle now: RSS back to what is in use
                    host_memory.release_free_memory()
            else:
                # No step ran; commands alone (an abort while idle) must still reach the gauges.
                stats = self.engine.stats().without_step_counts()
                if stats == self._last_stats:
                    continue
            self._last_stats = stats.without_step_counts()
            self._publish(stats)

    def _publish(self, stats: StepStats) -> None:
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:
                log.exception("step listener failed")
