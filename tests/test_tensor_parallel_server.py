"""Tensor parallelism behind HTTP (CPU, Gloo, 2 ranks): the answers of one rank, and what a
failed rank or SIGTERM does to the server and its processes.

The `gemma-serve` processes run in their own session, and every test kills that whole group
on the way out, so that no rank outlives a failing test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.server_helpers import run_server, sse_payloads, wait_until_ready
from tests.test_server_cli import free_port
from tests.tp_helpers import child_pids, wait_gone

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [2, 7], [2] + list(range(60, 95))]
EXIT_S = 60  # a failed or stopped server is gone within this (a step, the grace, the ranks)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tp-http"), seed=31)


def start_cli(checkpoint: Path, *extra: str) -> subprocess.Popen:
    """`gemma-serve --tensor-parallel-size 2 ...` in its own process group."""
    argv = [
        *("--model", str(checkpoint), "--device", "cpu", "--quantization", "none"),
        *("--tensor-parallel-size", "2", "--block-size", "4", "--max-num-batched-tokens", "16"),
        *("--kv-cache-memory", "4MiB", "--log-level", "warning", *extra),
    ]
    script = "import sys; from gemma_serve.server.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *argv], cwd=ROOT, env=env, start_new_session=True
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def tp_server(checkpoint: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """The server (rank 0) on a free port; yields (url, proc); kills its group at the end."""
    port = free_port()
    proc = start_cli(checkpoint, "--port", str(port), *extra)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:  # the port opens only once the interpreter has started
            try:
                wait_until_ready(url, timeout_s=120.0)
                break
            except httpx.ConnectError:
                assert proc.poll() is None, "the server exited while starting"
                time.sleep(0.1)
        yield url, proc
    finally:
        kill_group(proc)


def one_rank(checkpoint: Path, max_tokens: int):
    engine = tiny_engine(checkpoint, quantization="none", block_size=4)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    return [engine.generate([p], params)[0] for p in PROMPTS]


def complete(url: str, prompt: list[int], **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_serves_what_one_rank_serves_then_sigterm_stops_every_rank(checkpoint: Path) -> None:
    want = one_rank(checkpoint, 8)
    with tp_server(checkpoint) as (url, proc):
        ranks = child_pids(proc.pid)
        assert len(ranks) == 1  # rank 1; rank 0 is the server itself
        for prompt, w in zip(PROMPTS, want, strict=True):
            choice = complete(url, prompt, logprobs=1).json()["choices"][0]
            assert choice["text"] == w.text
            got = choice["logprobs"]["token_logprobs"]
            assert got == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                events = [p for p in sse_payloads(r.iter_lines()) if p != "[DONE]"]
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events) == w.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_S) == 0
        assert wait_gone(ranks, 10) == []


def test_a_killed_rank_fails_requests_and_the_server_exits_1(checkpoint: Path) -> None:
    with tp_server(checkpoint) as (url, proc):
        (rank1,) = child_pids(proc.pid)
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            payloads = sse_payloads(r.iter_lines())
            next(payloads)
            os.kill(rank1, signal.SIGKILL)
            rest = list(payloads)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == 500
        assert "tensor-parallel rank 1 exited with status -9" in error["message"]
        assert len(rest) < 200
        assert proc.wait(timeout=EXIT_S) == 1
        assert wait_gone([rank1], 10) == []


def test_in_flight_requests_fail_and_health_turns_503(checkpoint: Path) -> None:
    """In process: after rank 1 dies, a running stream ends with an error event, a
    non-streaming request gets 500, /health and new requests 503, and the app hears of it."""
    failures: list[BaseException] = []
    engine = AsyncEngine(tiny_engine(checkpoint, quantization="none", tensor_parallel_size=2))
    rank1 = engine.engine.loaded.workers.children[1]  # type: ignore[union-attr]
    try:
        with run_server(create_app(lambda: engine, on_fatal_error=failures.append)) as url:
            body = {"prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True}
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                payloads = sse_payloads(r.iter_lines())
                next(payloads)
                rank1.kill()
                rest = list(payloads)
            assert json.loads(rest[-2])["error"]["code"] == 500
            deadline = time.monotonic() + 10
            while not failures and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(failures) == 1
            assert "tensor-parallel rank 1 exited with status -9" in str(failures[0])
            health = httpx.get(f"{url}/health", timeout=10)
            assert health.status_code == 503
            assert health.json()["error"]["code"] == "engine_dead"
            assert complete(url, PROMPTS[1]).status_code == 503
    finally:
        engine.engine.close()
    assert rank1.poll() is not None


def test_two_nodes_started_apart_meet_at_the_init_method(checkpoint: Path) -> None:
    """Multi-node on one machine: node 1 (--node-rank 1, no HTTP) and node 0 meet at
    --distributed-init-method; node 0 serves what one rank serves; SIGTERM on node 0 stops
    node 1 too (the stop message), both exit 0."""
    want = one_rank(checkpoint, 8)[0]
    method = ("--distributed-init-method", f"tcp://127.0.0.1:{free_port()}", "--nnodes", "2")
    node1 = start_cli(checkpoint, *method, "--node-rank", "1")
    try:
        with tp_server(checkpoint, *method, "--node-rank", "0") as (url, proc):
            assert child_pids(proc.pid) == []  # rank 1 is node 1's
            choice = complete(url, PROMPTS[0], logprobs=1).json()["choices"][0]
            assert choice["text"] == want.text
            got = choice["logprobs"]["token_logprobs"]
            assert got == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=EXIT_S) == 0
        assert node1.wait(timeout=EXIT_S) == 0
    finally:
        kill_group(node1)
