"""The Triton attention ops with the reference signatures, plus their launch heuristics.

`kernels.dispatch` imports `store_kv`, `prefill_attention` and `decode_attention` from here.
Tile sizes target Hopper (H100/H200, sm_90) at Gemma's head dims 128 and 256; under Triton's
CPU interpreter (TRITON_INTERPRET=1, the tests) small tiles keep the multi-tile paths exercised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from gemma_serve.kernels.decode_attention import launch_decode
from gemma_serve.kernels.prefill_attention import launch_prefill
from gemma_serve.kernels.store_kv import launch_store_kv

H100_SMS = 132  # also the H200's count; used when no CUDA device can be asked


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True under Triton's CPU interpreter; read per call, not at import (tests set it late)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prefill_config(head_dim: int, interpret: bool) -> PrefillConfig:
    """Tiles for the prefill kernel. On sm_90 the fp32 accumulator (BLOCK_M x D) must stay in
    registers and Q plus num_stages K/V tiles in shared memory (227 KB). Checked with ptxas for
    sm_90 (the AOT test): these compile to wgmma with no register spills under Triton 3.9 (3.6
    leaves the D-256 config an 8-byte stack frame); at D 256, BLOCK_N 64 or BLOCK_M 64 spill
    40-256 bytes. BLOCK_N 16 at D 256 is spill-free on both; benchmarks/kernels.py times it."""
    if interpret:
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=2)


def decode_block_n(head_dim: int, interpret: bool) -> int:
    """Keys per decode tile: 64 keeps enough bytes in flight per program on HBM3e."""
    return 16 if interpret else 64


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int
) -> int:
    """Split-K factor: enough programs for ~4 per SM, but each split keeps >= 4 key tiles
    (below that the partial write-out and reduction cost more than the parallelism buys)."""
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(4 * num_sms, programs)
    by_len = triton.cdiv(max(max_context, 1), 4 * block_n)
    return max(1, min(want, by_len, 32))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """See `kernels.reference.store_kv`."""
    launch_store_kv(k, v, k_cache, v_cache, slot_mapping, num_warps=4)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor | None,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
    softcap: float | None,
    scale: float,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """See `kernels.reference.prefill_attention`."""
    interpret = interpreting()
    cfg = prefill_config(q.shape[-1], interpret)
    return launch_prefill(
        q, k, v, cu_seqlens, context_lens, k_cache, v_cache, block_tables,
        block_size=block_size, ring_blocks=ring_blocks, window=window, softcap=softcap,
        scale=scale, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, upcast=interpret, max_seqlen=max_seqlen,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    ring_blocks: int,
    window: int | None,
    softcap: float | None,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """See `kernels.reference.decode_attention`; `num_splits` overrides the split-K heuristic.

    The heuristic bounds the context by shapes known on the host (block table width, ring size,
    window), so choosing it never waits for the GPU.
    """
    interpret = interpreting()
    d = q.shape[-1]
    block_n = decode_block_n(d, interpret)
    if num_splits is None:
        bound = (ring_blocks if ring_blocks > 0 else block_tables.shape[1]) * block_size
        if window is not None:
            bound = min(bound, window)
        num_splits = choose_num_splits(
            q.shape[0], k_cache.shape[1], bound, block_n, num_sms(q.device)
        )
    return launch_decode(
        q, k_cache, v_cache, block_tables, seq_lens,
        block_size=block_size, ring_blocks=ring_blocks, window=window, softcap=softcap,
        scale=scale, block_n=block_n, num_splits=num_splits, num_warps=4,
        num_stages=2 if d >= 256 else 3, upcast=interpret,
    )  # fmt: skip
