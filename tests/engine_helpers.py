"""Tiny engines for tests: a random Gemma 2 checkpoint plus a test-trained tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine

from tests.model_helpers import make_gemma2
from tests.tokenizer_helpers import train_tiny_tokenizer


def tiny_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A HF directory (config.json, model.safetensors, tokenizer.model) of a tiny Gemma 2.

    The model's vocabulary is the tokenizer's, so every generated id detokenizes.
    """
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    tok_dir = path / "_tok"
    tok_dir.mkdir(exist_ok=True)
    shutil.copy(train_tiny_tokenizer(tok_dir), path / "tokenizer.model")
    shutil.rmtree(tok_dir)
    vocab = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).vocab_size()
    make_gemma2(path, seed=seed, **{"vocab_size": vocab, **overrides})
    return path


def tiny_engine(checkpoint: Path, **overrides: Any) -> LLMEngine:
    args: dict[str, Any] = dict(
        model=str(checkpoint),
        device="cpu",
        block_size=4,
        max_num_seqs=32,
        max_num_batched_tokens=64,
        kv_cache_memory=4 << 20,
    )
    args.update(overrides)
    return LLMEngine(EngineConfig(**args))


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (EOS not special: exactly n tokens)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
