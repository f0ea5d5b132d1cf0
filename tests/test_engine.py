"""The engine end to end on a tiny Gemma 2: batching, chunked prefill, preemption, rings.

Every scheduling path is checked the same way: greedy tokens served in a crowd equal the tokens
of the request served alone, and transformers' greedy generate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gemma_serve.model.attention import VarlenAttention
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.outputs import FINISH_LENGTH, FINISH_STOP
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import hf_greedy, tiny_checkpoint, tiny_engine
from tests.faults import fail_forward, fail_sampling
from tests.model_helpers import hf_model

N_NEW = 10
LENGTHS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 17, 23, 31, 40, 50, 64, 70, 90, 100]
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def prompts(checkpoint: Path) -> list[list[int]]:
    vocab = tiny_engine(checkpoint).loaded.config.vocab_size
    g = torch.Generator().manual_seed(3)
    return [[2] + torch.randint(4, vocab, (n - 1,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(checkpoint: Path, prompts: list[list[int]]) -> list[list[int]]:
    ref = hf_model(checkpoint)
    return [hf_greedy(ref, p, N_NEW) for p in prompts]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return [r.token_ids for r in engine.generate(prompts, params)]


def test_alone_equals_transformers(checkpoint, prompts, expected) -> None:
    engine = tiny_engine(checkpoint)
    for p, e in zip(prompts, expected, strict=True):
        assert run(engine, [p]) == [e], f"prompt of {len(p)} tokens"


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # 18 requests together, prompts longer than the 64-token budget are chunked
        {"max_num_batched_tokens": 5},  # chunks shorter than the window (8)
        {"max_num_batched_tokens": 24, "block_size": 16},  # chunks longer than window and ring
        {"max_num_batched_tokens": 13, "block_size": 2},  # ring of 4 blocks, odd chunks
    ],
    ids=["budget64", "chunk5", "chunk24-block16", "chunk13-block2"],
)
def test_batched_equals_alone_and_transformers(checkpoint, prompts, expected, overrides) -> None:
    engine = tiny_engine(checkpoint, **overrides)
    assert run(engine, prompts) == expected


def test_preemption_keeps_outputs_exact(checkpoint, prompts, expected) -> None:
    # 160 KiB: 40 blocks of 4 tokens per pool; the longest request (110 tokens) fits alone,
    # all 18 together do not.
    engine = tiny_engine(checkpoint, kv_cache_memory=160 << 10)
    assert engine.layout.num_global_blocks == 40
    assert run(engine, prompts) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def test_prompt_logprobs_equal_transformers_in_chunks_and_preemptions(checkpoint, prompts):
    """Each prompt token's logprob (and top 3) given what precedes it: transformers' values,
    the same whether prefilled at once or in chunks, and computed once across preemptions."""
    ref = hf_model(checkpoint)
    params = replace(GREEDY, max_tokens=4, prompt_logprobs=3)
    chosen = prompts[-6:]  # 50-100 tokens: several chunks each

    def scored(engine: LLMEngine) -> list[tuple]:
        for i, p in enumerate(chosen):
            engine.add_request(f"r{i}", p, params)
        got = {}
        while engine.has_work:
            for out in engine.step():
                if out.prompt_logprobs is not None:
                    assert out.request_id not in got  # sent once
                    got[out.request_id] = out.prompt_logprobs
        return [got[f"r{i}"] for i in range(len(chosen))]

    crowd = tiny_engine(checkpoint, kv_cache_memory=160 << 10, max_num_batched_tokens=24)
    in_crowd = scored(crowd)
    assert crowd.scheduler.num_preemptions > 0
    for p, lps in zip(chosen, in_crowd, strict=True):
        assert len(lps) == len(p) and lps[0] is None
        with torch.no_grad():
            want = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), dim=-1)
        for t in range(1, len(p)):
            assert lps[t].token_id == p[t]
            assert lps[t].logprob == pytest.approx(want[t - 1, p[t]].item(), abs=1e-4)
            top = want[t - 1].topk(3)
            assert [i for i, _ in lps[t].top] == top.indices.tolist()
            assert [v for _, v in lps[t].top] == pytest.approx(top.values.tolist(), abs=1e-4)
    unchunked = scored(tiny_engine(checkpoint, max_num_batched_tokens=256))  # one step each
    for a, b in zip(unchunked, in_crowd, strict=True):
        assert [lp.token_id for lp in a[1:]] == [lp.token_id for lp in b[1:]]
        assert [lp.logprob for lp in a[1:]] == pytest.approx([lp.logprob for lp in b[1:]], abs=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_num_batched_tokens": 13, "block_size": 2},  # chunks longer than the ring
        {"max_num_batched_tokens": 5},  # chunks shorter than the window
        {"kv_cache_memory": 96 << 10},  # preemptions, and cached blocks evicted
    ],
    ids=["budget64", "chunk13-block2", "chunk5", "preempting"],
)
def test_prefix_cache_hits_keep_outputs_exact(checkpoint, overrides) -> None:
    """Prompts that share a 41-token prefix (5 windows): later ones start from its cached
    blocks (global ones, and the ring's last blocks). Tokens and logprobs equal those of each
    request served alone with caching off, whether served one after another, in a crowd, or
    again with everything cached."""
    vocab = tiny_engine(checkpoint).loaded.config.vocab_size
    g = torch.Generator().manual_seed(5)
    shared = [2] + torch.randint(4, vocab, (40,), generator=g).tolist()
    tails = [torch.randint(4, vocab, (k,), generator=g).tolist() for k in (1, 3, 7, 12, 20)]
    family = [shared + t for t in tails] + [shared[:30], shared, shared + tails[2]]
    params = replace(GREEDY, logprobs=2)
    off = tiny_engine(checkpoint, enable_prefix_caching=False, **overrides)
    want = [off.generate([p], params)[0] for p in family]
    assert off.kv.num_cached_tokens == 0

    def check(results) -> None:
        for r, w in zip(results, want, strict=True):
            assert r.token_ids == w.token_ids
            assert [lp.logprob for lp in r.logprobs] == pytest.approx(
                [lp.logprob for lp in w.logprobs], abs=1e-5
            )

    on = tiny_engine(checkpoint, **overrides)
    check([on.generate([p], params)[0] for p in family])  # one after another
    after_sequential = on.kv.num_cached_tokens
    assert after_sequential > 0
    crowd = tiny_engine(checkpoint, **overrides)
    check(crowd.generate(family, params))
    check(crowd.generate(family, params))  # everything cached by now
    assert crowd.kv.num_cached_tokens > 0
    for engine in (on, crowd):
        assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
@pytest.mark.parametrize("budget", [16, 5])
def test_a_local_pool_of_one_ring_serves_long_chunked_prompts(checkpoint, budget, caching):
    """max_num_seqs 1 leaves the local pool exactly one ring: chunks that wrap it overwrite
    blocks in place when no room is left to copy them (a livelock before), the same prompt
    served again still fits, and nothing is preempted."""
    ref = hf_model(checkpoint)
    engine = tiny_engine(
        checkpoint, max_num_seqs=1, max_num_batched_tokens=budget, enable_prefix_caching=caching
    )
    assert engine.layout.num_local_blocks == engine.kv.pools[PoolKind.LOCAL].ring_blocks
    prompt = [2] + list(range(10, 49))  # 40 tokens: five windows
    want = hf_greedy(ref, prompt, 4)
    for attempt in range(2):
        engine.add_request(f"r{attempt}", prompt, replace(GREEDY, max_tokens=4))
        tokens = []
        for _ in range(100):  # a bounded loop: a livelock fails instead of hanging
            tokens += [t for out in engine.step() for t in out.new_token_ids]
            if not engine.has_work:
                break
        assert tokens == want
    assert engine.scheduler.num_preemptions == 0


def test_decode_far_past_the_window_keeps_local_kv_bounded(checkpoint) -> None:
    engine = tiny_engine(checkpoint)
    ref = hf_model(checkpoint)
    prompt = [2, 17, 33]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    engine.add_request("long", prompt, params)
    tokens: list[int] = []
    ring_sizes, global_sizes = set(), []
    while engine.has_work:
        for out in engine.step():
            tokens.extend(out.new_token_ids)
        if engine.scheduler.running:
            ring_sizes.add(len(engine.kv.pools[PoolKind.LOCAL].table("long")))
            global_sizes.append(len(engine.kv.pools[PoolKind.GLOBAL].table("long")))
    assert tokens == hf_greedy(ref, prompt, 60)
    ring = engine.kv.pools[PoolKind.LOCAL]
    assert max(ring_sizes) == ring.ring_blocks == 3  # ceil((window 8 - 1) / block 4) + 1
    assert global_sizes[-1] == -(-(len(prompt) + 59) // 4)


def test_seeded_sampling_is_reproducible_in_any_batch(checkpoint, prompts) -> None:
    # A high temperature flattens the tiny model's peaked distribution: samples differ.
    params = SamplingParams(max_tokens=8, temperature=10.0, seed=1234, ignore_eos=True)
    a = tiny_engine(checkpoint).generate([prompts[5]], params)[0].token_ids
    b = tiny_engine(checkpoint).generate(prompts[3:9], params)[2].token_ids
    c = tiny_engine(checkpoint).generate([prompts[5]], replace(params, seed=99))[0].token_ids
    assert a == b
    assert a != c
    assert len(set(a)) > 1


def test_top_k_one_equals_greedy(checkpoint, prompts, expected) -> None:
    params = SamplingParams(max_tokens=N_NEW, temperature=0.8, top_k=1, ignore_eos=True)
    assert run(tiny_engine(checkpoint), prompts[:6], params) == expected[:6]


def test_logprobs_are_of_the_soft_capped_logits(checkpoint, prompts) -> None:
    engine = tiny_engine(checkpoint)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5)
    prompt = prompts[10]
    engine.add_request("lp", prompt, params)
    outs = []
    while engine.has_work:
        outs += engine.step()
    tokens = [t for o in outs for t in o.new_token_ids]
    lps = [lp for o in outs for lp in o.new_logprobs]
    model = engine.loaded.model
    seq = prompt + tokens
    cu = torch.tensor([0, len(seq)], dtype=torch.int32)
    with torch.no_grad():
        logits = model(torch.tensor(seq), torch.arange(len(seq)), VarlenAttention(model.config, cu))
    ref = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    assert logits.abs().max() <= model.config.final_logit_softcapping
    for i, lp in enumerate(lps):
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-4)
        top_vals, top_ids = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_stop_string_split_across_tokens(checkpoint, prompts) -> None:
    engine = tiny_engine(checkpoint)
    tok = engine.tokenizer
    free = engine.generate(
        [prompts[7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )[0]
    pieces = [tok.decode([t]) for t in free.token_ids]
    # A stop string made of the end of token 3 and the start of token 4.
    k = next(i for i in range(3, 11) if pieces[i] and pieces[i + 1])
    prefix = "".join(pieces[:k])
    stop = pieces[k][-1] + pieces[k + 1][:1]
    cut = (prefix + pieces[k]).find(stop) if stop in prefix + pieces[k] else None
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    res = engine.generate([prompts[7]], params)[0]
    full = free.text
    assert res.finish_reason == FINISH_STOP
    assert res.text == full[: full.find(stop)]
    if cut is None:
        assert len(res.token_ids) == k + 2  # stopped on the token that completed the string


def test_stop_strings_wait_for_min_tokens(checkpoint, prompts) -> None:
    """As in vLLM: a stop string completed before min_tokens does not end the request; the
    first one completed by a token at or past min_tokens does."""
    engine = tiny_engine(checkpoint)
    n, min_tokens = 30, 6
    decode = engine.tokenizer.decode
    for prompt in prompts:  # one whose text has no partial characters (clean prefix decodes)
        free = engine.generate([prompt], replace(GREEDY, max_tokens=n))[0]
        texts = [decode(free.token_ids[:i]) for i in range(n + 1)]
        if "\ufffd" not in texts[n] and len(texts[3].strip()) >= 2:
            break
    stop = texts[3].strip()[-2:]  # completed within the first 3 tokens
    assert stop in texts[min_tokens - 1]
    expected = (texts[n], n)  # no stop string after min_tokens: runs to max_tokens
    for i in range(min_tokens, n + 1):
        at = texts[i].find(stop, max(0, len(texts[i - 1]) - len(stop) + 1))
        if at >= 0:
            expected = (texts[i][:at], i)
            break
    params = replace(GREEDY, max_tokens=n, stop=(stop,), min_tokens=min_tokens)
    res = engine.generate([prompt], params)[0]
    assert (res.text, len(res.token_ids)) == expected
    assert res.token_ids == free.token_ids[: expected[1]]
    assert res.finish_reason == (FINISH_STOP if expected[1] < n else FINISH_LENGTH)


def test_eos_min_tokens_and_logit_bias(checkpoint, prompts) -> None:
    engine = tiny_engine(checkpoint)
    eos = engine.tokenizer.eos_id
    force_eos = SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((eos, 100.0),))
    res = engine.generate([prompts[4]], force_eos)[0]
    assert res.token_ids == [eos] and res.finish_reason == FINISH_STOP and res.text == ""
    delayed = SamplingParams(
        max_tokens=6, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=3
    )
    res = engine.generate([prompts[4]], delayed)[0]
    assert len(res.token_ids) == 4 and res.token_ids[-1] == eos and eos not in res.token_ids[:3]
    ignored = SamplingParams(
        max_tokens=6, temperature=0.0, logit_bias=((eos, 100.0),), ignore_eos=True
    )
    res = engine.generate([prompts[4]], ignored)[0]
    assert res.token_ids == [eos] * 6 and res.finish_reason == FINISH_LENGTH


def test_ids_the_tokenizer_knows_but_the_model_lacks_are_refused(tmp_path: Path) -> None:
    """A model vocabulary smaller than the tokenizer's (as when a preset borrows a larger
    tokenizer): prompt and logit_bias ids past the model's are a ValueError, not a crash."""
    big = tiny_engine(tiny_checkpoint(tmp_path / "full"))
    vocab = big.loaded.config.vocab_size
    engine = tiny_engine(tiny_checkpoint(tmp_path / "small", vocab_size=vocab - 8))
    assert engine.tokenizer.vocab_size == vocab
    with pytest.raises(ValueError, match=rf"prompt token ids out of range \[0, {vocab - 8}\)"):
        engine.add_request("p", [2, vocab - 3], GREEDY)
    biased = replace(GREEDY, logit_bias=((vocab - 3, 5.0),))
    with pytest.raises(ValueError, match=rf"logit_bias token ids out of range \[0, {vocab - 8}\)"):
        engine.add_request("b", [2, 5], biased)
    assert not engine.has_work
    ok = replace(GREEDY, logit_bias=((vocab - 9, 5.0),))
    assert len(engine.generate([[2, 5]], ok)[0].token_ids) == N_NEW


def test_max_model_len_is_bounded_by_what_the_kv_cache_holds(checkpoint) -> None:
    """The model's 256-token context, but a cache that holds one 64-token sequence: the engine
    serves 64 (so a request sized to the context can run); an explicit 256 fails at start."""
    engine = tiny_engine(checkpoint, kv_cache_memory=64 << 10)
    assert engine.kv.max_tokens_that_fit() == 64 < engine.loaded.config.max_position_embeddings
    assert engine.max_model_len == engine.scheduler.max_model_len == 64
    params = replace(GREEDY, max_tokens=64 - 5)
    assert len(engine.generate([[2, 5, 6, 7, 8]], params)[0].token_ids) == 59
    with pytest.raises(ValueError, match="--max-model-len 256 does not fit in the KV cache"):
        tiny_engine(checkpoint, kv_cache_memory=64 << 10, max_model_len=256)
    assert tiny_engine(checkpoint, kv_cache_memory=64 << 10, max_model_len=48).max_model_len == 48


def test_a_cache_without_room_for_one_sequence_fails_at_start(checkpoint) -> None:
    with pytest.raises(ValueError, match="KV cache budget holds no block"):
        tiny_engine(checkpoint, kv_cache_memory=1000)


def test_local_pool_is_sized_by_what_sequences_can_fill(checkpoint) -> None:
    """A context shorter than the window: rings never grow past it, so the local pool keeps
    only that much per sequence and the global pool gets the rest of the budget."""
    budget = 256 << 10
    full = tiny_engine(checkpoint, kv_cache_memory=budget, block_size=2)
    short = tiny_engine(checkpoint, kv_cache_memory=budget, block_size=2, max_model_len=4)
    window, seqs = full.loaded.config.sliding_window, full.config.max_num_seqs
    assert full.layout.num_local_blocks == seqs * window // 2  # a whole ring per sequence
    assert short.layout.num_local_blocks == seqs * 4 // 2
    assert short.layout.num_global_blocks > full.layout.num_global_blocks
    out = short.generate([[2, 5]], replace(GREEDY, max_tokens=2))[0]
    assert out.token_ids == full.generate([[2, 5]], replace(GREEDY, max_tokens=2))[0].token_ids


def test_a_request_id_in_flight_cannot_be_added_again(checkpoint, prompts, expected) -> None:
    engine = tiny_engine(checkpoint)
    engine.add_request("x", prompts[3], GREEDY)
    with pytest.raises(ValueError, match="request id 'x' is already in flight"):
        engine.add_request("x", prompts[5], GREEDY)
    tokens = []
    while engine.has_work:
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == expected[3]
    engine.add_request("x", prompts[5], GREEDY)  # finished ids can be used again


def test_abort_frees_blocks_mid_prefill_and_mid_decode(checkpoint, prompts) -> None:
    engine = tiny_engine(checkpoint, max_num_batched_tokens=16)
    engine.add_request("a", prompts[-1], GREEDY)  # 100 tokens: several chunks
    engine.add_request("b", prompts[2], GREEDY)
    engine.step()
    engine.step()
    assert engine.abort("a").finish_reason == "abort"
    engine.step()
    out = engine.abort("b")
    assert out.finished and out.finish_reason == "abort"
    assert not engine.has_work
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def ids(requests) -> set[str]:
    return {r.request_id for r in requests}


def test_a_sampling_fault_ends_only_its_own_request(checkpoint, prompts, expected) -> None:
    engine = tiny_engine(checkpoint)
    fail_sampling(engine, lambda batch: "offline-2" in ids(batch))
    results = engine.generate(prompts[:5], GREEDY)
    assert results[2].finish_reason == "error" and results[2].token_ids == []
    for i in (0, 1, 3, 4):
        assert results[i].token_ids == expected[i]
    assert engine.kv.usage().global_ratio == 0.0


def test_a_forward_fault_ends_only_its_own_request(checkpoint, prompts, expected) -> None:
    engine = tiny_engine(checkpoint, max_num_batched_tokens=24)  # chunked prefills too
    raised = fail_forward(engine, lambda batch: "offline-2" in ids(batch)).raised
    results = engine.generate(prompts[:6], GREEDY)
    assert results[2].finish_reason == "error" and results[2].token_ids == []
    for i in (0, 1, 3, 4, 5):
        assert results[i].token_ids == expected[i], i
    assert len(raised[0]) > 1 and raised[-1] == {"offline-2"}  # blamed only when alone
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def test_a_transient_forward_fault_loses_nothing(checkpoint, prompts, expected) -> None:
    engine = tiny_engine(checkpoint, max_num_batched_tokens=24)
    batches: list[set[str]] = []  # the batched (not retrying-alone) steps so far

    def fails(batch) -> bool:  # the 2nd and 4th batched steps fail, once each
        if len(batch) > 1:
            batches.append(ids(batch))
            return len(batches) in (2, 4)
        return False

    raised = fail_forward(engine, fails).raised
    results = engine.generate(prompts[:8], GREEDY)
    assert len(raised) == 2
    assert [r.token_ids for r in results] == expected[:8]
    assert all(r.finish_reason == FINISH_LENGTH for r in results)
    assert engine.kv.usage().global_ratio == 0.0 and engine.kv.usage().local_ratio == 0.0


def test_unwritten_cache_slots_are_never_read(checkpoint, prompts, expected) -> None:
    # The cache is allocated uninitialised; poison it so any read of an unwritten slot shows.
    engine = tiny_engine(checkpoint, max_num_batched_tokens=13, block_size=2)
    for k, v in engine.runner.cache.layers:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    assert run(engine, prompts) == expected
