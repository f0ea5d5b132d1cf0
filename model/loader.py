"""Weight loading: Hugging Face safetensors (single file or sharded), or random weights.

Peak host memory stays near one copy of the weights: the model is built on the meta device,
materialised empty in the serving dtype, and each checkpoint tensor is read straight into its
place (through a bounded chunk buffer when its dtype or device differs; no mmap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from gemma_serve.model.config import ModelConfig
from gemma_serve.model.gemma import GemmaForCausalLM
from gemma_serve.model.safetensors_stream import iter_entries, read_into
from tqdm import tqdm

PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar for checkpoints over 1 GiB
# Prefixes of the text model's tensors in multimodal Gemma 3 checkpoints (transformers 4.x and
# 5.x layouts), and of their vision parts, which a text server drops.
TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing/unexpected tensors, bad shapes."""


@dataclass(frozen=True)
class _Target:
    """Where a checkpoint tensor goes: a parameter, and the row range of a fused one."""

    param: str
    row_start: int
    row_end: int


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a HF directory: the index's shards, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"no safetensors weights in {model_dir} (only safetensors are loaded)")


def _targets(cfg: ModelConfig) -> dict[str, _Target]:
    """HF tensor name -> destination in our (fused) parameters."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    ffn = cfg.intermediate_size
    hidden = cfg.hidden_size
    out = {
        "model.embed_tokens.weight": _Target("model.embed_tokens.weight", 0, cfg.vocab_size),
        "model.norm.weight": _Target("model.norm.weight", 0, hidden),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _Target("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
            "self_attn.o_proj": ("self_attn.o_proj", 0, hidden),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, ffn),
            "mlp.up_proj": ("mlp.gate_up_proj", ffn, 2 * ffn),
            "mlp.down_proj": ("mlp.down_proj", 0, hidden),
        }
        for src, (dst, a, b) in fused.items():
            out[f"{p}.{src}.weight"] = _Target(f"{p}.{dst}.weight", a, b)
        norms = [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
        for n in norms:
            out[f"{p}.{n}.weight"] = _Target(f"{p}.{n}.weight", 0, hidden)
        if cfg.use_qk_norm:
            for n in ("q_norm", "k_norm"):
                out[f"{p}.self_attn.{n}.weight"] = _Target(
                    f"{p}.self_attn.{n}.weight", 0, cfg.head_dim
                )
    return out


def meta_model(cfg: ModelConfig) -> GemmaForCausalLM:
    """A model without storage (meta tensors): nothing is allocated until to_empty."""
    with torch.device("meta"):
        model = GemmaForCausalLM(cfg)
    return model.eval().requires_grad_(False)


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> GemmaForCausalLM:
    """A model with uninitialised storage, allocated once, directly in dtype on device."""
    return meta_model(cfg).to(dtype=dtype).to_empty(device=device)


def load_safetensors(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> GemmaForCausalLM:
    """Load a HF Gemma checkpoint into our model; every mismatch is a CheckpointError."""
    files = checkpoint_files(Path(model_dir))
    model = empty_model(cfg, dtype, device)
    params = dict(model.named_parameters())
    targets = _targets(cfg)
    seen: set[str] = set()
    unexpected: list[str] = []
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="loading weights",
        disable=total < PROGRESS_MIN_BYTES,
    )
    with bar, torch.no_grad():
        for f, entry in (pair for path in files for pair in iter_entries(path)):
            bar.update(entry.nbytes)
            name = checkpoint_name(entry.name, cfg)
            target = targets.get(name) if name is not None else None
            if target is None:
                if name is not None:
                    unexpected.append(entry.name)
                continue
            dst = params[target.param][target.row_start : target.row_end]
            if entry.shape != tuple(dst.shape):
                raise CheckpointError(
                    f"tensor {name} has shape {entry.shape}, the config implies {tuple(dst.shape)}"
                )
            read_into(f, entry, dst)
            seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_short(sorted(unexpected))}")
        raise CheckpointError(
            f"checkpoint {model_dir} does not match the config: " + "; ".join(parts)
        )
    return model


def checkpoint_name(name: str, cfg: ModelConfig) -> str | None:
    """A checkpoint tensor's name in the text model's layout, or None for one to drop: vision
    parts, and a tied model's copy of the embedding as lm_head."""
    if name.startswith(VISION_PREFIXES):
        return None
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return None if cfg.tie_word_embeddings else "lm_head.weight"
    return name


def _short(names: list[str], limit: int = 8) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def random_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> GemmaForCausalLM:
    """Random weights of a config's shape (for --load-format dummy and benchmarks)."""
    model = empty_model(cfg, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model
