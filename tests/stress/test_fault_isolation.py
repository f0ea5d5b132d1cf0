"""A request that makes the engine raise fails alone; the others and the server carry on.

The fault is injected through the engine's sampler or its forward pass: a wrapper raises
whenever a request whose prompt holds the "<table>" token has produced two tokens. After a
sampling fault the engine re-samples the batch request by request; after a forward fault the
batch's requests recompute and retry alone (Scheduler.recover). Either way it fails only that
request. Over HTTP it must end with a 500 and an OpenAI error body (non-streaming) or an SSE
error event then [DONE] (streaming), while every request in flight beside it completes with its
exact greedy result.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from gemma_serve.server.app import create_app
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.request import Request

from tests.engine_helpers import tiny_engine
from tests.faults import Faults, fail_forward, fail_sampling
from tests.server_helpers import run_server
from tests.stress.clients import Outcome, async_client, bounded, call, finished_requests, wait_idle
from tests.stress.workload import Oracle, Spec, make_specs

MAGIC = "<table>"  # one token of the tiny vocabulary that the normal prompts never contain
FAIL_AFTER_TOKENS = 2
ERROR_FIELDS = {"message", "type", "param", "code"}


def marked(magic_id: int) -> Callable[[Sequence[Request]], bool]:
    """A batch holding a marked request that has produced FAIL_AFTER_TOKENS tokens."""
    return lambda batch: any(
        magic_id in r.prompt_ids and len(r.output_ids) >= FAIL_AFTER_TOKENS for r in batch
    )


def install_sampler_fault(engine: AsyncEngine, magic_id: int) -> Faults:
    return fail_sampling(engine.engine, marked(magic_id))


def install_forward_fault(engine: AsyncEngine, magic_id: int) -> Faults:
    return fail_forward(engine.engine, marked(magic_id))


async def run_all(url: str, jobs: list[tuple[Spec, bool]]) -> list[Outcome]:
    async with async_client(url, len(jobs)) as client:
        calls = [call(client, spec, stream=stream, include_usage=True) for spec, stream in jobs]
        return await bounded(asyncio.gather(*calls), 120.0)


def check_failed(outcome: Outcome, expected_text: str) -> None:
    """The culprit: an OpenAI-shaped error, after (streaming) a correct start."""
    assert outcome.error is not None and set(outcome.error) == ERROR_FIELDS, outcome
    assert "Generation failed" in outcome.error["message"], outcome.error
    assert outcome.error["type"] == "InternalServerError"
    if outcome.stream:
        assert outcome.status == 200 and outcome.done and outcome.events[-1] == "[DONE]"
        assert '"error"' in outcome.events[-2] and outcome.finish_reason is None
        assert expected_text.startswith(outcome.text)  # the tokens before the fault were right
    else:
        assert outcome.status == 500 and not outcome.done


@pytest.mark.parametrize("install", [install_sampler_fault, install_forward_fault])
def test_an_engine_fault_fails_only_its_request(checkpoint: Path, oracle: Oracle, install) -> None:
    normal = make_specs(random.Random(9), 12, max_words=12, max_tokens=(6, 14))
    culprits = [Spec(chat, f"Hello {MAGIC} world", 10) for chat in (False, True)]
    expected = oracle.expected(normal + culprits)
    engine = AsyncEngine(tiny_engine(checkpoint))
    (magic_id,) = engine.tokenizer.encode(MAGIC, add_bos=False)
    faults = install(engine, magic_id)
    jobs = [(s, i % 2 == 0) for i, s in enumerate(normal)]
    jobs[3:3] = [(c, stream) for c in culprits for stream in (True, False)]
    with run_server(create_app(lambda: engine)) as url:
        outcomes = asyncio.run(run_all(url, jobs))
        for outcome in outcomes:
            if outcome.spec in culprits:
                check_failed(outcome, expected[outcome.spec].text)
            else:
                outcome.check(expected[outcome.spec])
        # Still serving, correctly: the same prompts again, one at a time.
        again = asyncio.run(run_all(url, [(normal[0], False), (normal[1], True)]))
        for outcome in again:
            outcome.check(expected[outcome.spec])
        reasons = finished_requests(wait_idle(url))
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    print(
        f"\nfault isolation: {len(jobs)} requests in flight, {len(culprits) * 2} failed by "
        f"{len(faults.raised)} injected faults ({faults.batched} in a shared batch); "
        f"finished: {reasons}"
    )
    assert reasons["error"] == len(culprits) * 2
    assert reasons["stop"] + reasons["length"] == len(normal) + len(again)
    assert faults.batched > 0  # the isolation path ran, not just lone failures
