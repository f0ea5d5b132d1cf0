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
