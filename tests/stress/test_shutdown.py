"""SIGTERM while requests stream: the real CLI process drains them and exits 0, promptly.

tests/test_server_cli.py checks one stream of the fake engine; here the real CLI process
serves the tiny checkpoint with the real engine, several streaming and non-streaming requests
are in flight when SIGTERM arrives, and each must end cleanly (no client hangs) with its exact
greedy text, the listener must close to new connections, and the process must exit 0 in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server_helpers import wait_until_ready
from tests.stress.clients import Outcome, async_client, bounded, call
from tests.stress.workload import Oracle, Spec

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # importing torch and loading the checkpoint, on a busy machine
EXIT_TIMEOUT_S = 45.0  # the CLI's grace period (30 s) plus the engine's stop
SPECS = [  # long enough to still be streaming when the signal lands
    Spec(False, "The quick brown fox", 200),
    Spec(True, "What is the capital of France?", 180),
    Spec(False, "Write a short poem about the sea", 160),
    Spec(True, "Hello, world!", 200),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(checkpoint: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "gemma_serve.server.cli",
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
    ]
    command += ["--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_port(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the port opens only once the interpreter has imported everything
        try:
            wait_until_ready(url, timeout_s=max(1.0, deadline - time.monotonic()))
            return
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


async def terminate_mid_stream(
    url: str, proc: subprocess.Popen[bytes]
) -> tuple[list[Outcome], float]:
    """Starts every request, sends SIGTERM once all are in flight, and collects them; returns
    the outcomes and when the signal was sent."""
    jobs = [(spec, stream) for spec in SPECS for stream in (True, False)]
    started = [asyncio.Event() for _ in jobs]
    async with async_client(url, len(jobs)) as client:
        tasks = [
            asyncio.create_task(call(client, spec, stream=stream, started=event))
            for (spec, stream), event in zip(jobs, started, strict=True)
        ]
        await bounded(asyncio.gather(*(e.wait() for e in started)), 60.0)
        await asyncio.sleep(0.05)  # the non-streaming ones reach the engine too
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        return await bounded(asyncio.gather(*tasks), EXIT_TIMEOUT_S), signalled


def listener_closes(url: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_mid_stream_drains_requests_and_exits_0(
    checkpoint: Path, oracle: Oracle, tmp_path: Path
) -> None:
    expected = oracle.expected(SPECS)
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(checkpoint, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(proc, url, log)
        outcomes, signalled = asyncio.run(terminate_mid_stream(url, proc))
        drained = time.monotonic() - signalled
        assert listener_closes(url)
        code = proc.wait(timeout=EXIT_TIMEOUT_S)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print(
        f"\nshutdown: SIGTERM with {len(outcomes)} requests in flight; all drained in "
        f"{drained:.1f}s, exit {code} after {exited:.1f}s"
    )
    assert code == 0, log.read_text()[-3000:]
    for outcome in outcomes:
        outcome.check(expected[outcome.spec])
        if outcome.stream:  # the signal landed mid-stream, and the stream went on to its end
            assert outcome.event_times[0] < signalled < outcome.event_times[-1]
