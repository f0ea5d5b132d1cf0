"""Speculative decoding (ngram) on a tiny Gemma 2: it never changes what is generated.

Every check compares an engine with --speculative-config against the same engine without it
(fp32, exact): greedy tokens identical alone, in a crowd, in chunked prefill, under
preemption, with prefix-cache hits and far past the sliding window; seeded sampling token
for token; unseeded sampling by a chi-square test of the output distribution; stops inside
accepted runs. Each check also asserts that drafts were both accepted and rejected, so that
both paths ran.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.spec_config import SpeculativeConfig

from tests.engine_helpers import tiny_checkpoint, tiny_engine

SPEC = SpeculativeConfig(
    "ngram", num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1
)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
Z_999 = 3.09  # the standard normal's 0.999 quantile


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unscaled weights: outputs that repeat in places and wander in others, so n-gram drafts
    # are both accepted and rejected.
    return tiny_checkpoint(tmp_path_factory.mktemp("spec"), seed=11, qk_scale=1, embed_scale=1)


@pytest.fixture(scope="module")
def prompts(checkpoint: Path) -> list[list[int]]:
    """Prompts that repeat a short pattern (n-grams to look up), of 5 to 40 tokens."""
    vocab = tiny_engine(checkpoint).loaded.config.vocab_size
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (5, 9, 14, 20, 27, 33, 40):
        pattern = torch.randint(4, vocab, (n % 5 + 2,), generator=g).tolist()
        out.append([2] + (pattern * 40)[: n - 1])
    return out


@pytest.fixture(scope="module")
def expected(checkpoint: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt served alone without speculation."""
    engine = tiny_engine(checkpoint)
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def spec_engine(checkpoint: Path, spec: SpeculativeConfig = SPEC, **overrides) -> LLMEngine:
    return tiny_engine(checkpoint, speculative_config=spec, **overrides)


def run_counting(
    engine: LLMEngine, prompts, params: SamplingParams | list[SamplingParams] = GREEDY
) -> tuple[list[list[int]], int, int]:
    """Token ids per prompt (all in one crowd), and the draft tokens verified and accepted
    over the run. params: one for all, or one per prompt."""
    ids = [f"r{i}" for i in range(len(prompts))]
    each = params if isinstance(params, list) else [params] * len(prompts)
    for rid, p, sp in zip(ids, prompts, each, strict=True):
        engine.add_request(rid, p, sp)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    drafts = accepted = 0
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        stats = engine.stats()
        drafts, accepted = drafts + stats.num_draft_tokens, accepted + stats.num_accepted_tokens
        assert stats.num_accepted_tokens == sum(stats.accepted_per_position)
    return [tokens[rid] for rid in ids], drafts, accepted


def assert_both_paths(drafts: int, accepted: int) -> None:
    assert 0 < accepted < drafts, (drafts, accepted)


def test_greedy_alone_equals_no_speculation(checkpoint, prompts, expected) -> None:
    engine = spec_engine(checkpoint)
    total = [0, 0]
    for p, e in zip(prompts, expected, strict=True):
        got, drafts, accepted = run_counting(engine, [p])
        assert got == [e], f"prompt of {len(p)} tokens"
        total = [total[0] + drafts, total[1] + accepted]
    assert_both_paths(*total)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # a crowd of 7 in one batch
        {"max_num_batched_tokens": 6},  # chunked prefill beside verification chunks
        {"block_size": 2, "max_num_batched_tokens": 13},  # rings of small blocks, odd chunks
        {"kv_cache_memory": 96 << 10},  # preemption: not all fit
    ],
    ids=["crowd", "chunked", "block2", "preemption"],
)
def test_greedy_crowd_equals_no_speculation(checkpoint, prompts, expected, overrides) -> None:
    engine = spec_engine(checkpoint, **overrides)
    got, drafts, accepted = run_counting(engine, prompts)
    assert got == expected
    assert_both_paths(drafts, accepted)
    if "kv_cache_memory" in overrides:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def test_prefix_cache_hits_keep_outputs_exact(checkpoint, prompts, expected) -> None:
    engine = spec_engine(checkpoint)
    first, _, _ = run_counting(engine, prompts)
    again, drafts, accepted = run_counting(engine, prompts)  # their prompt blocks are cached
    assert first == again == expected
    assert engine.kv.num_cached_tokens > 0
    assert_both_paths(drafts, accepted)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_ring_wrap_around_with_rejections(checkpoint, prompts, block_size) -> None:
    # 48 tokens past an 8-token window; k = 5 drafts a step, many rejected.
    spec = replace(SPEC, num_speculative_tokens=5)
    params = replace(GREEDY, max_tokens=48)
    base = tiny_engine(checkpoint, block_size=block_size)
    want = [base.generate([p], params)[0].token_ids for p in prompts[1:3]]
    engine = spec_engine(checkpoint, spec, block_size=block_size)
    ring = engine.layout.ring_blocks
    assert ring == -(-(8 - 1 + 5) // block_size) + 1  # R = ceil((window - 1 + k) / B) + 1
    got, drafts, accepted = run_counting(engine, prompts[1:3], params)
    assert got == want
    assert_both_paths(drafts, accepted)


def test_seeded_sampling_equals_no_speculation_token_for_token(checkpoint, prompts) -> None:
    # Every sampler option at once; each seeded request draws the noise it would draw
    # without speculation, so its tokens (and logprobs) are the same, in any crowd.
    params = SamplingParams(
        max_tokens=24,
        temperature=0.05,
        top_k=20,
        top_p=0.95,
        min_p=0.02,
        repetition_penalty=1.05,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        logit_bias=((7, 2.0),),
        min_tokens=3,
        logprobs=2,
    )
    each = [replace(params, seed=s) for s in range(len(prompts))]
    want = [r.token_ids for r in tiny_engine(checkpoint).generate(prompts[:1], each[0])]
    base, _, _ = run_counting(tiny_engine(checkpoint), prompts, each)
    assert base[0] == want[0]  # seeded: the same alone and in the crowd
    engine = spec_engine(checkpoint)
    got, drafts, accepted = run_counting(engine, prompts, each)
    assert got == base
    assert_both_paths(drafts, accepted)
    one = engine.generate(prompts[:1], each[0])[0]  # logprobs of the run's tokens
    assert [lp.token_id for lp in one.logprobs] == one.token_ids == want[0]
    ref = tiny_engine(checkpoint).generate(prompts[:1], each[0])[0]
    for a, b in zip(one.logprobs, ref.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def chi2_critical(dof: int) -> float:
    """The chi-square distribution's 0.999 quantile (Wilson-Hilferty: within 1% from 3 dof,
    a little above the true value below: 11.16 for 10.83 at 1 dof)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + Z_999 * c**0.5) ** 3


def chi_square(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square statistic over the categories seen, and its degrees of freedom."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for key in keys:
        total = a[key] + b[key]
        for count, n in ((a[key], na), (b[key], nb)):
            want = total * n / (na + nb)
            stat += (count - want) ** 2 / want
    return stat, len(keys) - 1


def test_unseeded_sampling_has_the_distribution_of_no_speculation(checkpoint, prompts) -> None:
    # top_k = 2: two outcomes per position given the ones before. The first three tokens and
    # the first two jointly, counted over 256 requests with and without speculation, compared
    # by chi-square at p = 0.001 (engine seeds fixed: the test is deterministic).
    params = SamplingParams(max_tokens=6, temperature=1.0, top_k=2, ignore_eos=True)
    outputs = []
    drafts = accepted = 0
    for spec in (None, SPEC):
        engine = tiny_engine(checkpoint, speculative_config=spec, seed=5, max_num_seqs=64)
        got, d, a = run_counting(engine, [prompts[1]] * 256, params)
        outputs.append(got)
        drafts, accepted = drafts + d, accepted + a
    assert_both_paths(drafts, accepted)
    for position in range(3):
        counts = [Counter(t[position] for t in out) for out in outputs]
        stat, dof = chi_square(*counts)
        assert dof >= 1 and stat < chi2_critical(dof), (position, stat, counts)
    pairs = [Counter(tuple(t[:2]) for t in out) for out in outputs]  # the joint of two
    stat, dof = chi_square(*pairs)
    assert dof >= 1 and stat < chi2_critical(dof), (stat, pairs)


def test_stops_inside_accepted_runs(checkpoint, prompts, expected) -> None:
    engine, base = spec_engine(checkpoint), tiny_engine(checkpoint)
    tokenizer = engine.tokenizer
    for p, e in zip(prompts[:4], expected[:4], strict=True):
        cases = [
            replace(GREEDY, stop_token_ids=(e[5],)),
            replace(GREEDY, stop_token_ids=(e[5],), min_tokens=8),
            replace(GREEDY, max_tokens=7),
            replace(GREEDY, stop=(tokenizer.decode(e[4:6]),)),
            replace(GREEDY, stop=(tokenizer.decode(e[4:6]),), include_stop_str_in_output=True),
        ]
        for params in cases:
            want = base.generate([p], params)[0]
            got = engine.generate([p], params)[0]
            assert (got.token_ids, got.text, got.finish_reason) == (
                want.token_ids,
                want.text,
                want.finish_reason,
            ), params
    assert engine.kv.usage().global_ratio == 0.0


def test_disable_by_batch_size(checkpoint, prompts, expected) -> None:
    engine = spec_engine(checkpoint, replace(SPEC, disable_by_batch_size=3))
    got, drafts, _ = run_counting(engine, prompts[:4])  # 4 running: no step speculates
    assert got == expected[:4] and drafts == 0
    got, drafts, accepted = run_counting(engine, prompts[:3])
    assert got == expected[:3]
    assert_both_paths(drafts, accepted)
