"""Draft-model speculation on tiny Gemma 2 checkpoints sharing one tokenizer: outputs equal
decoding without speculation (fp32, exact) alone, in a crowd, chunked, under preemption and
with prefix-cache hits; the target as its own draft accepts every draft token."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.spec_config import SpeculativeConfig
from safetensors.torch import load_file, save_file

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.test_spec_decode import assert_both_paths, run_counting

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("target"), seed=11, qk_scale=1, embed_scale=1)


@pytest.fixture(scope="module")
def near_draft(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target's weights with noise: agrees with it often, not always."""
    path = tmp_path_factory.mktemp("near")
    for f in ("config.json", "tokenizer.model", "generation_config.json"):
        if (target / f).exists():
            shutil.copy(target / f, path / f)
    g = torch.Generator().manual_seed(0)
    weights = load_file(str(target / "model.safetensors"))
    noisy = {k: w + 0.1 * w.std() * torch.randn(w.shape, generator=g) for k, w in weights.items()}
    save_file(noisy, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def small_draft(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random model, 2 layers, with the target's tokenizer."""
    path = tiny_checkpoint(
        tmp_path_factory.mktemp("small"), seed=5, qk_scale=1, embed_scale=1, num_hidden_layers=2
    )
    shutil.copy(target / "tokenizer.model", path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def prompts(target: Path) -> list[list[int]]:
    vocab = tiny_engine(target).loaded.config.vocab_size
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (5, 14, 27, 40):
        pattern = torch.randint(4, vocab, (n % 5 + 2,), generator=g).tolist()
        out.append([2] + (pattern * 40)[: n - 1])
    return out


@pytest.fixture(scope="module")
def expected(target: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = tiny_engine(target)
    return [engine.generate([p], PARAMS)[0].token_ids for p in prompts]


def draft_engine(target: Path, draft: Path, k: int = 3, **overrides):
    spec = SpeculativeConfig("draft_model", k, model=str(draft))
    return tiny_engine(target, speculative_config=spec, **overrides)


def test_the_target_as_its_own_draft_accepts_every_draft_token(target, prompts, expected):
    engine = draft_engine(target, target)
    got, drafts, accepted = run_counting(engine, prompts, PARAMS)
    assert got == expected
    assert drafts > 0 and accepted == drafts


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_num_batched_tokens": 6},  # a crowd, its prompts prefilled in chunks
        {"block_size": 2, "kv_cache_memory": 128 << 10},  # small blocks, preemption
    ],
    ids=["chunked", "preemption"],
)
def test_greedy_equals_no_speculation(target, near_draft, prompts, expected, overrides):
    engine = draft_engine(target, near_draft, **overrides)
    got, drafts, accepted = run_counting(engine, prompts, PARAMS)
    assert got == expected
    assert_both_paths(drafts, accepted)
    if "kv_cache_memory" in overrides:
        assert engine.scheduler.num_preemptions > 0
    engine.speculator.drafts([])  # requests gone: their draft state is freed
    assert engine.speculator.kv.usage().global_ratio == 0.0


def test_alone_past_the_window_and_with_prefix_cache_hits(target, near_draft, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    base = tiny_engine(target)
    want = [base.generate([p], params)[0].token_ids for p in prompts[1:3]]
    engine = draft_engine(target, near_draft, k=4)
    for p, w in zip(prompts[1:3], want, strict=True):
        assert run_counting(engine, [p], params)[0] == [w]
    again, drafts, accepted = run_counting(engine, prompts[1:3], params)  # cached prompts
    assert again == want
    assert_both_paths(drafts, accepted)
    assert engine.kv.num_cached_tokens > 0 and engine.speculator.kv.num_cached_tokens > 0


def test_a_different_small_draft_keeps_outputs_and_seeded_sampling_exact(
    target, small_draft, prompts, expected
):
    engine = draft_engine(target, small_draft)
    got, drafts, _ = run_counting(engine, prompts, PARAMS)
    assert got == expected and drafts > 0
    each = [SamplingParams(max_tokens=12, temperature=0.05, seed=s) for s in range(len(prompts))]
    want, _, _ = run_counting(tiny_engine(target), prompts, each)
    assert run_counting(engine, prompts, each)[0] == want


def test_a_draft_with_another_vocabulary_is_refused(target, tmp_path: Path) -> None:
    other = tiny_checkpoint(tmp_path / "other", seed=1, vocab_size=300)
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        draft_engine(target, other)


def test_a_drafting_fault_only_turns_speculation_off_for_its_step(
    target, near_draft, prompts, expected
):
    engine = draft_engine(target, near_draft)
    forward, calls = engine.speculator.runner.forward, []

    def flaky(batch):
        calls.append(1)
        if len(calls) in (2, 5):
            raise RuntimeError("injected drafting fault")
        return forward(batch)

    engine.speculator.runner.forward = flaky
    got, drafts, accepted = run_counting(engine, prompts, PARAMS)
    assert got == expected
    assert len(calls) > 5 and accepted > 0
