"""Fair prefill end to end on a tiny Gemma 2: a short request beside a long prefill gets its
first token at once, every output stays that of the request served alone, the partial
prefill limits hold in the engine, and an abort of a long prefill lands at the next step."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.scheduler import SchedulerOutput

from tests.engine_helpers import tiny_checkpoint, tiny_engine

LONG_LEN = 2048  # 16 steps of prefill alone at BUDGET
BUDGET = 128  # the default threshold is half of it: 64 tokens
SHORT_LEN = 20
LONG_PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
SHORT_PARAMS = replace(LONG_PARAMS, max_tokens=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("long"), seed=5, max_position_embeddings=2304)


def engine(checkpoint: Path, **overrides: Any) -> LLMEngine:
    args = dict(max_num_batched_tokens=BUDGET, kv_cache_memory=8 << 20) | overrides
    return tiny_engine(checkpoint, **args)


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, vocab, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def prompts(checkpoint: Path) -> dict[str, list[int]]:
    vocab = engine(checkpoint).loaded.config.vocab_size
    return {"long": random_prompt(LONG_LEN, vocab, 1), "short": random_prompt(SHORT_LEN, vocab, 2)}


Served = dict[str, tuple[list[int], list[float]]]  # request id -> tokens, their logprobs


@pytest.fixture(scope="module")
def alone(checkpoint: Path, prompts: dict[str, list[int]]) -> Served:
    """Each request served alone (no other prefill: nothing is capped)."""
    out = {}
    for rid, params in (("long", LONG_PARAMS), ("short", SHORT_PARAMS)):
        (r,) = engine(checkpoint).generate([prompts[rid]], params)
        out[rid] = (r.token_ids, [lp.logprob for lp in r.logprobs])
    return out


def serve_beside(engine: LLMEngine, prompts: dict[str, list[int]]) -> tuple[Served, int]:
    """The long prompt starts alone; the short one arrives after its first step. Returns what
    each got and the steps from the short one's arrival to its first token."""
    got: Served = {"long": ([], []), "short": ([], [])}

    def step() -> None:
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp.logprob for lp in out.new_logprobs or ())

    engine.add_request("long", prompts["long"], LONG_PARAMS)
    step()
    engine.add_request("short", prompts["short"], SHORT_PARAMS)
    waited, steps = 0, 0
    while engine.has_work:
        step()
        steps += 1
        if not waited and got["short"][0]:
            waited = steps
    return got, waited


def assert_same(got: Served, want: Served) -> None:
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens, rid
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4), rid


def test_a_short_request_beside_a_long_prefill_gets_its_first_token_at_once(
    checkpoint, prompts, alone
) -> None:
    got, waited = serve_beside(engine(checkpoint), prompts)
    assert waited == 1  # the step right after its arrival (the bar: within two)
    assert_same(got, alone)
    # The same without the threshold: the short request waits out the whole long prefill.
    got, waited = serve_beside(engine(checkpoint, long_prefill_token_threshold=0), prompts)
    assert waited == LONG_LEN // BUDGET
    assert_same(got, alone)


def count_partial(engine: LLMEngine, peaks: dict[str, int]) -> None:
    """Wrap the scheduler: after each schedule, count the requests a step leaves partially
    prefilled (prompt started, more than one token left), and the long ones among them."""
    sched = engine.scheduler
    inner = sched.schedule

    def schedule(drafts=None) -> SchedulerOutput:
        out = inner(drafts)
        ends = {c.request.request_id: c.end for c in out.chunks}
        partial = long = 0
        for r in sched.running:
            before = r.num_tokens - r.num_computed_tokens
            if r.num_tokens - ends.get(r.request_id, r.num_computed_tokens) > 1:
                partial += 1
                long += sched.prefill.is_long(before)
        peaks["partial"] = max(peaks["partial"], partial)
        peaks["long"] = max(peaks["long"], long)
        return out

    sched.schedule = schedule  # type: ignore[method-assign]


LENGTHS = [160, 20, 120, 9, 70, 3, 100, 12, 30]
CROWD = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
STEP = 32  # tokens a step in the crowd


@pytest.fixture(scope="module")
def crowd_prompts(checkpoint: Path) -> list[list[int]]:
    vocab = engine(checkpoint).loaded.config.vocab_size
    return [random_prompt(n, vocab, 10 + i) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def crowd_alone(checkpoint: Path, crowd_prompts: list[list[int]]) -> list[list[int]]:
    solo = engine(checkpoint, max_num_batched_tokens=STEP)
    return [solo.generate([p], CROWD)[0].token_ids for p in crowd_prompts]


@pytest.mark.parametrize(
    ("threshold", "partial", "long"),
    [
        (None, 2, 1),  # the defaults: a threshold of 16
        (16, 1, 1),
        (24, 2, 1),  # a long prefill capped at 24 leaves 8: 12 and 20 are left partial
        (8, 3, 3),
        (0, 1, 1),  # off: the budget filled in order, one partial at most
    ],
    ids=["defaults", "one-partial", "short-partials", "three-long", "off"],
)
def test_partial_prefill_limits_hold_and_outputs_stay_exact(
    checkpoint, crowd_prompts, crowd_alone, threshold, partial, long
) -> None:
    """Nine prompts of 3-160 tokens at once, 32-token steps: never more requests left
    partially prefilled than the limits (and as many as they allow at some step), and
    every request's tokens those it gets served alone."""
    flags = dict(
        long_prefill_token_threshold=threshold,
        max_num_partial_prefills=partial,
        max_long_partial_prefills=long,
    )
    crowd = engine(checkpoint, max_num_batched_tokens=STEP, **flags)
    peaks = {"partial": 0, "long": 0}
    count_partial(crowd, peaks)
    assert [r.token_ids for r in crowd.generate(crowd_prompts, CROWD)] == crowd_alone
    assert peaks["partial"] == partial  # reached, never exceeded
    assert peaks["long"] == (long if threshold != 0 else 0)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    tokens, last = [], None
    async for out in engine.generate(rid, prompt, params):
        tokens += out.new_token_ids
        last = out
    return tokens, last


def test_an_abort_of_a_long_prefill_takes_effect_at_the_next_step(
    checkpoint, prompts, alone
) -> None:
    """The abort is queued while the 3rd step runs (the step is held until it is): that step
    still has the long prefill, no later one does, and the short request runs on exactly."""
    core = engine(checkpoint)
    steps: list[set[str]] = []
    running, resume = threading.Event(), threading.Event()
    inner = core.scheduler.schedule

    def schedule(drafts=None) -> SchedulerOutput:
        out = inner(drafts)
        steps.append({c.request.request_id for c in out.chunks})
        if len(steps) == 3:
            running.set()
            resume.wait(30)
        return out

    core.scheduler.schedule = schedule  # type: ignore[method-assign]

    async def main():
        served = AsyncEngine(core)
        served.start()
        try:
            long = asyncio.create_task(collect(served, "long", prompts["long"], LONG_PARAMS))
            await asyncio.sleep(0)  # the long request's add is queued first
            short = asyncio.create_task(collect(served, "short", prompts["short"], SHORT_PARAMS))
            assert await asyncio.to_thread(running.wait, 30)
            served.abort("long")
            resume.set()
            return await long, await short
        finally:
            resume.set()
            await served.shutdown()

    (long_tokens, long_last), (short_tokens, short_last) = asyncio.run(main())
    assert "long" in steps[2] and all("long" not in s for s in steps[3:])
    assert len(steps) > 3  # the engine went on with the short request
    assert long_tokens == [] and long_last.finish_reason == "abort"
    assert short_tokens == alone["short"][0] and short_last.finish_reason == "length"
    assert core.kv.usage().global_ratio == 0.0 and not core.has_work
