"""The engine thread behind its asyncio face: concurrency, early close, limits, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gemma_serve.server.engine.async_engine import AsyncEngine
from gemma_serve.server.engine.errors import QueueFullError, RequestTooLongError
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params=GREEDY):
    tokens, text, last = [], [], None
    async for out in engine.generate(rid, prompt, params):
        tokens += out.new_token_ids
        text.append(out.new_text)
        last = out
    return tokens, "".join(text), last


def test_concurrent_requests_match_offline_results(checkpoint: Path) -> None:
    prompts = [[2, 10 + i, 20 + i, 30] * (1 + i % 5) for i in range(12)]
    expected = tiny_engine(checkpoint).generate(prompts, GREEDY)

    async def main():
        engine = AsyncEngine(tiny_engine(checkpoint))
        engine.start()
        try:
            return await asyncio.gather(
                *(collect(engine, f"r{i}", p) for i, p in enumerate(prompts))
            )
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    for (tokens, text, last), exp in zip(results, expected, strict=True):
        assert tokens == exp.token_ids and text == exp.text
        assert last.finished and last.finish_reason == "length" and last.times is not None


def test_closing_the_stream_aborts_and_frees_kv(checkpoint: Path) -> None:
    async def main():
        engine = AsyncEngine(tiny_engine(checkpoint))
        engine.start()
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        gen = engine.generate("long", [2, 5, 6, 7], params)
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not engine.engine.has_work:
                break
        usage = engine.engine.kv.usage()
        await engine.shutdown()
        return engine.engine.has_work, usage

    has_work, usage = asyncio.run(main())
    assert not has_work
    assert usage.global_ratio == 0.0 and usage.local_ratio == 0.0


async def _until(cond, timeout: float = 10.0) -> None:
    """Poll the engine's state (it runs on its own thread) until cond() holds."""
    for _ in range(int(timeout / 0.002)):
        if cond():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


def test_limits_raise_before_the_first_output(checkpoint: Path) -> None:
    async def main():
        engine = AsyncEngine(tiny_engine(checkpoint, max_queued_requests=1, max_model_len=64))
        engine.start()
        try:
            with pytest.raises(RequestTooLongError, match="exceeds the maximum context"):
                await collect(engine, "big", [2] * 60, GREEDY)
            with pytest.raises(ValueError, match="empty"):
                await collect(engine, "empty", [], GREEDY)
            # Fill the queue faster than the engine can admit: the second add must be refused.
            slow = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            engine.engine.scheduler.max_num_seqs = 1
            sched = engine.engine.scheduler
            first = asyncio.create_task(collect(engine, "a", [2, 3], slow))
            await _until(lambda: len(sched.running) == 1)
            second = asyncio.create_task(collect(engine, "b", [2, 3], slow))
            await _until(lambda: len(sched.waiting) == 1)
            with pytest.raises(QueueFullError, match="max-queued-requests"):
                await collect(engine, "c", [2, 3], slow)
            await asyncio.gather(first, second)
        finally:
            await engine.shutdown()

    asyncio.run(main())
