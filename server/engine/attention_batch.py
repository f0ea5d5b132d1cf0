"""What one step's attention needs to address the KV cache: the batch layout and, per pool,
the slot mapping and block tables (torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from gemma_serve.server.engine.block_table import PoolInputs, PoolKind


@dataclass(frozen=True)
class PoolBatch:
    """Per-pool addressing for one step: where each token is stored, and the block tables."""

    slot_mapping: torch.Tensor  # [T] int64, -1 = do not store
    block_tables: torch.Tensor  # [S, max_blocks] int32 (decodes first, then prefills)
    ring_blocks: int  # the kernels' layout argument: 0 = paged
    block_size: int

    @classmethod
    def from_inputs(cls, inputs: PoolInputs, device: torch.device) -> PoolBatch:
        """The KV manager's host-side inputs as tensors, block tables padded to one width."""
        rows = inputs.rows
        width = max((len(r) for r in rows), default=0) or 1
        padded = [r + [0] * (width - len(r)) for r in rows]
        return cls(
            slot_mapping=torch.tensor(inputs.slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(
                len(rows), width
            ),
            ring_blocks=inputs.ring_blocks,
            block_size=inputs.block_size,
        )


@dataclass(frozen=True)
class AttentionBatch:
    """The batch layout attention needs: decodes (one token each) first, then prefill chunks."""

    num_decodes: int
    seq_lens: torch.Tensor  # [num_decodes] int32: position of the decode token + 1
    cu_seqlens: torch.Tensor  # [num_prefills + 1] int32 over the prefill tokens
    context_lens: torch.Tensor  # [num_prefills] int32: tokens before each chunk
    pools: Mapping[PoolKind, PoolBatch]  # the pools of the attention types the model has
    max_prefill_len: int = 0  # the longest prefill chunk (host-side: kernels need no sync)
