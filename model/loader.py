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
from gemma_serve.model.safetensors_stream import iter_entries, read_window
from gemma_serve.model.shard_plan import ShardPlan
from torch import nn
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
    """Where a checkpoint tensor goes: rows [row_start, row_end) of a parameter (a fused one
    holds several tensors), filled from the window of the tensor at (src_row, src_col), which
    is the whole tensor unless the model is one tensor-parallel rank's shard."""

    param: str
    row_start: int
    row_end: int
    shape: tuple[int, ...]  # the checkpoint tensor's full shape
    src_row: int = 0
    src_col: int = 0


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


def _targets(cfg: ModelConfig, plan: ShardPlan) -> dict[str, _Target]:
    """HF tensor name -> destination in our (fused) parameters, for the rank of `plan` (a
    one-rank plan: the whole model). Column-parallel tensors give a row range, row-parallel
    ones a column range (into the `linear` inside parallel.RowParallel)."""
    d, hidden, vocab = cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    q, kv, ffn = plan.q_heads * d, plan.kv_heads * d, plan.ffn
    q_all, kv_all = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    row_parallel = ".linear" if plan.size > 1 else ""

    def columns(param: str, at: int, n: int, rows: int, start: int) -> _Target:
        return _Target(param, at, at + n, (rows, hidden), src_row=start)

    def rows(param: str, cols: int, start: int) -> _Target:  # the destination's width is read
        return _Target(param, 0, hidden, (hidden, cols), src_col=start)

    out = {
        "model.embed_tokens.weight": columns(
            "model.embed_tokens.weight", 0, plan.vocab_rows, vocab, plan.vocab_start
        ),
        "model.norm.weight": _Target("model.norm.weight", 0, hidden, (hidden,)),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = columns(
            "lm_head.weight", 0, plan.vocab_rows, vocab, plan.vocab_start
        )
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv, gate_up = f"{p}.self_attn.qkv_proj.weight", f"{p}.mlp.gate_up_proj.weight"
        q0, kv0, f0 = plan.q_head_start * d, plan.kv_head_start * d, plan.ffn_start
        out |= {
            f"{p}.self_attn.q_proj.weight": columns(qkv, 0, q, q_all, q0),
            f"{p}.self_attn.k_proj.weight": columns(qkv, q, kv, kv_all, kv0),
            f"{p}.self_attn.v_proj.weight": columns(qkv, q + kv, kv, kv_all, kv0),
            f"{p}.self_attn.o_proj.weight": rows(
                f"{p}.self_attn.o_proj{row_parallel}.weight", q_all, q0
            ),
            f"{p}.mlp.gate_proj.weight": columns(gate_up, 0, ffn, cfg.intermediate_size, f0),
            f"{p}.mlp.up_proj.weight": columns(gate_up, ffn, ffn, cfg.intermediate_size, f0),
            f"{p}.mlp.down_proj.weight": rows(
                f"{p}.mlp.down_proj{row_parallel}.weight", cfg.intermediate_size, f0
            ),
        }
        norms = [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
        if cfg.use_qk_norm:
            norms += ["self_attn.q_norm", "self_attn.k_norm"]
        for n in norms:
            size = d if n.startswith("self_attn") else hidden
            out[f"{p}.{n}.weight"] = _Target(f"{p}.{n}.weight", 0, size, (size,))
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
    model = empty_model(cfg, dtype, device)
    read_checkpoint(model, model_dir, cfg, ShardPlan.build(cfg, 0, 1))
    return model


def read_checkpoint(model: nn.Module, model_dir: str | Path, cfg: ModelConfig, plan: ShardPlan):
    """Fill an allocated model (the whole one, or the shard of `plan`'s rank) from a HF
    checkpoint, reading only the slices it holds; every mismatch is a CheckpointError."""
    files = checkpoint_files(Path(model_dir))
    params = dict(model.named_parameters())
    targets = _targets(cfg, plan)
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
            if entry.shape != target.shape:
                raise CheckpointError(
                    f"tensor {name} has shape {entry.shape}, the config implies {target.shape}"
                )
            dst = params[target.param][target.row_start : target.row_end]
            read_window(f, entry, dst, target.src_row, target.src_col)
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
    fill_random(model, device, seed)
    return model


def fill_random(model: nn.Module, device: torch.device, seed: int) -> None:
    """Random weights in an allocated model (norm weights zero)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
