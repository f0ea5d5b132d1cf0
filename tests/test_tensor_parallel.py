"""Tensor parallelism on CPU (Gloo, 2 ranks): the engine split over two processes serves what
one process serves.

Each reference is the same checkpoint served by one rank (TP=1, --quantization none); the TP=2
engine must give the same greedy tokens and logprobs within 1e-4 (the row-parallel sums add
the same products in another order). One TP=2 engine per model is spawned for the module.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from gemma_serve.model.config import ModelConfig
from gemma_serve.model.shard_plan import ShardingError, ShardPlan
from gemma_serve.server.engine import tp_wire
from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.errors import EngineDeadError
from gemma_serve.server.engine.kv_cache import CacheLayout
from gemma_serve.server.engine.llm_engine import GenerationResult, LLMEngine
from gemma_serve.server.engine.prompt_logprobs import PromptScoring
from gemma_serve.server.engine.runner import ModelBatch
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.test_spec_decode import SPEC, run_counting
from tests.tp_helpers import child_pids, tiny_gemma3_checkpoint, truncate_last_tensor, wait_gone

LENGTHS = [1, 3, 8, 9, 17, 31, 50, 70, 100]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
ATOL = 1e-4
# 80 KiB: at TP=2 (one KV head per rank) 80 global blocks of 2 tokens: the longest request
# (110 tokens) fits alone, all of them together do not (preemptions).
CROWDED = dict(block_size=2, max_num_batched_tokens=13, kv_cache_memory=80 << 10)


def tp_engine(checkpoint: Path, **overrides) -> LLMEngine:
    return tiny_engine(
        checkpoint, **{"quantization": "none", "tensor_parallel_size": 2, **overrides}
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 2: 4 query heads over 2 KV heads (one per rank), vocabulary 400, tied head."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tp"), seed=11)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[LLMEngine]:
    engine = tp_engine(checkpoint, **CROWDED)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[2] + torch.randint(4, 400, (n - 1,), generator=g).tolist() for n in LENGTHS]


def one_rank(checkpoint: Path, prompts, params=GREEDY, **overrides) -> list[GenerationResult]:
    """Each prompt served alone by one rank."""
    engine = tiny_engine(checkpoint, quantization="none", **overrides)
    return [engine.generate([p], params)[0] for p in prompts]


def assert_same(got: list[GenerationResult], want: list[GenerationResult]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason == "length"
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=ATOL)


def test_crowd_with_chunks_ring_wrap_and_preemption_equals_one_rank(engine, checkpoint, prompts):
    """Prompts up to 100 tokens through a window of 8 (rings of 5 two-token blocks wrap many
    times, and decodes run past the window), prefilled in chunks of at most 13 tokens, all at
    once in a cache too small for them all."""
    want = one_rank(checkpoint, prompts)
    assert len({tuple(r.token_ids) for r in want}) == len(prompts)  # not one degenerate answer
    before = engine.scheduler.num_preemptions
    assert_same(engine.generate(prompts, GREEDY), want)
    assert engine.scheduler.num_preemptions > before
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def test_each_rank_caches_only_its_kv_heads(engine, checkpoint) -> None:
    """The same byte budget holds twice the blocks at TP=2: each rank stores 1 of 2 KV heads."""
    single = tiny_engine(checkpoint, quantization="none", **CROWDED)
    assert single.layout.num_global_blocks == 40
    assert engine.layout.num_global_blocks == 80
    assert tuple(engine.runner.cache.layers[0][0].shape) == (80 * 2, 1, 16)


def test_prefix_cache_hits_equal_one_rank(engine, checkpoint) -> None:
    g = torch.Generator().manual_seed(5)
    shared = [2] + torch.randint(4, 400, (40,), generator=g).tolist()
    family = [shared + torch.randint(4, 400, (k,), generator=g).tolist() for k in (1, 7, 20)]
    want = one_rank(checkpoint, family, enable_prefix_caching=False)
    cached = engine.kv.num_cached_tokens
    assert_same([engine.generate([p], GREEDY)[0] for p in family], want)
    assert engine.kv.num_cached_tokens - cached >= 2 * 40 - 2 * 2  # later ones hit the prefix


def test_prompt_logprobs_in_chunks_equal_one_rank(engine, checkpoint, prompts) -> None:
    """Echo scoring: rows of every chunk go through the gathered LM head on both ranks."""
    params = replace(GREEDY, max_tokens=2, prompt_logprobs=3)
    chosen = prompts[-3:]
    single = tiny_engine(checkpoint, quantization="none")
    want, got = {}, {}
    for name, eng in (("one", single), ("two", engine)):
        store = want if name == "one" else got
        for i, p in enumerate(chosen):
            eng.add_request(f"{name}{i}", p, params)
        while eng.has_work:
            for out in eng.step():
                if out.prompt_logprobs is not None:
                    store[out.request_id[len(name) :]] = out.prompt_logprobs
    assert set(got) == set(want) == {"0", "1", "2"}
    for key, rows in want.items():
        assert len(got[key]) == len(rows) == len(chosen[int(key)])
        for a, b in zip(got[key][1:], rows[1:], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_gemma3_single_kv_head_replicated_untied_odd_vocab(tmp_path: Path) -> None:
    """Gemma 3 with one KV head (each rank keeps a copy), a separate LM head, and a
    vocabulary of 401 rows (shards of 201 and 200 + one pad row)."""
    ckpt = tiny_gemma3_checkpoint(
        tmp_path / "g3",
        seed=4,
        num_key_value_heads=1,
        vocab_size=401,
        tie_word_embeddings=False,
        qk_scale=8.0,
        embed_scale=20.0,
    )
    cfg = ModelConfig.from_file(ckpt)
    plans = [ShardPlan.build(cfg, r, 2) for r in range(2)]
    assert [(p.kv_heads, p.kv_head_start) for p in plans] == [(1, 0), (1, 0)]
    assert [(p.vocab_start, p.vocab_rows, p.vocab_shard) for p in plans] == [
        (0, 201, 201),
        (201, 200, 201),
    ]
    g = torch.Generator().manual_seed(9)
    family = [[2] + torch.randint(4, 400, (n,), generator=g).tolist() for n in (4, 20, 60)]
    want = one_rank(ckpt, family, block_size=2, max_num_batched_tokens=13)
    engine = tp_engine(ckpt, block_size=2, max_num_batched_tokens=13)
    try:
        assert_same(engine.generate(family, GREEDY), want)
    finally:
        engine.close()


def test_a_rank_that_fails_to_load_is_reported_by_rank_0(checkpoint, tmp_path: Path) -> None:
    """Only rank 1 reads the truncated tail of the embedding (rows 200-399): rank 0 raises
    with rank 1's message, and rank 1's process is gone."""
    broken = truncate_last_tensor(checkpoint, tmp_path / "broken", "model.embed_tokens.weight", 8)
    before = set(child_pids(os.getpid()))
    with pytest.raises(RuntimeError) as info:
        tp_engine(broken)
    message = str(info.value)
    assert message.startswith("tensor-parallel rank 1 failed to start (load): ")
    assert "model.embed_tokens.weight: file truncated" in message
    assert wait_gone(sorted(set(child_pids(os.getpid())) - before), 10) == []


def test_models_that_do_not_split_are_refused(checkpoint: Path) -> None:
    cfg = ModelConfig.from_file(checkpoint)
    with pytest.raises(ShardingError, match="does not divide num_attention_heads"):
        ShardPlan.build(cfg, 0, 3)
    with pytest.raises(ShardingError, match="must be a multiple of num_key_value_heads"):
        ShardPlan.build(replace(cfg, num_attention_heads=12, num_key_value_heads=3), 0, 4)
    with pytest.raises(ValueError, match="--quantization int8 cannot be sharded"):
        tp_engine(checkpoint, quantization="int8")


def test_a_hung_rank_fails_the_step_within_the_timeout(checkpoint: Path) -> None:
    """Rank 1 stopped (SIGSTOP): rank 0's collective gives up after --distributed-timeout
    and the engine is dead; closing it kills the hung rank."""
    engine = tp_engine(checkpoint, distributed_timeout=2.0)
    rank1 = engine.loaded.workers.children[1]  # type: ignore[union-attr]
    try:
        os.kill(rank1.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor parallelism failed"):
            engine.generate([[2, 5, 6]], GREEDY)
        assert time.monotonic() - started < 2.0 + 5.0
        with pytest.raises(EngineDeadError):
            engine.check_alive()
    finally:
        os.kill(rank1.pid, signal.SIGCONT)
        engine.close()
    assert rank1.poll() is not None


def test_step_messages_round_trip_without_pickle() -> None:
    """What rank 1 reads is the batch rank 0 sent (bar the requests); junk is refused."""
    pools = {
        PoolKind.GLOBAL: PoolBatch(
            torch.tensor([8, 9, -1]), torch.tensor([[4, 2], [7, 0]], dtype=torch.int32), 0, 4
        ),
        PoolKind.LOCAL: PoolBatch(
            torch.tensor([1, 2, 3]), torch.tensor([[1, 0], [3, 5]], dtype=torch.int32), 3, 4
        ),
    }
    i32 = partial(torch.tensor, dtype=torch.int32)
    attention = AttentionBatch(1, i32([9]), i32([0, 2]), i32([5]), pools, max_prefill_len=2)
    scoring = PromptScoring((1,), (77,), (3,), ())
    sent = ModelBatch(
        torch.tensor([11, 12, 13]), torch.tensor([8, 5, 6]), attention, torch.tensor([0, 2]), (),
        scoring,
    )  # fmt: skip
    got = tp_wire.read(tp_wire.step_message(sent), torch.device("cpu")).batch
    assert got is not None and got.scoring == scoring and got.sampling_requests == ()
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(sent, name))
    a = got.attention
    assert (a.num_decodes, a.max_prefill_len) == (1, 2)
    for name in ("seq_lens", "cu_seqlens", "context_lens"):
        assert torch.equal(getattr(a, name), getattr(attention, name))
    for kind, pool in pools.items():
        assert torch.equal(a.pools[kind].slot_mapping, pool.slot_mapping)
        assert torch.equal(a.pools[kind].block_tables, pool.block_tables)
        assert a.pools[kind].block_tables.dtype == torch.int32
        assert (a.pools[kind].ring_blocks, a.pools[kind].block_size) == (pool.ring_blocks, 4)
    layout = CacheLayout(10, 20, 4, 3, "bfloat16")
    assert tp_wire.read(tp_wire.start_message(layout), torch.device("cpu")).layout == layout
    assert tp_wire.read(tp_wire.stop_message(), torch.device("cpu")).kind == "stop"
    with pytest.raises(tp_wire.WireError):
        tp_wire.read(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk", torch.device("cpu"))


def test_ngram_speculation_across_ranks(checkpoint: Path) -> None:
    """Verification chunks (last token + drafts) go to every rank like prefill chunks, and the
    other ranks' rings take rank 0's size for k drafts: greedy tokens equal one rank's
    without speculation."""
    g = torch.Generator().manual_seed(5)
    prompts = []
    for n in (6, 13, 21):
        pattern = torch.randint(4, 400, (n % 5 + 2,), generator=g).tolist()
        prompts.append([2] + (pattern * 20)[: n - 1])
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = one_rank(checkpoint, prompts, params, block_size=2)
    engine = tp_engine(checkpoint, block_size=2, speculative_config=SPEC)
    try:
        got, drafts, accepted = run_counting(engine, prompts, params)
    finally:
        engine.close()
    assert got == [w.token_ids for w in want]
    assert 0 < accepted <= drafts, (drafts, accepted)
