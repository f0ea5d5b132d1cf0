"""Run an ASGI app under a real uvicorn server on a free local port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from fastapi import FastAPI


@contextlib.contextmanager
def run_server(app: FastAPI, *, wait_ready: bool = True, timeout_s: float = 30.0) -> Iterator[str]:
    """Serves `app` on 127.0.0.1 in a background thread and yields its base URL
    ("http://127.0.0.1:PORT"). With wait_ready, first waits until /health answers 200.

    The socket is bound here and handed to uvicorn, so no other process can take the port
    between choosing and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            wait_until_ready(base_url, timeout_s=deadline - time.monotonic())
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def wait_until_ready(base_url: str, *, timeout_s: float = 30.0) -> None:
    """Polls GET /health until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{base_url}/health", timeout=5).status_code
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"/health still answers {status} after {timeout_s:.0f}s")
        time.sleep(0.02)


def sse_payloads(lines: Iterator[str]) -> Iterator[str]:
    """The data payloads of a server-sent-event stream, "[DONE]" included."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]
