"""The KV cache tensors of both pools and their sizing from a byte budget.

The per-step addressing into them is `attention_batch.py`; attention over them is
`cache_attention.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gemma_serve.model.config import ModelConfig
from gemma_serve.server.engine.block_table import cdiv
from gemma_serve.server.engine.ring_table import ring_size


def kv_cache_dtype(name: str, model_dtype: torch.dtype, quantization: str) -> torch.dtype:
    """The dtype --kv-cache-dtype names. "auto": bfloat16 under int8 weights, else the model's.

    A bfloat16 cache under a float32 model halves the cache's bytes for one rounding of each
    K/V entry, and uncapped attention over it runs in bfloat16 (kernels/reference.py): on CPUs
    the decode step's gathers read and write half the bytes and nothing widens them again.
    Under int8 weights (the speed-first mode) that costs nothing measurable in perplexity
    (13.2465 against 13.2432 with a float32 cache, none 13.2554) and makes a decode step
    faster at 1, 8 and 32 sequences (RESULTS.md), so it is int8's default; the exact path
    (--quantization none) keeps the model's dtype.
    """
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if quantization == "int8" else model_dtype


def kv_bytes_per_layer_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """A key and a value of every KV head, one layer, one position."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """A key and a value of every KV head at every layer, one position."""
    return cfg.num_hidden_layers * kv_bytes_per_layer_token(cfg, dtype)


@dataclass(frozen=True)
class CacheLayout:
    """How many blocks each pool has, from a byte budget.

    The local (sliding-window) pool never needs more than one full ring per running request,
    so it gets min(max_num_seqs rings, its layers' uniform share of the budget); the global pool
    gets the rest.
    """

    num_global_blocks: int
    num_local_blocks: int
    block_size: int
    ring_blocks: int
    dtype: str  # the cache's torch dtype by name ("float32", "bfloat16"): it travels as text

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def from_budget(
        cls,
        cfg: ModelConfig,
        budget_bytes: int,
        block_size: int,
        max_num_seqs: int,
        dtype: torch.dtype,
        max_model_len: int,
        lookahead: int = 0,
    ) -> CacheLayout:
        """Split the budget: the local pool gets at most what max_num_seqs sequences can fill
        (a ring each, or less when no sequence reaches the window), the global pool the rest."""
        per_layer_block = block_size * kv_bytes_per_layer_token(cfg, dtype)
        n_full, n_local = len(cfg.full_layers), len(cfg.sliding_layers)
        ring = ring_size(cfg.sliding_window, block_size, lookahead)
        local_bytes = 0
        if n_local:
            share = budget_bytes * n_local // (n_local + n_full)
            per_seq = min(ring, cdiv(max_model_len, block_size))
            local_bytes = min(max_num_seqs * per_seq * n_local * per_layer_block, share)
        global_bytes = budget_bytes - local_bytes
        n_global = global_bytes // (n_full * per_layer_block) if n_full else 0
        n_loc = local_bytes // (n_local * per_layer_block) if n_local else 0
        name = str(dtype).removeprefix("torch.")
        return cls(int(n_global), int(n_loc), block_size, ring, name)

    def nbytes(self, cfg: ModelConfig) -> int:
        """The bytes both pools take, keys and values of every layer."""
        per_layer_block = self.block_size * kv_bytes_per_layer_token(cfg, self.torch_dtype)
        local = self.num_local_blocks * len(cfg.sliding_layers)
        return per_layer_block * (self.num_global_blocks * len(cfg.full_layers) + local)


class KVCache:
    """One [slots, Hkv, D] key and value tensor per layer, sized by its pool."""

    def __init__(self, cfg: ModelConfig, layout: CacheLayout, device: torch.device) -> None:
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        dtype = layout.torch_dtype
        b = layout.block_size
        # Zeroed, so every page is touched now: the process's memory after start-up is what it
        # will be (a lazily touched cache grows RSS for hours and passes a container limit at
        # start only to be OOM-killed later). Attention never reads a slot before it is written.
        # Each tensor its own allocation: compiled layers write a layer's cache inside their
        # graph, where inputs sharing a storage would be treated as aliases of each other.
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(cfg.num_hidden_layers):
            blocks = layout.num_local_blocks if cfg.is_sliding(i) else layout.num_global_blocks
            k, v = (torch.zeros(blocks * b, *shape, dtype=dtype, device=device) for _ in "kv")
            self.layers.append((k, v))
