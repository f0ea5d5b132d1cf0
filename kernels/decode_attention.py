"""Triton paged/ring decode attention, GQA-aware, with optional split-K (flash-decoding).

Semantics are exactly `kernels.reference.decode_attention`. One program handles one
(sequence, KV head, split): all GROUP query heads of that KV head are stacked into the rows of
one tile (padded to 16, the smallest tensor-core M), so each K/V tile is read from memory once
per group instead of once per query head. Decode is memory-bound, so the padded rows cost
nothing that matters.

With NUM_SPLITS > 1 each program covers one contiguous slice of its sequence's visible context
and writes an unnormalised partial (running max, sum, accumulator); `decode_reduce_kernel`
merges the slices. This keeps the GPU busy when batch * KV heads is small but contexts are long.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gemma_serve.kernels.triton_common import (
    load_cached_kv,
    log2_scores,
    online_update,
    score_constants,
)


@triton.jit
def decode_kernel(
    Q, KCache, VCache, BlockTables, SeqLens, Out, PartM, PartL, PartAcc,
    stride_qs, stride_qh, stride_kcs, stride_kch, stride_vcs, stride_vch, stride_bt,
    stride_os, stride_oh,
    ring_blocks, window, qk_scale, softcap_scale, cap_log2e,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_RING: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Grid (S, Hkv, NUM_SPLITS)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq).to(tl.int32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    # Each sequence splits its own visible range, so short sequences do not idle long splits.
    part = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * part
    hi = tl.minimum(lo + part, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q_ptrs = Q + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    # Finite start: an empty split must not produce -inf - -inf = NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    bt_row = BlockTables + seq.to(tl.int64) * stride_bt
    for p0 in range(lo, hi, BLOCK_N):
        pos = p0 + offs_n
        ok = pos < hi
        # The reference casts cached K/V to q's dtype.
        k, v = load_cached_kv(
            KCache, VCache, bt_row, pos, ok, kv_head, offs_d,
            stride_kcs, stride_kch, stride_vcs, stride_vch, ring_blocks,
            Q.dtype.element_ty, Q.dtype.element_ty, BLOCK_SIZE, IS_RING, UPCAST,
        )  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = log2_scores(qk, qk_scale, softcap_scale, cap_log2e, HAS_SOFTCAP)
        s = tl.where(ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PREC)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])
    else:
        num_heads = tl.num_programs(1) * GROUP
        idx = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        tl.store(PartM + idx, m_i, mask=g_ok)
        tl.store(PartL + idx, l_i, mask=g_ok)
        tl.store(PartAcc + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def decode_reduce_kernel(
    PartM, PartL, PartAcc, Out, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Grid (S, Hq): merge the NUM_SPLITS partial softmaxes of one (sequence, query head)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    idx = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    m = tl.load(PartM + idx, mask=s_ok, other=float("-inf"))
    l_part = tl.load(PartL + idx, mask=s_ok, other=0.0)
    acc = tl.load(
        PartAcc + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    m_all = tl.max(m, 0)
    w = tl.exp2(m - m_all)  # log2 domain, like the partial maxima
    den = tl.sum(l_part * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    o_ptrs = Out + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty))


def launch_decode(
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
    block_n: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    upcast: bool,
) -> torch.Tensor:
    """Launch the decode kernel (and the split reduction when num_splits > 1)."""
    s, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert hq % hkv == 0 and d >= 16 and d & (d - 1) == 0, "head_dim: a power of two >= 16"
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((s, hq, d), dtype=q.dtype, device=q.device)
    if s == 0:
        return out
    group = hq // hkv
    num_splits = max(1, int(num_splits))
    if num_splits > 1:
        part_m = torch.empty((s, hq, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((s, hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:  # never dereferenced
        part_m = part_l = part_acc = out
    qk_scale, softcap_scale, cap_log2e, has_cap = score_constants(scale, softcap)
    decode_kernel[(s, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        ring_blocks, window if window is not None else 0, qk_scale, softcap_scale, cap_log2e,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, IS_RING=ring_blocks > 0,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=has_cap, UPCAST=upcast,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        decode_reduce_kernel[(s, hq)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(1),
            HEAD_DIM=d, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4 if d >= 128 else 1,
        )  # fmt: skip
    return out
