"""The embedded default model (Gemma 3 270M, base) served by our own engine writes real text."""

from __future__ import annotations

import pytest
from gemma_serve.model.default_model import DEFAULT_MODEL_NAME
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams


@pytest.mark.slow
def test_default_model_completes_capitals() -> None:
    engine = LLMEngine(EngineConfig(device="cpu", kv_cache_memory=64 << 20, max_model_len=512))
    assert engine.model_name == DEFAULT_MODEL_NAME
    cfg = engine.loaded.config
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == 512
    prompts = [
        "The capital of France is Paris. The capital of Germany is",
        "Berlin is the capital of",
    ]
    results = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    assert results[0].text.startswith(" Berlin"), results[0].text
    assert results[1].text.startswith(" Germany"), results[1].text
    # Batched and alone agree on the real model too.
    alone = engine.generate(prompts[1:], SamplingParams(max_tokens=8, temperature=0.0))
    assert alone[0].token_ids == results[1].token_ids


@pytest.mark.slow
def test_int8_perplexity_is_within_one_percent_of_the_exact_path() -> None:
    """The fidelity bound of --quantization int8 (benchmarks/quant_fidelity.py measures it
    over 20,000 tokens), checked over 2,048 tokens of the same text: the default model's
    perplexity in int8 within 1% of the exact fp32 path's."""
    from benchmarks.quant_fidelity import perplexity, reference_tokens

    ppl = {}
    for mode in ("none", "int8"):
        cfg = EngineConfig(
            device="cpu", quantization=mode, kv_cache_memory=64 << 20, max_model_len=1100
        )
        engine = LLMEngine(cfg)
        tokens = reference_tokens(engine.tokenizer, 2048)
        ppl[mode] = perplexity(engine, tokens, 1024, engine.tokenizer.bos_id)
        del engine
    assert 5 < ppl["none"] < 50, ppl  # a real model on English text
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01, ppl
