"""A KV cache that holds only two or three requests: preemption and queueing, fairly.

Sixteen requests arrive 0.01 s apart at an engine whose KV budget (64 KiB: 16 blocks of 4 tokens
per pool) cannot hold more than a few of them. Requests must be admitted, preempted (by
recompute) and re-admitted until all finish, each with its exact greedy result, and in roughly
the order they came: the scheduler admits in arrival order and preempts the latest admitted,
so a request can only be overtaken by the few that ran beside it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine

from tests.engine_helpers import tiny_engine
from tests.server_helpers import run_server
from tests.stress.clients import (
    Outcome,
    async_client,
    bounded,
    call,
    parse_metrics,
    scrape,
    wait_idle,
)
from tests.stress.workload import Oracle, Spec, make_specs

KV_BUDGET = 64 << 10  # bytes: 16 global blocks (64 tokens) and 16 local blocks (8 rings)
REQUESTS = 16
ARRIVAL_GAP_S = 0.01
# A request finishing after later arrivals: at most the ones that can run beside it (the
# cache holds about 3) plus one that was admitted while it waited preempted.
MAX_OVERTAKES = 4
TIMEOUT_S = 120.0


@dataclass
class Run:
    outcomes: list[Outcome]
    finished: list[int]  # request indices (= arrival order) in the order they finished
    max_running: float
    max_waiting: float


async def arrive_in_order(url: str, specs: list[Spec]) -> Run:
    """Sends spec i at i * ARRIVAL_GAP_S, watching the running/waiting gauges meanwhile."""
    run = Run([], [], 0.0, 0.0)
    async with async_client(url, len(specs) + 1) as client:

        async def one(i: int, spec: Spec) -> Outcome:
            await asyncio.sleep(i * ARRIVAL_GAP_S)
            outcome = await call(client, spec, stream=i % 2 == 0)
            run.finished.append(i)
            return outcome

        async def watch() -> None:
            while len(run.finished) < len(specs):
                values = parse_metrics((await client.get("/metrics")).text)
                run.max_running = max(run.max_running, values["gemma_serve_requests_running"])
                run.max_waiting = max(run.max_waiting, values["gemma_serve_requests_waiting"])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        jobs = asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
        run.outcomes = await bounded(jobs, TIMEOUT_S)
        await bounded(watcher, 5.0)
    return run


def overtakes(finished: list[int]) -> list[int]:
    """For each request (by arrival), how many later arrivals finished before it."""
    position = {i: p for p, i in enumerate(finished)}
    return [sum(position[j] < position[i] for j in position if j > i) for i in sorted(position)]


def test_requests_are_preempted_queued_and_all_complete_in_order(
    checkpoint: Path, oracle: Oracle
) -> None:
    specs = make_specs(random.Random(5), REQUESTS, max_words=6, max_tokens=(12, 20))
    expected = oracle.expected(specs)
    engine = AsyncEngine(tiny_engine(checkpoint, kv_cache_memory=KV_BUDGET))
    layout = engine.engine.layout
    longest = max(len(s.engine_input(engine.tokenizer)[0]) + s.max_tokens for s in specs)
    assert layout.num_global_blocks * layout.block_size // longest <= 3  # the cache is the limit
    with run_server(create_app(lambda: engine)) as url:
        started = time.monotonic()
        run = asyncio.run(arrive_in_order(url, specs))
        elapsed = time.monotonic() - started
        metrics = wait_idle(url)
        assert scrape(url)['gemma_serve_requests_total{finished_reason="error"}'] == 0
    for outcome in run.outcomes:
        outcome.check(expected[outcome.spec])
    preemptions = metrics["gemma_serve_preemptions_total"]
    late = overtakes(run.finished)
    print(
        f"\nKV exhaustion: {REQUESTS} requests through {layout.num_global_blocks} global blocks "
        f"in {elapsed:.1f}s: preemptions={preemptions:.0f} max running={run.max_running:.0f} "
        f"max waiting={run.max_waiting:.0f} finish order={run.finished} "
        f"max overtakes={max(late)}"
    )
    assert preemptions > 0 and run.max_waiting > 0
    assert max(late) <= MAX_OVERTAKES, late
