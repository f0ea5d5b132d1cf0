"""Load with disconnects: 200 mixed requests at 48 in flight, twice, against the tiny engine.

Every request is greedy with ignore_eos, so its text is known: each one that was not walked
away from must equal the same prompt served alone offline. Afterwards the engine must be idle
with both KV pools empty, every request must be counted once in the metrics, and a second
identical round must not grow the process's memory (a per-request leak - a queue, a detokenizer,
a sampler generator, a metrics entry left behind - would show there).
"""

from __future__ import annotations

import asyncio
import gc
import random
from dataclasses import dataclass
from pathlib import Path

from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.request import Request

from tests.engine_helpers import tiny_engine
from tests.server_helpers import run_server
from tests.stress.clients import (
    Outcome,
    async_client,
    bounded,
    call,
    finished_requests,
    rss_bytes,
    scrape,
    wait_idle,
)
from tests.stress.workload import Expected, Oracle, Spec, make_specs

REQUESTS = 200  # per round
CONCURRENCY = 48
DISCONNECT_SHARE = 0.2
DISTINCT_SPECS = 16
ROUND_TIMEOUT_S = 180.0
# 128 global blocks (512 tokens) for up to 32 running requests of up to ~60 tokens: the cache,
# not max_num_seqs, is the limit at times, so preemption runs alongside the disconnects.
KV_BUDGET = 384 << 10
# Round 2 repeats round 1 exactly; allocator noise (the arenas of 5 threads: engine, uvicorn,
# the 2 off-loop workers, the client; torch's caching of activation buffers for new batch
# shapes) stays within ~20 MB (16.1 MiB seen once), while any leaked KV/logits tensor adds far
# more. A leak per request (one detokenizer state, one asyncio.Queue of outputs) is caught by
# the object count, the sharper check.
RSS_GROWTH_BOUND = 32 << 20
OBJECT_GROWTH_BOUND = 1_000  # gc-tracked objects: 5 per request of the round


@dataclass(frozen=True)
class Job:
    spec: Spec
    stream: bool
    include_usage: bool
    leave_after_events: int | None  # streaming clients that walk away mid-stream
    give_up_after_s: float | None  # non-streaming clients that give up (cancel)


def plan(rng: random.Random, specs: list[Spec]) -> list[Job]:
    jobs = []
    for _ in range(REQUESTS):
        spec, stream = rng.choice(specs), rng.random() < 0.5
        leave = give_up = None
        if rng.random() < DISCONNECT_SHARE:
            if stream:  # the role chunk (chat) or a token or two, then gone
                leave = rng.randint(1, 1 + spec.max_tokens // 2)
            else:
                give_up = rng.uniform(0.02, 0.5)
        jobs.append(Job(spec, stream, rng.random() < 0.5, leave, give_up))
    return jobs


async def run_round(url: str, jobs: list[Job]) -> list[Outcome]:
    gate = asyncio.Semaphore(CONCURRENCY)
    async with async_client(url, CONCURRENCY) as client:

        async def one(job: Job) -> Outcome:
            async with gate:
                return await call(
                    client,
                    job.spec,
                    stream=job.stream,
                    leave_after_events=job.leave_after_events,
                    give_up_after_s=job.give_up_after_s,
                    include_usage=job.include_usage,
                )

        return await bounded(asyncio.gather(*(one(j) for j in jobs)), ROUND_TIMEOUT_S)


def check_round(
    outcomes: list[Outcome], expected: dict[Spec, Expected], url: str, before: dict[str, float]
) -> dict[str, float]:
    """Asserts the round's results and metrics; returns its figures."""
    served = [o for o in outcomes if not o.disconnected]
    for o in served:
        o.check(expected[o.spec])
    after = wait_idle(url)
    reasons_before, reasons_after = finished_requests(before), finished_requests(after)
    delta = {k: reasons_after[k] - reasons_before.get(k, 0.0) for k in reasons_after}
    disconnects = len(outcomes) - len(served)
    # Every request the engine saw is counted once: each served one as stop/length, each one
    # walked away from as abort (or stop/length if it finished first). Only a non-streaming
    # client that gave up before its request reached the engine may leave no count at all.
    gave_up = sum(o.disconnected and not o.stream for o in outcomes)
    total = sum(delta.values())
    assert len(outcomes) - gave_up <= total <= len(outcomes), delta
    assert delta["stop"] + delta["length"] >= len(served), delta
    assert delta["error"] == 0 and delta["abort"] <= disconnects, delta
    preemptions = after["gemma_serve_preemptions_total"] - before["gemma_serve_preemptions_total"]
    return {
        "served": len(served),
        "disconnects": disconnects,
        "aborted": delta["abort"],
        "preemptions": preemptions,
    }


def memory() -> tuple[int, int, int]:
    """RSS, gc-tracked objects, and engine Request objects still alive."""
    gc.collect()
    objects = gc.get_objects()
    return rss_bytes(), len(objects), sum(type(o) is Request for o in objects)


def test_load_with_disconnects_serves_exact_results_and_leaks_nothing(
    checkpoint: Path, oracle: Oracle
) -> None:
    rng = random.Random(20250101)
    specs = make_specs(rng, DISTINCT_SPECS, max_tokens=(2, 14))
    expected = oracle.expected(specs)
    jobs = plan(rng, specs)
    engine = AsyncEngine(tiny_engine(checkpoint, kv_cache_memory=KV_BUDGET))
    with run_server(create_app(lambda: engine)) as url:
        rounds = []
        for _ in range(2):
            before = scrape(url)
            outcomes = asyncio.run(run_round(url, jobs))
            figures = check_round(outcomes, expected, url, before)
            rounds.append((figures, memory()))
    for i, (figures, (rss, objects, requests)) in enumerate(rounds, 1):
        print(
            f"\nload round {i}: {REQUESTS} requests, {CONCURRENCY} in flight: "
            f"served={figures['served']:.0f} disconnects={figures['disconnects']:.0f} "
            f"aborted={figures['aborted']:.0f} preemptions={figures['preemptions']:.0f} "
            f"rss={rss / 2**20:.1f} MiB gc_objects={objects} live_requests={requests}"
        )
    (_, (rss1, objects1, _)), (_, (rss2, objects2, requests2)) = rounds
    planned = sum(j.leave_after_events is not None or j.give_up_after_s is not None for j in jobs)
    print(
        f"load: {planned} clients per round planned to walk away; memory growth round 1 -> 2: "
        f"rss {(rss2 - rss1) / 2**20:+.1f} MiB, gc objects {objects2 - objects1:+d}"
    )
    # A client may finish before it meant to leave (a fast server), but most must really leave.
    assert all(f["disconnects"] >= planned / 2 for f, _ in rounds), planned
    assert requests2 == 0
    assert rss2 - rss1 < RSS_GROWTH_BOUND
    assert objects2 - objects1 < OBJECT_GROWTH_BOUND
