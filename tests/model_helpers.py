"""Tiny random Gemma checkpoints written with transformers' save_pretrained (the reference).

Weights are scaled up so that both soft-caps are active: raw attention scores well beyond 50
and final logits well beyond 30 (tests check that turning a cap off changes the logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def _scale_weights(model: torch.nn.Module, qk: float, embed: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(embed)
            elif "norm" in name:  # non-trivial norm weights exercise the (1 + w) form
                p.normal_(0.0, 0.3)


def make_gemma2(
    path: Path, seed: int = 0, qk_scale: float = 40.0, embed_scale: float = 60.0, **overrides: Any
) -> Path:
    """Write a tiny random Gemma 2 checkpoint to `path`; returns `path`."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(**{**TINY, "query_pre_attn_scalar": 16, **overrides})
    cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(cfg).float().eval()
    _scale_weights(model, qk_scale, embed_scale)
    model.save_pretrained(path)
    return path


def make_gemma3(
    path: Path, seed: int = 0, qk_scale: float = 1.0, embed_scale: float = 1.0, **overrides: Any
) -> Path:
    """Write a tiny random Gemma 3 (text) checkpoint; 6 layers: five local, one global."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    args = {**TINY, "num_hidden_layers": 6, "query_pre_attn_scalar": 16, **overrides}
    cfg = Gemma3TextConfig(**args)
    cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(cfg).float().eval()
    _scale_weights(model, qk_scale, embed_scale)
    model.save_pretrained(path)
    return path


def hf_model(path: Path) -> torch.nn.Module:
    """The reference model, eager attention (the only HF path with attention soft-capping)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
