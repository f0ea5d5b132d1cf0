"""Server settings and the per-app state routes reach through `request.app.state.server`."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gemma_serve.server.engine_client import EngineClient
from gemma_serve.server.errors import APIError
from gemma_serve.server.limits import MAX_BODY_BYTES
from gemma_serve.server.metrics import Metrics
from gemma_serve.server.response_store import ResponseStore
from starlette.requests import Request

API_KEY_ENV = "GEMMA_SERVE_API_KEY"
# Threads for tokenization, templating and JSON of big bodies. Few, so that however many huge
# prompts arrive at once, the event loop competes with at most this many threads for the GIL.
CPU_WORKERS = 2
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """HTTP-side settings (the engine's live in EngineConfig)."""

    api_key: str | None = None  # None: $GEMMA_SERVE_API_KEY; neither: no authentication
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_origins: tuple[str, ...] = ()  # CORS is off unless origins are given
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (vLLM's flag)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class ServerState:
    """The engine (once loaded), the metrics and the settings of one app."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: EngineClient | None = None
        self.load_error: BaseException | None = None
        self.loader: threading.Thread | None = None  # builds the engine; see app._load_engine
        # Bytes of the longest token: len(text) / this bounds a prompt's token count from below.
        self.max_token_bytes: int | None = None
        self.responses = ResponseStore()  # /v1/responses with store: true
        self._workers = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="gemma-serve-cpu")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the CPU worker threads, so that the event loop keeps serving."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._workers, functools.partial(fn, *args))

    def close_workers(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def require_engine(self) -> EngineClient:
        """The engine, or a 503 while it loads (or if it failed to load or has stopped)."""
        if self.engine is None:
            if self.load_error is not None:
                message = f"The model failed to load: {self.load_error}"
                raise APIError(503, message, code="model_load_failed")
            raise APIError(503, "The model is still loading; retry shortly", code="model_loading")
        if not self.engine.is_running:
            raise APIError(503, "The engine has stopped", code="engine_dead")
        return self.engine


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state
