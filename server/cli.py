"""`gemma-serve`: the command line (DESIGN.md's flags, vLLM's names) -> engine config -> server.

The port opens at once; the engine loads on a background thread while /health answers 503.
SIGTERM (or Ctrl+C) stops accepting requests, lets in-flight ones finish for a grace period,
aborts the rest (their streams still end with a last chunk and [DONE]), stops the engine and
exits 0; while the model is still loading, it exits 0 at once without waiting for the loader.
Connections are guarded by server/connections.py (limit, read deadline, 431) and repeated
warnings are throttled (server/log_throttle.py). The flags themselves are in server/flags.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from gemma_serve.server.app import Settings, create_app
from gemma_serve.server.connections import ConnectionGuard, ConnectionLimits, GuardedH11Protocol
from gemma_serve.server.engine import host_memory
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine_client import EngineClient, EngineProvider
from gemma_serve.server.flags import (
    ENGINE_FLAGS,
    KEEP_ALIVE_S,
    MAX_HEADER_BYTES,
    build_parser,
)
from gemma_serve.server.log_throttle import throttled_logs
from gemma_serve.server.middleware import clean_api_key
from gemma_serve.server.state import ServerState

logger = logging.getLogger("gemma_serve.server.cli")
GRACE_S = 30  # seconds in-flight requests get to finish on shutdown before they are aborted
ABORT_LEAD_S = 3.0  # abort that long before the grace ends, so that streams can still close
FD_HEADROOM = 256  # descriptors kept for model files, the engine, logs and the reserve
LOADER_JOIN_S = 0.5  # a loader still running this long after shutdown is left behind


@dataclass(frozen=True)
class ServeOptions:
    """What the command line decides besides the engine: where and how to serve."""

    host: str
    port: int
    log_level: str
    settings: Settings
    grace_s: float = GRACE_S
    connections: ConnectionLimits = ConnectionLimits()
    timeout_keep_alive: float = KEEP_ALIVE_S
    max_header_bytes: int = MAX_HEADER_BYTES


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineConfig, ServeOptions]:
    """The engine config and serving options; invalid values exit with status 2 (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in ENGINE_FLAGS}
    world = torchrun_world_size()
    if world is not None:  # started by torchrun: its world is the tensor-parallel group
        if given["tensor_parallel_size"] not in (None, world):
            parser.error(f"--tensor-parallel-size must equal torchrun's world size {world}")
        given["tensor_parallel_size"] = world
    try:
        config = EngineConfig(**{k: v for k, v in given.items() if v is not None})
        origins = tuple(o for item in args.allowed_origins for o in item.split(",") if o)
        api_key = clean_api_key(args.api_key) if args.api_key is not None else None
        settings = Settings(
            api_key=api_key,
            allowed_origins=origins,
            enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        )
        limits = ConnectionLimits(args.limit_concurrency, args.timeout_request_read)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if not args.timeout_keep_alive > 0 or args.h11_max_incomplete_event_size < 1024:
        parser.error("--timeout-keep-alive must be > 0 and --h11-max-incomplete-event-size >= 1KiB")
    options = ServeOptions(
        args.host,
        args.port,
        args.log_level,
        settings,
        connections=limits,
        timeout_keep_alive=args.timeout_keep_alive,
        max_header_bytes=args.h11_max_incomplete_event_size,
    )
    return config, options


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when torchrun started this process (its RANK and MASTER_ADDR are set)."""
    env = os.environ
    if {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= env.keys():
        return int(env["WORLD_SIZE"])
    return None


def serves_http(config: EngineConfig) -> bool:
    """Rank 0 serves HTTP; every other rank (torchrun's, or node K > 0's) only runs steps."""
    if torchrun_world_size() is not None:
        return int(os.environ["RANK"]) == 0
    return config.node_rank == 0


def serve(provider: EngineProvider, options: ServeOptions) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status (1 if the engine failed
    to load, 0 otherwise)."""
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal_error(_: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(provider, options.settings, on_fatal_error=on_fatal_error)
    config = uvicorn_config(app, options, _fit_descriptor_limit(options.connections))
    state: ServerState = app.state.server
    server = _Server(config, state, options.grace_s)

    def request_exit(signum: int, frame: object) -> None:
        # Before uvicorn installs its handlers (and after it has restored ours: it re-raises
        # the signal it caught, which by default would end the process with 143, not 0).
        server.should_exit = True

    previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with throttled_logs():
            server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _leave_loader_behind(state, exit_code)
    return exit_code


def uvicorn_config(
    app: FastAPI, options: ServeOptions, limits: ConnectionLimits | None = None
) -> uvicorn.Config:
    """uvicorn's configuration for `app`, its connections guarded by `limits` (default:
    options.connections)."""
    guard = ConnectionGuard(limits or options.connections)
    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=round(options.grace_s),
        http=GuardedH11Protocol.factory(guard),
        loop="uvloop",
        timeout_keep_alive=options.timeout_keep_alive,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=options.max_header_bytes,
    )


def _fit_descriptor_limit(limits: ConnectionLimits) -> ConnectionLimits:
    """Raises the soft limit on open files to what the connection limit needs (up to the hard
    limit), or lowers the connection limit to fit: running out of descriptors takes the
    listener and /health down with it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = limits.max_connections + limits.probe_reserve + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - limits.probe_reserve - FD_HEADROOM)
        logger.warning(
            "--limit-concurrency %d needs %d open files but the limit is %d: serving at most "
            "%d connections",
            limits.max_connections,
            needed,
            soft,
            fitted,
        )
        return dataclasses.replace(limits, max_connections=fitted)
    return limits


def _leave_loader_behind(state: ServerState, exit_code: int) -> None:
    """Exits now if the engine loader is still running (a signal arrived during loading).

    The loader is a daemon thread inside torch: at interpreter exit Python would stop it
    mid-C++ (pthread_exit), which aborts the process with "terminate called without an active
    exception" (status 134). Nothing it holds needs cleaning up, so the process ends here.
    """
    loader = state.loader
    if loader is None or not loader.is_alive():
        return
    loader.join(LOADER_JOIN_S)
    if loader.is_alive():
        logger.info("shut down while the model was loading: exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


class _Server(uvicorn.Server):
    """uvicorn, but the requests still running when the shutdown grace runs out end cleanly.

    At the end of the grace uvicorn cancels the open connections, cutting streams mid-chunk; so
    shortly before, the engine is stopped, which aborts every request in flight: each stream
    then sends its last chunk and [DONE] while its connection is still open.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self._state, self._grace_s = state, grace_s

    async def shutdown(self, sockets: list | None = None) -> None:
        lead = min(ABORT_LEAD_S, self._grace_s / 2)
        ender = asyncio.create_task(self._abort_in_flight(self._grace_s - lead))
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ender.cancel()

    async def _abort_in_flight(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        engine = self._state.engine
        if engine is not None:
            logger.warning("shutdown grace ending: aborting the requests still in flight")
            await engine.shutdown()  # the app's shutdown calls it again: a no-op by then


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `gemma-serve`."""
    config, options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.info("engine configuration: %s", config)
    host_memory.bound_onednn_cache()  # before any GEMM, in every rank's process
    if not serves_http(config):
        from gemma_serve.server.engine.tp_workers import serve_node

        logger.info("a tensor-parallel rank without HTTP: running the steps rank 0 sends")
        return serve_node(config)
    logger.info(
        "serving on http://%s:%d (API key %s, CORS %s)",
        options.host,
        options.port,
        "required" if options.settings.resolved_api_key() else "off",
        ", ".join(options.settings.allowed_origins) or "off",
    )

    def provider() -> EngineClient:
        # Imported here: the engine pulls in torch, which `--help` should not wait for.
        from gemma_serve.server.engine.async_engine import AsyncEngine
        from gemma_serve.server.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        try:
            engine.warm_up()
        except BaseException:
            engine.close()  # tensor-parallel ranks too
            raise
        return AsyncEngine(engine, compile_layers=True)  # serving starts eagerly meanwhile

    return serve(provider, options)


if __name__ == "__main__":
    sys.exit(main())
