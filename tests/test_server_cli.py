"""The command line: flags -> EngineConfig and settings, and a clean exit on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gemma_serve.server.app import Settings
from gemma_serve.server.cli import ServeOptions, parse_args, serve
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.flags import byte_size

from tests.server_helpers import sse_payloads, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    config, options = parse_args([])
    assert config == EngineConfig() and config.enable_prefix_caching
    assert (options.host, options.port, options.log_level) == ("127.0.0.1", 8000, "info")
    assert options.settings == Settings()


def test_every_flag() -> None:
    flags = (
        "--model gemma-2-9b --served-model-name g9 --host 0.0.0.0 --port 9000 --device cpu "
        "--dtype bfloat16 --max-model-len 4096 --max-num-seqs 8 --max-num-batched-tokens 512 "
        "--block-size 32 --kv-cache-memory 2GiB --kv-cache-dtype bfloat16 "
        "--gpu-memory-utilization 0.5 "
        "--max-queued-requests 10 --api-key k --seed 7 --load-format dummy "
        "--force-reference-kernels --enforce-eager --no-enable-prefix-caching "
        "--allowed-origins http://a,http://b http://c "
        "--log-level debug"
    )
    config, options = parse_args(flags.split())
    assert config == EngineConfig(
        model="gemma-2-9b",
        served_model_name="g9",
        device="cpu",
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        block_size=32,
        kv_cache_memory=2 << 30,
        kv_cache_dtype="bfloat16",
        gpu_memory_utilization=0.5,
        max_queued_requests=10,
        seed=7,
        load_format="dummy",
        force_reference_kernels=True,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    assert (options.host, options.port, options.log_level) == ("0.0.0.0", 9000, "debug")
    assert options.settings.api_key == "k"
    assert options.settings.allowed_origins == ("http://a", "http://b", "http://c")


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_SERVE_API_KEY", "from-env")
    assert parse_args([])[1].settings.api_key == "from-env"


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "tpu"],
        ["--load-format", "pickle"],
        ["--kv-cache-dtype", "fp8"],
        ["--block-size", "3"],
        ["--max-num-seqs", "0"],
        ["--gpu-memory-utilization", "1.5"],
        ["--kv-cache-memory", "lots"],
        ["--port", "70000"],
        ["--no-such-flag"],
    ],
)
def test_invalid_flags_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_byte_sizes() -> None:
    assert byte_size("1048576") == 1 << 20
    assert byte_size("4GiB") == 4 << 30
    assert byte_size("512M") == 512 << 20
    assert byte_size("1.5k") == 1536


def test_failed_engine_load_exits_1() -> None:
    def broken() -> None:
        raise RuntimeError("cannot load")

    options = ServeOptions("127.0.0.1", 0, "critical", Settings())
    assert serve(broken, options) == 1  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def fake_server_process(step_s: float, options: str = "") -> Iterator[tuple[str, subprocess.Popen]]:
    """`serve` over the fake engine in a subprocess (so SIGTERM is real); yields (url, proc)."""
    port = free_port()
    script = textwrap.dedent(
        f"""
        import sys
        from gemma_serve.server.app import Settings
        from gemma_serve.server.cli import ServeOptions, serve
        from tests.fake_engine import FakeEngine
        options = ServeOptions("127.0.0.1", {port}, "warning", Settings(){options})
        sys.exit(serve(lambda: FakeEngine(step_s={step_s}), options))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:  # the port opens only once the interpreter has started
            try:
                wait_until_ready(url, timeout_s=60.0)
                break
            except httpx.ConnectError:
                assert proc.poll() is None
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_through_sigterm(url: str, proc: subprocess.Popen, max_tokens: int) -> list[str]:
    """SSE payloads of a completion stream that gets SIGTERM after its first event."""
    body = {"prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        payloads = sse_payloads(r.iter_lines())
        next(payloads)
        proc.send_signal(signal.SIGTERM)
        return list(payloads)


def test_sigterm_finishes_in_flight_requests_and_exits_0() -> None:
    with fake_server_process(step_s=0.01) as (url, proc):
        rest = stream_through_sigterm(url, proc, 40)
        assert rest[-1] == "[DONE]" and len(rest) == 40  # 39 more outputs, then [DONE]
        assert proc.wait(timeout=30) == 0


def test_streams_still_running_when_the_grace_ends_close_cleanly() -> None:
    """A stream that would outlast the shutdown grace (2 s here) is aborted just before it
    ends: it gets its last chunk and [DONE] instead of a connection cut mid-chunk."""
    with fake_server_process(step_s=0.05, options=", grace_s=2.0") as (url, proc):
        signalled = time.monotonic()
        rest = stream_through_sigterm(url, proc, 250)
        assert time.monotonic() - signalled < 10  # not the 12 s the stream would take
        assert rest[-1] == "[DONE]" and 1 < len(rest) < 250
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] is not None
        assert proc.wait(timeout=30) == 0
