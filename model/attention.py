"""The seam between the network and attention: the model calls a backend per layer.

The network computes q, k, v (after q/k norms and RoPE) and hands them to an AttentionBackend,
which owns everything about the batch layout and the KV cache. This keeps the model free of
cache bookkeeping and lets the engine plug in paged/ring caches and Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from gemma_serve.kernels.dispatch import REFERENCE_OPS, AttentionOps
from gemma_serve.model.config import ModelConfig


@dataclass(frozen=True)
class RowCache:
    """A layer's cache and the keys of a step that is one decode row, for compiled layers that
    store and attend inside their own graph (kernels.reference.row_decode's arguments)."""

    k_cache: torch.Tensor  # [slots, Hkv, D], the layer's
    v_cache: torch.Tensor
    slots: torch.Tensor  # [M] int64: the keys' slots, the decode token's own last
    valid: torch.Tensor  # [M] bool: False for a window's padding


class AttentionBackend(Protocol):
    """Attention for one layer of the current forward pass."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] for the batch's T tokens -> output [T, Hq, D]."""
        ...

    def row_cache(self, layer: int) -> RowCache | None:
        """The layer's cache and keys when the step is one decode row; None otherwise (then
        the layer calls the backend)."""
        ...


class VarlenAttention:
    """Cache-free causal attention over a flat batch of whole sequences (cu_seqlens).

    Used for a plain forward pass over complete prompts (tests, scoring); the engine uses the
    cache-aware backend instead.
    """

    def __init__(
        self, config: ModelConfig, cu_seqlens: torch.Tensor, ops: AttentionOps = REFERENCE_OPS
    ) -> None:
        self.config = config
        self.cu_seqlens = cu_seqlens
        self.ops = ops

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.config
        return self.ops.prefill_attention(
            q,
            k,
            v,
            self.cu_seqlens,
            None,
            None,
            None,
            None,
            block_size=1,
            ring_blocks=0,
            window=cfg.sliding_window if cfg.is_sliding(layer) else None,
            softcap=cfg.attn_logit_softcapping,
            scale=cfg.scale,
        )

    def row_cache(self, layer: int) -> RowCache | None:
        return None  # no cache
