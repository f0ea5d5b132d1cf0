"""The FastAPI app: routes, request gates, error handlers, and the engine's life cycle.

`create_app(engine_provider, settings)` returns an app whose port can open at once: the
lifespan builds the engine on a background thread (loading weights takes a while), /health
answers 503 until it is ready, and the shutdown stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from gemma_serve.server.chat import create_chat_completion
from gemma_serve.server.completions import create_completion
from gemma_serve.server.engine_client import EngineClient, EngineProvider
from gemma_serve.server.errors import APIError, install_error_handlers
from gemma_serve.server.metrics import CONTENT_TYPE, Metrics
from gemma_serve.server.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    clean_api_key,
)
from gemma_serve.server.openapi import install_openapi
from gemma_serve.server.params import chat_prompt, check_model, check_token_ids, encode_prompt
from gemma_serve.server.prompt_bound import longest_token_bytes
from gemma_serve.server.protocol import DetokenizeRequest, TokenizeRequest, parse_request
from gemma_serve.server.responses import create_response, get_response
from gemma_serve.server.state import ServerState, Settings, server_state
from gemma_serve.server.tokenizer_info import get_tokenizer_info
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["Settings", "create_app"]

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 30.0
SERVER_EPOCH = 1735689600  # "created" of the model card: a fixed date (2025-01-01), not load time


def create_app(
    engine_provider: EngineProvider,
    settings: Settings | None = None,
    *,
    on_fatal_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An OpenAI-compatible app around the engine `engine_provider()` builds.

    engine_provider runs on a background thread once the app starts (tests pass
    `lambda: fake_engine`). on_fatal_error is called on the event loop if it raises, or if
    the engine stops by itself later (a tensor-parallel rank failed): the CLI uses it to exit
    non-zero; the app keeps answering 503 otherwise.
    """
    settings = settings or Settings()
    state = ServerState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load_engine(state, engine_provider, on_fatal_error))
        try:
            yield
        finally:
            loader.cancel()
            engine, state.engine = state.engine, None
            if engine is not None:
                # In-flight requests are aborted by the engine; their streams then end.
                await asyncio.wait_for(engine.shutdown(), SHUTDOWN_TIMEOUT_S)
                logger.info("engine stopped")
            state.close_workers()

    app = FastAPI(title="gemma-serve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    for path, endpoint in [
        ("/v1/completions", create_completion),
        ("/v1/chat/completions", create_chat_completion),
        ("/tokenize", tokenize),
        ("/detokenize", detokenize),
        ("/v1/responses", create_response),
    ]:
        app.add_api_route(path, endpoint, methods=["POST"], include_in_schema=True)
        # Served with a trailing slash too: a redirect would turn some clients' POST into GET.
        app.add_api_route(f"{path}/", endpoint, methods=["POST"], include_in_schema=False)
    for path, endpoint in [
        ("/v1/models", list_models),
        ("/v1/models/{model_id:path}", get_model),
        ("/v1/responses/{response_id}", get_response),
        ("/health", health),
        ("/metrics", metrics),
    ]:
        app.add_api_route(path, endpoint, methods=["GET"])
        if path in ("/health", "/v1/models"):  # HEAD too: load balancers and uptime checks
            app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    if settings.enable_tokenizer_info_endpoint:  # vLLM's opt-in: off, the route is a 404
        app.add_api_route("/tokenizer_info", get_tokenizer_info, methods=["GET"])
    # Added last = runs first: CORS preflights, then the size limit, then the key.
    api_key = settings.resolved_api_key()
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=clean_api_key(api_key))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id
    return app


async def _load_engine(
    state: ServerState,
    provider: EngineProvider,
    on_fatal_error: Callable[[BaseException], None] | None,
) -> None:
    """Builds the engine on a daemon thread (so a shutdown while loading does not wait for it),
    then starts it on this event loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[EngineClient] = loop.create_future()

    def settle(engine: EngineClient | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(engine)  # type: ignore[arg-type]

    def work() -> None:
        try:
            engine, error = provider(), None
        except BaseException as exc:  # reported to the loop, which decides what to do
            engine, error = None, exc
        # RuntimeError: the loop closed while loading, the server is gone.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, engine, error)

    started = time.monotonic()
    state.loader = threading.Thread(target=work, name="engine-loader", daemon=True)
    state.loader.start()
    try:
        engine = await done
        state.max_token_bytes = await state.off_loop(longest_token_bytes, engine.tokenizer)
        engine.add_step_listener(state.metrics.on_step)
        if on_fatal_error is not None:
            engine.add_failure_listener(on_fatal_error)
        engine.start()
    except Exception as exc:
        logger.error("engine failed to load: %s", exc, exc_info=exc)
        state.load_error = exc
        if on_fatal_error is not None:
            on_fatal_error(exc)
        return
    state.engine = engine
    logger.info(
        "engine ready in %.1fs: model=%s max_model_len=%d",
        time.monotonic() - started,
        engine.model_name,
        engine.max_model_len,
    )


async def health(request: Request) -> Response:
    """200 once the engine is loaded and running; 503 (with the reason) before or after."""
    server_state(request).require_engine()
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text format; open even when an API key is set."""
    return Response(server_state(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _model_card(name: str, max_model_len: int) -> dict[str, object]:
    return {
        "id": name,
        "object": "model",
        "created": SERVER_EPOCH,
        "owned_by": "gemma-serve",
        "max_model_len": max_model_len,
    }


async def list_models(request: Request) -> Response:
    engine = server_state(request).require_engine()
    card = _model_card(engine.model_name, engine.max_model_len)
    return JSONResponse({"object": "list", "data": [card]})


async def get_model(request: Request, model_id: str) -> Response:
    engine = server_state(request).require_engine()
    check_model(model_id, engine.model_name)
    return JSONResponse(_model_card(engine.model_name, engine.max_model_len))


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a prompt (or chat messages) -> token ids. The parsing, the
    tokenization and the (large) JSON answer run off the event loop."""
    state = server_state(request)
    engine = state.require_engine()
    req = await state.off_loop(parse_request, TokenizeRequest, await request.body())
    check_model(req.model, engine.model_name)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of prompt and messages", param="prompt")
    # JSONResponse renders its body when built: building it off the loop keeps that there.
    return await state.off_loop(_tokenize_response, engine, req)


def _tokenize_response(engine: EngineClient, req: TokenizeRequest) -> JSONResponse:
    """The rules of the generation endpoints: a prompt's control-token strings are parsed
    (BOS first unless add_special_tokens is false); message content never is."""
    tok = engine.tokenizer
    if req.messages is not None:
        tokens = chat_prompt(tok, req.messages, req, bool(req.add_special_tokens))
    else:
        tokens = encode_prompt(tok, req.prompt or "", req.add_special_tokens is not False)
    answer: dict[str, object] = {
        "count": len(tokens),
        "max_model_len": engine.max_model_len,
        "tokens": tokens,
    }
    if req.return_token_strs:
        answer["token_strs"] = [tok.token_text(t) for t in tokens]
    return JSONResponse(answer)


async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: token ids -> text (off the event loop, as /tokenize)."""
    state = server_state(request)
    engine = state.require_engine()
    req = await state.off_loop(parse_request, DetokenizeRequest, await request.body())
    check_model(req.model, engine.model_name)

    def decode() -> JSONResponse:
        tokens = check_token_ids(req.tokens, engine.tokenizer.vocab_size, "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(tokens)})

    return await state.off_loop(decode)
