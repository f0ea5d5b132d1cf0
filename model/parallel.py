"""Tensor-parallel layers: the model of one rank (model/shard_plan.py says which slice).

The rank's network is the plain GemmaForCausalLM built from the shard's config (fewer heads,
fewer intermediate units, a vocabulary shard), with four swaps:
- o_proj and down_proj wrapped in `RowParallel`: the partial products summed across ranks (one
  all-reduce each per layer);
- the embedding `VocabParallelEmbedding`: ids outside the shard give zero rows, summed across
  ranks (exact: one rank contributes each row);
- the LM head `VocabParallelHead`: each rank's logits gathered along the vocabulary, the pad
  rows cut off; GemmaForCausalLM.compute_logits applies the final soft-cap after it.
The collectives go through a `TensorGroup`, which holds the process group handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from gemma_serve.model.config import ModelConfig
from gemma_serve.model.gemma import GemmaForCausalLM, Linear
from gemma_serve.model.loader import fill_random, meta_model, read_checkpoint
from gemma_serve.model.shard_plan import ShardPlan
from torch import nn


@dataclass(frozen=True)
class TensorGroup:
    """The ranks one model is split over, and the process group their collectives use."""

    rank: int
    size: int
    pg: object  # a torch.distributed ProcessGroup (Gloo on CPU, NCCL on CUDA)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        self.pg.allreduce([x]).wait()  # type: ignore[attr-defined]
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x laid side by side along the last dimension."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([parts], [x.contiguous()]).wait()  # type: ignore[attr-defined]
        return torch.cat(parts, dim=-1)


class RowParallel(nn.Module):
    """A projection whose input features are split across ranks: local product, then sum.

    The inner module stays a `Linear` (named `linear`), so deployment packs it like any other.
    """

    def __init__(self, linear: nn.Module, group: TensorGroup) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table (padded to `shard` rows)."""

    def __init__(self, shard: int, hidden: int, start: int, rows: int, group: TensorGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard, hidden))
        self.start, self.rows, self.group = start, rows, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce(out)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered into the full [N, vocab_size]."""

    def __init__(self, linear: nn.Module, vocab_size: int, group: TensorGroup) -> None:
        super().__init__()
        self.linear, self.vocab_size, self.group = linear, vocab_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x).float()
        return self.group.all_gather_last(local)[:, : self.vocab_size]


def shard_meta_model(cfg: ModelConfig, plan: ShardPlan, group: TensorGroup) -> GemmaForCausalLM:
    """This rank's network without storage (meta tensors); `install_head` after loading."""
    model = meta_model(plan.local_config(cfg))
    with torch.device("meta"):
        for layer in model.model.layers:
            layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
            layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
        model.model.embed_tokens = VocabParallelEmbedding(
            plan.vocab_shard, cfg.hidden_size, plan.vocab_start, plan.vocab_rows, group
        )
    return model.requires_grad_(False)


def install_head(model: GemmaForCausalLM, cfg: ModelConfig, group: TensorGroup) -> None:
    """The gathering LM head over the loaded table (tied) or head shard (untied)."""
    linear = model.lm_head
    if linear is None:  # tied: a Linear that shares the embedding shard
        linear = Linear(0, 0)
        linear.weight = model.model.embed_tokens.weight
    model.lm_head = VocabParallelHead(linear, cfg.vocab_size, group)


def load_shard(
    cfg: ModelConfig,
    plan: ShardPlan,
    group: TensorGroup,
    dtype: torch.dtype,
    device: torch.device,
    model_dir: Path | None,
    seed: int = 0,
) -> GemmaForCausalLM:
    """This rank's model, allocated at its shard's size and filled with only its slices of
    the checkpoint in `model_dir` (random weights when None: --load-format dummy)."""
    model = shard_meta_model(cfg, plan, group).to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():  # the vocabulary shard's pad rows give zero logits
        model.model.embed_tokens.weight.zero_()
        if model.lm_head is not None:
            model.lm_head.weight.zero_()
    if model_dir is None:
        fill_random(model, device, seed + plan.rank)
    else:
        read_checkpoint(model, model_dir, cfg, plan)
    install_head(model, cfg, group)
    return model
