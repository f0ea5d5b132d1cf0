"""The cache-aware attention backend: each layer attends through its pool's cache (torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gemma_serve.kernels import reference
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model.attention import RowCache
from gemma_serve.model.config import ModelConfig
from gemma_serve.server.engine.attention_batch import AttentionBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.kv_cache import KVCache


class CacheAttention:
    """AttentionBackend over the paged (global) and ring (local) caches.

    Decodes store their K/V first and then read everything from the cache. Prefill chunks attend
    to their fresh K/V plus the cached context and store afterwards: a chunk longer than the ring
    would otherwise overwrite keys its own first queries still need. Under a narrower cache
    dtype the fresh K/V are rounded to it first, as every later reader sees them.
    """

    def __init__(
        self, cfg: ModelConfig, cache: KVCache, batch: AttentionBatch, ops: AttentionOps
    ) -> None:
        self.cfg, self.cache, self.batch, self.ops = cfg, cache, batch, ops
        self._plans: dict[PoolKind, object] = {}  # ops.decode_plan per pool, for every layer
        self._rows: dict[PoolKind, tuple[torch.Tensor, torch.Tensor]] = {}  # row_cache's keys

    def _plan(self, kind: PoolKind, window: int | None) -> dict:
        """decode_attention's `plan` keyword for this pool (none for ops without plans)."""
        if self.ops.decode_plan is None:
            return {}
        if kind not in self._plans:
            pool, nd = self.batch.pools[kind], self.batch.num_decodes
            self._plans[kind] = self.ops.decode_plan(
                pool.block_tables[:nd],
                self.batch.seq_lens,
                block_size=pool.block_size,
                ring_blocks=pool.ring_blocks,
                window=window,
            )
        return {"plan": self._plans[kind]}

    def row_cache(self, layer: int) -> RowCache | None:
        """The layer's cache and the one decoding sequence's keys (reference.row_slots, once
        per pool and step), when the step is that one decode row: compiled layers store and
        attend through it themselves."""
        batch = self.batch
        if not (batch.num_decodes == 1 and batch.cu_seqlens.numel() == 1):
            return None
        sliding = self.cfg.is_sliding(layer)
        kind = PoolKind.LOCAL if sliding else PoolKind.GLOBAL
        if kind not in self._rows:
            pool = batch.pools[kind]
            self._rows[kind] = reference.row_slots(
                pool.block_tables[0],
                int(batch.seq_lens[0]),
                block_size=pool.block_size,
                ring_blocks=pool.ring_blocks,
                window=self.cfg.sliding_window if sliding else None,
            )
        return RowCache(*self.cache.layers[layer], *self._rows[kind])

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        cfg, batch, ops = self.cfg, self.batch, self.ops
        sliding = cfg.is_sliding(layer)
        kind = PoolKind.LOCAL if sliding else PoolKind.GLOBAL
        pool = batch.pools[kind]
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
            plan = self._plan(kind, kw["window"])
            return ops.decode_attention(q, k_cache, v_cache, tables, batch.seq_lens, **kw, **plan)
        if k_cache.dtype != k.dtype:
            # Fresh keys and values as the cache will hold them (--kv-cache-dtype): a prompt's
            # numerics do not depend on how it was chunked or what came from the prefix cache.
            k, v = k.to(k_cache.dtype).to(k.dtype), v.to(v_cache.dtype).to(v.dtype)
        out = torch.empty_like(q)
        if nd:
            ops.store_kv(k[:nd], v[:nd], k_cache, v_cache, pool.slot_mapping[:nd])
            plan = self._plan(kind, kw["window"])
            out[:nd] = ops.decode_attention(
                q[:nd], k_cache, v_cache, tables[:nd], batch.seq_lens, **kw, **plan
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


# A global layer's number of keys in the examples compiled layers are compiled on.
EXAMPLE_CONTEXT = 64


def row_caches(
    cfg: ModelConfig,
    caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    context: int = EXAMPLE_CONTEXT,
) -> dict[int, RowCache]:
    """Every layer's RowCache as CacheAttention.row_cache hands it over, over `caches` (each
    layer's K and V; KVCache.layers), with example keys (a global layer's for `context`
    tokens): what compiled layers are compiled and checked for."""
    device = caches[0][0].device
    examples = {}
    for sliding in (True, False):
        m = cfg.sliding_window if sliding else context
        examples[sliding] = (
            torch.zeros(m, dtype=torch.long, device=device),
            torch.ones(m, dtype=torch.bool, device=device),
        )
    return {
        i: RowCache(*caches[i], *examples[cfg.is_sliding(i)]) for i in range(cfg.num_hidden_layers)
    }
