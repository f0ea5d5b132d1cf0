"""Connection hygiene (server/connections.py) under real uvicorn on loopback: idle floods, the
request-read deadline, 431, the connection limit and its /health reserve, keep-alive timeout."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from gemma_serve.server.app import Settings, create_app
from gemma_serve.server.cli import ServeOptions, uvicorn_config
from gemma_serve.server.connections import ConnectionGuard, ConnectionLimits

from tests.fake_engine import FakeEngine
from tests.server_helpers import sse_payloads, wait_until_ready

HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@contextlib.contextmanager
def guarded_server(
    engine: FakeEngine, limits: ConnectionLimits, *, keep_alive_s: float = 5.0
) -> Iterator[tuple[str, ConnectionGuard]]:
    """The app over `engine` behind uvicorn with the guarded protocol, as `gemma-serve` runs
    it; yields (base URL, the guard)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    options = ServeOptions("127.0.0.1", 0, "warning", Settings(), timeout_keep_alive=keep_alive_s)
    config = uvicorn_config(create_app(lambda: engine), options, limits)
    guard: ConnectionGuard = config.http.keywords["guard"]  # type: ignore[union-attr]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        wait_until_ready(url)
        yield url, guard
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def many_files() -> None:
    """Enough descriptors for 2,000 client and 2,000 server sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4600 if hard == resource.RLIM_INFINITY else min(4600, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 4600:
        pytest.skip(f"the hard limit on open files ({hard}) is too low")


def open_idle(url: str, count: int) -> list[socket.socket]:
    """`count` connections: a third send nothing, a third half a head, a third half a body."""
    port = int(url.rsplit(":", 1)[1])
    partial = [b"", HEAD[:30], HEAD + b"content-length: 100\r\n\r\n{"]
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if partial[i % 3]:
            s.sendall(partial[i % 3])
        socks.append(s)
    return socks


def check_serving(url: str) -> None:
    """/health answers 200 within 2 s and a completion still succeeds."""
    started = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert time.monotonic() - started < 2.0
    body = {"prompt": "abc", "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"


@pytest.mark.usefixtures("many_files")
@pytest.mark.parametrize("limit", [2048, 256])
def test_2000_idle_connections_leave_health_and_completions_working(limit: int) -> None:
    """Under the limit all 2,000 are held; over it the longest idle ones make room."""
    with guarded_server(FakeEngine(), ConnectionLimits(limit, 60.0)) as (url, guard):
        socks = open_idle(url, 2000)
        try:
            deadline = time.monotonic() + 20  # the server accepts them in its own time
            while guard.open + guard.evicted < 2000 and time.monotonic() < deadline:
                time.sleep(0.02)
            check_serving(url)
            if limit == 2048:
                assert guard.open >= 2000 and guard.evicted == 0
            else:  # check_serving's connections may have evicted one or two more
                assert 2000 - limit <= guard.evicted <= 2002 - limit and guard.open <= limit
        finally:
            for s in socks:
                s.close()


def read_all(s: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now)."""
    started = time.monotonic()
    s.settimeout(timeout_s)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def error_of(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


def test_slow_or_silent_clients_are_closed_within_the_read_timeout() -> None:
    timeout = 0.5
    with guarded_server(FakeEngine(), ConnectionLimits(64, timeout)) as (url, guard):
        silent, half_head, half_body = open_idle(url, 3)
        data, took = read_all(silent, 5)
        assert data == b"" and took < timeout + 1.0  # nothing asked, nothing answered
        for s in (half_head, half_body):
            data, took = read_all(s, 5)
            status, error = error_of(data)
            assert status == 408 and error["type"] == "RequestTimeoutError"
            assert took < 1.0  # already waited the timeout on the first one
        assert guard.timed_out == 3
        check_serving(url)  # a whole request in time is unaffected


def test_a_kept_alive_connection_closes_after_the_idle_timeout() -> None:
    with guarded_server(FakeEngine(), ConnectionLimits(), keep_alive_s=0.3) as (url, _):
        (s,) = open_idle(url, 1)
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        data, took = read_all(s, 5)
        assert data.startswith(b"HTTP/1.1 200") and b'{"status":"ok"}' in data
        assert 0.2 < took < 1.5


@pytest.mark.parametrize("size", [1 << 20, 20_000])
def test_oversized_headers_get_431(size: int) -> None:
    with guarded_server(FakeEngine(), ConnectionLimits()) as (url, _):
        headers = {"x-padding": "a" * size}
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=headers, timeout=10)
        assert r.status_code == 431, r.text
        error = r.json()["error"]
        assert error["type"] == "RequestHeaderFieldsTooLargeError" and "16384" in error["message"]
        check_serving(url)


def test_at_the_limit_with_every_connection_busy_only_probes_are_answered() -> None:
    """2 connections hold streams; a third gets /health and /metrics but a 503 for work; with
    the reserve (1) held by a silent connection, a new one takes its place."""
    limits = ConnectionLimits(2, 30.0, probe_reserve=1)
    with guarded_server(FakeEngine(step_s=0.05), limits) as (url, guard):
        body = {"prompt": "abc", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with contextlib.ExitStack() as stack:
            streams = []  # kept: a dropped iterator would close its connection
            for _ in range(2):
                r = stack.enter_context(httpx.stream("POST", f"{url}/v1/completions", json=body))
                streams.append(sse_payloads(r.iter_lines()))
                next(streams[-1])  # the stream runs: its connection is busy
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "connection_limit"
            (silent,) = open_idle(url, 1)  # holds the reserve
            (late,) = open_idle(url, 1)
            assert read_all(silent, 5)[0] == b""  # closed to make room
            late.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            data, _ = read_all(late, 5)  # answered, then closed (reserve connections serve one)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"ok"}')
            assert guard.refused == 0 and guard.evicted == 1
            assert all(list(events)[-1] == "[DONE]" for events in streams)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
