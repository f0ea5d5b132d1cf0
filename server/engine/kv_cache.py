"""The KV cache tensors of both pools, their sizing, and the cache-aware attention backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model.config import ModelConfig
from gemma_serve.server.engine.block_tables import cdiv, ring_size


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

    @classmethod
    def from_budget(
        cls,
        cfg: ModelConfig,
        budget_bytes: int,
        block_size: int,
        max_num_seqs: int,
        dtype: torch.dtype,
        max_model_len: int,
    ) -> CacheLayout:
        """Split the budget: the local pool gets at most what max_num_seqs sequences can fill
        (a ring each, or less when no sequence reaches the window), the global pool the rest."""
        per_layer_block = 2 * block_size * cfg.num_key_value_heads * cfg.head_dim
        per_layer_block *= torch.finfo(dtype).bits // 8
        n_full, n_local = len(cfg.full_layers), len(cfg.sliding_layers)
        ring = ring_size(cfg.sliding_window, block_size)
        local_bytes = 0
        if n_local:
            share = budget_bytes * n_local // (n_local + n_full)
            per_seq = min(ring, cdiv(max_model_len, block_size))
            local_bytes = min(max_num_seqs * per_seq * n_local * per_layer_block, share)
        global_bytes = budget_bytes - local_bytes
        n_global = global_bytes // (n_full * per_layer_block) if n_full else 0
        n_loc = local_bytes // (n_local * per_layer_block) if n_local else 0
        return cls(int(n_global), int(n_loc), block_size, ring)


class KVCache:
    """One [slots, Hkv, D] key and value tensor per layer, from its pool's storage."""

    def __init__(
        self, cfg: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        b = layout.block_size
        n_full, n_local = len(cfg.full_layers), len(cfg.sliding_layers)
        # Uninitialised on purpose: attention only reads slots written earlier (the kernels
        # mask every other load), and untouched pages cost no memory or start-up time.
        g = torch.empty(n_full, 2, layout.num_global_blocks * b, *shape, dtype=dtype, device=device)
        loc = torch.empty(
            n_local, 2, layout.num_local_blocks * b, *shape, dtype=dtype, device=device
        )
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        gi = li = 0
        for i in range(cfg.num_hidden_layers):
            if cfg.is_sliding(i):
                self.layers.append((loc[li, 0], loc[li, 1]))
                li += 1
            else:
                self.layers.append((g[gi, 0], g[gi, 1]))
                gi += 1


@dataclass(frozen=True)
class PoolBatch:
    """Per-pool addressing for one step: where each token is stored, and the block tables."""

    slot_mapping: torch.Tensor  # [T] int64, -1 = do not store
    block_tables: torch.Tensor  # [S, max_blocks] int32 (decodes first, then prefills)
    ring_blocks: int  # 0 = paged
    block_size: int


@dataclass(frozen=True)
class AttentionBatch:
    """The batch layout attention needs: decodes (one token each) first, then prefill chunks."""

    num_decodes: int
    seq_lens: torch.Tensor  # [num_decodes] int32: position of the decode token + 1
    cu_seqlens: torch.Tensor  # [num_prefills + 1] int32 over the prefill tokens
    context_lens: torch.Tensor  # [num_prefills] int32: tokens before each chunk
    global_pool: PoolBatch
    local_pool: PoolBatch
    max_prefill_len: int = 0  # the longest prefill chunk (host-side: kernels need no sync)


class CacheAttention:
    """AttentionBackend over the paged (global) and ring (local) caches.

    Decodes store their K/V first and then read everything from the cache. Prefill chunks attend
    to their fresh K/V plus the cached context and store afterwards: a chunk longer than the ring
    would otherwise overwrite keys its own first queries still need.
    """

    def __init__(
        self, cfg: ModelConfig, cache: KVCache, batch: AttentionBatch, ops: AttentionOps
    ) -> None:
        self.cfg, self.cache, self.batch, self.ops = cfg, cache, batch, ops

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        cfg, batch, ops = self.cfg, self.batch, self.ops
        sliding = cfg.is_sliding(layer)
        pool = batch.local_pool if sliding else batch.global_pool
        k_cache, v_cache = self.cache.layers[layer]
        kw = dict(
            block_size=pool.block_size,
            ring_blocks=pool.ring_blocks,
            window=cfg.sliding_window if sliding else None,
            softcap=cfg.attn_logit_softcapping,
            scale=cfg.scale,
        )
        nd = batch.num_decodes
        tables = pool.block_tables
        if nd == q.shape[0]:  # decode-only step: no copies
            ops.store_kv(k, v, k_cache, v_cache, pool.slot_mapping)
            return ops.decode_attention(q, k_cache, v_cache, tables, batch.seq_lens, **kw)
        out = torch.empty_like(q)
        if nd:
            ops.store_kv(k[:nd], v[:nd], k_cache, v_cache, pool.slot_mapping[:nd])
            out[:nd] = ops.decode_attention(
                q[:nd], k_cache, v_cache, tables[:nd], batch.seq_lens, **kw
            )
        out[nd:] = ops.prefill_attention(
            q[nd:],
            k[nd:],
            v[nd:],
            batch.cu_seqlens,
            batch.context_lens,
            k_cache,
            v_cache,
            tables[nd:],
            **kw,
            max_seqlen=batch.max_prefill_len,
        )
        ops.store_kv(k[nd:], v[nd:], k_cache, v_cache, pool.slot_mapping[nd:])
        return out
