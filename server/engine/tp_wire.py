"""A step's ModelBatch as the message rank 0 sends to the other tensor-parallel ranks (torch).

Only what the forward pass reads travels: the flat ids and positions, the attention layout and
each pool's addressing, the sampled rows and the prompt-scoring rows (the other ranks take part
in the same LM-head gathers). Requests, sampling parameters and scoring owners stay on rank 0.
Arrays travel as numpy (pickled without torch's tensor reduction, which is slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.prompt_logprobs import PromptScoring
from gemma_serve.server.engine.runner import ModelBatch


@dataclass(frozen=True)
class StepMessage:
    input_ids: np.ndarray
    positions: np.ndarray
    logits_indices: np.ndarray
    num_decodes: int
    seq_lens: np.ndarray
    cu_seqlens: np.ndarray
    context_lens: np.ndarray
    max_prefill_len: int
    pools: tuple[tuple[str, np.ndarray, np.ndarray, int, int], ...]  # kind, slots, tables, R, B
    scoring: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # rows, targets, tops


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def encode(batch: ModelBatch) -> StepMessage:
    a = batch.attention
    s = batch.scoring
    return StepMessage(
        input_ids=_np(batch.input_ids),
        positions=_np(batch.positions),
        logits_indices=_np(batch.logits_indices),
        num_decodes=a.num_decodes,
        seq_lens=_np(a.seq_lens),
        cu_seqlens=_np(a.cu_seqlens),
        context_lens=_np(a.context_lens),
        max_prefill_len=a.max_prefill_len,
        pools=tuple(
            (kind.value, _np(p.slot_mapping), _np(p.block_tables), p.ring_blocks, p.block_size)
            for kind, p in a.pools.items()
        ),
        scoring=(s.rows, s.targets, s.tops),
    )


def decode(msg: StepMessage, device: torch.device) -> ModelBatch:
    """The ModelBatch a non-zero rank runs: no requests (the logits rows are enough)."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    pools = {
        PoolKind(kind): PoolBatch(t(slots), t(tables), ring, block)
        for kind, slots, tables, ring, block in msg.pools
    }
    attention = AttentionBatch(
        num_decodes=msg.num_decodes,
        seq_lens=t(msg.seq_lens),
        cu_seqlens=t(msg.cu_seqlens),
        context_lens=t(msg.context_lens),
        pools=pools,
        max_prefill_len=msg.max_prefill_len,
    )
    rows, targets, tops = msg.scoring
    return ModelBatch(
        input_ids=t(msg.input_ids),
        positions=t(msg.positions),
        attention=attention,
        logits_indices=t(msg.logits_indices),
        sampling_requests=(),
        scoring=PromptScoring(rows, targets, tops, ()),
    )
