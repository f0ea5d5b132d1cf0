"""Decode-only steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels, and at small batches their launch cost, not
their work, bounds a GPU. So each bucket's forward pass is captured once, at start, over static
input buffers. A decode step of n requests copies its inputs into the buffers' first n rows and
replays the smallest bucket >= n; the padding rows store nothing (slot -1) and read one position
of block 0, and their logits are dropped. Prefill and mixed steps run eagerly.

With `capture=False` (a CPU, in tests) the same static-buffer forward runs eagerly, so the
buffer and padding logic is checked without a GPU.
"""

from __future__ import annotations

import logging

import torch
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model.gemma import GemmaForCausalLM
from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.cache_attention import CacheAttention
from gemma_serve.server.engine.kv_cache import KVCache

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes to capture: powers of two below max_num_seqs, and max_num_seqs itself."""
    return tuple(b for b in BUCKETS if b < max_num_seqs) + (max_num_seqs,)


class _Pool:
    """Static slot mapping [n] and block tables [n, width] of one KV pool."""

    def __init__(
        self, n: int, width: int, ring_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.tables = torch.zeros((n, max(width, 1)), dtype=torch.int32, device=device)
        self.ring_blocks, self.block_size = ring_blocks, block_size

    def fits(self, batch: PoolBatch) -> bool:
        return batch.block_tables.shape[1] <= self.tables.shape[1]

    def load(self, batch: PoolBatch, n: int) -> None:
        self.slots[:n].copy_(batch.slot_mapping)
        self.tables[:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)

    def pad(self, n: int, bucket: int) -> None:
        self.slots[n:bucket].fill_(-1)  # padding rows must never store into a real slot
        self.tables[n:bucket].zero_()

    def view(self, bucket: int) -> PoolBatch:
        return PoolBatch(
            self.slots[:bucket], self.tables[:bucket], self.ring_blocks, self.block_size
        )


class DecodeGraphs:
    """Static buffers for max_num_seqs decodes, and (with capture) a CUDA graph per bucket."""

    def __init__(
        self,
        model: GemmaForCausalLM,
        cache: KVCache,
        ops: AttentionOps,
        *,
        max_num_seqs: int,
        global_width: int,
        ring_blocks: int,
        block_size: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.model, self.cache, self.ops = model, cache, ops
        self.buckets = buckets_for(max_num_seqs)
        n = max_num_seqs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.long, device=device)
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=device)
        # A static pool per attention type; a step loads those of the types the model has.
        self.pools = {
            PoolKind.GLOBAL: _Pool(n, global_width, 0, block_size, device),
            PoolKind.LOCAL: _Pool(n, ring_blocks, ring_blocks, block_size, device),
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _forward(self, bucket: int) -> torch.Tensor:
        """The model over the first `bucket` rows of the static buffers: logits [bucket, V]."""
        attention = AttentionBatch(
            num_decodes=bucket,
            seq_lens=self.seq_lens[:bucket],
            cu_seqlens=self.no_prefill,
            context_lens=self.no_prefill[:0],
            pools={kind: pool.view(bucket) for kind, pool in self.pools.items()},
        )
        attn = CacheAttention(self.model.config, self.cache, attention, self.ops)
        ids, pos = self.input_ids[:bucket], self.positions[:bucket]
        return self.model(ids, pos, attn, self.logits_indices[:bucket])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bucket in reversed(self.buckets):  # largest first: the others fit in its memory
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles and allocates outside the capture
                self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batches of %s", ", ".join(map(str, self.buckets)))

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBatch,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor | None:
        """Logits [n, V] of a decode-only step through its bucket; None when it does not apply
        (a prefill in the step, more rows than the largest bucket, a wider block table)."""
        n = attention.num_decodes
        if n == 0 or n != input_ids.shape[0] or n != logits_indices.shape[0]:
            return None
        if n > self.buckets[-1]:
            return None
        if not all(self.pools[kind].fits(p) for kind, p in attention.pools.items()):
            return None
        bucket = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(attention.seq_lens)
        for kind, p in attention.pools.items():
            self.pools[kind].load(p, n)
        if n < bucket:  # padding rows: valid inputs that store nothing (stale ones would)
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.seq_lens[n:bucket].fill_(1)
            for pool in self.pools.values():
                pool.pad(n, bucket)
        graph = self.graphs.get(bucket)
        if graph is None:
            return self._forward(bucket)[:n]
        graph.replay()
        return self.outputs[bucket][:n]
