"""Triton varlen causal prefill attention (flash-attention style) with cached context.

Semantics are exactly `kernels.reference.prefill_attention`: packed chunks (cu_seqlens), GQA,
logit soft-cap, optional sliding window, and each chunk also attends to its sequence's earlier
context in the paged or ring cache. One program handles BLOCK_M query rows of one chunk and one
query head; K/V tiles entirely outside the causal/window range are never visited. The score
math is in the log2 domain (`triton_common`).
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
def prefill_kernel(
    Q, K, V, Out, CuSeqlens, CtxLens, KCache, VCache, BlockTables,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_bt,
    ring_blocks, window, qk_scale, softcap_scale, cap_log2e,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, IS_RING: tl.constexpr, HAS_CTX: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Grid (query tiles, Hq, S); query tiles are visited longest-work first."""
    seq = tl.program_id(2)
    head = tl.program_id(1)
    kv_head = head // GROUP
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    n = (tl.load(CuSeqlens + seq + 1) - tl.load(CuSeqlens + seq)).to(tl.int32)
    m_tile = tl.cdiv(n, BLOCK_M) - 1 - tl.program_id(0)  # later tiles have more keys: run first
    if m_tile >= 0:
        ctx = 0
        if HAS_CTX:
            ctx = tl.load(CtxLens + seq).to(tl.int32)
        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < n
        q_ptrs = Q + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Running maxima start finite: with -inf a fully masked tile gives -inf - -inf = NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        q_pos = ctx + offs_m  # absolute positions of this tile's query rows

        # 1) Cached context: positions [lo, ctx); lo is the first one any row here can see.
        if HAS_CTX:
            lo = 0
            if HAS_WINDOW:
                lo = tl.maximum(ctx + m_tile * BLOCK_M - window + 1, 0)
            for p0 in range(lo, ctx, BLOCK_N):
                pos = p0 + offs_n
                ok = pos < ctx
                # Cast to the chunk's dtype as the reference does.
                k, v = load_cached_kv(
                    KCache, VCache, BlockTables + seq * stride_bt, pos, ok, kv_head, offs_d,
                    stride_kcs, stride_kch, stride_vcs, stride_vch, ring_blocks,
                    K.dtype.element_ty, V.dtype.element_ty, BLOCK_SIZE, IS_RING, UPCAST,
                )  # fmt: skip
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                s = log2_scores(qk, qk_scale, softcap_scale, cap_log2e, HAS_SOFTCAP)
                mask = ok[None, :]
                if HAS_WINDOW:
                    mask = mask & ((q_pos[:, None] - pos[None, :]) < window)
                s = tl.where(mask, s, float("-inf"))
                acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PREC)

        # 2) The chunk's own keys. Tiles strictly left of the diagonal need no causal mask.
        diag = m_tile * BLOCK_M  # a multiple of BLOCK_N (BLOCK_M % BLOCK_N == 0)
        lo_j = 0
        if HAS_WINDOW:
            lo_j = (tl.maximum(diag - window + 1, 0) // BLOCK_N) * BLOCK_N
        for j0 in range(lo_j, diag, BLOCK_N):
            offs_j = j0 + offs_n
            k = tl.load(K + (start + offs_j[:, None]) * stride_kt + kv_head * stride_kh
                        + offs_d[None, :])  # fmt: skip
            v = tl.load(V + (start + offs_j[:, None]) * stride_vt + kv_head * stride_vh
                        + offs_d[None, :])  # fmt: skip
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = log2_scores(qk, qk_scale, softcap_scale, cap_log2e, HAS_SOFTCAP)
            if HAS_WINDOW:
                s = tl.where((offs_m[:, None] - offs_j[None, :]) < window, s, float("-inf"))
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PREC)
        hi = tl.minimum(diag + BLOCK_M, n)
        for j0 in range(diag, hi, BLOCK_N):
            offs_j = j0 + offs_n
            ok = offs_j < n
            k = tl.load(K + (start + offs_j[:, None]) * stride_kt + kv_head * stride_kh
                        + offs_d[None, :], mask=ok[:, None], other=0.0)  # fmt: skip
            v = tl.load(V + (start + offs_j[:, None]) * stride_vt + kv_head * stride_vh
                        + offs_d[None, :], mask=ok[:, None], other=0.0)  # fmt: skip
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = log2_scores(qk, qk_scale, softcap_scale, cap_log2e, HAS_SOFTCAP)
            diff = offs_m[:, None] - offs_j[None, :]
            mask = (diff >= 0) & ok[None, :]
            if HAS_WINDOW:
                mask = mask & (diff < window)
            s = tl.where(mask, s, float("-inf"))
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PREC)

        # Padding rows past the chunk may have seen nothing (l = 0); they are not stored.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + (start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def launch_prefill(
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
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    upcast: bool,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Launch `prefill_kernel` with explicit tile sizes (see reference.prefill_attention).

    max_seqlen (the longest chunk, known on the host) sizes the grid; without it the lengths
    are read back from the device, a sync per call."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert hq % hkv == 0 and d >= 16 and d & (d - 1) == 0, "head_dim: a power of two >= 16"
    assert block_m % block_n == 0, "diagonal tiles must start on a key-tile boundary"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if t == 0 or num_seqs == 0:
        return out
    # Grid size needs the longest chunk; with one chunk T bounds it without a device sync.
    if max_seqlen is not None:
        max_len = max_seqlen
    elif num_seqs == 1:
        max_len = t
    else:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    has_ctx = context_lens is not None and k_cache is not None
    if has_ctx:
        assert v_cache is not None and block_tables is not None
        kc, vc, bt, ctx = k_cache, v_cache, block_tables, context_lens
    else:  # unused dummies: the pointers are never dereferenced
        kc, vc, bt, ctx = q, q, cu_seqlens, cu_seqlens
    qk_scale, softcap_scale, cap_log2e, has_cap = score_constants(scale, softcap)
    grid = (triton.cdiv(max_len, block_m), hq, num_seqs)
    prefill_kernel[grid](
        q, k, v, out, cu_seqlens, ctx, kc, vc, bt,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1) if has_ctx else 0,
        vc.stride(0), vc.stride(1) if has_ctx else 0,
        bt.stride(0) if has_ctx else 0,
        ring_blocks, window if window is not None else 0, qk_scale, softcap_scale, cap_log2e,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        IS_RING=ring_blocks > 0, HAS_CTX=has_ctx, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=has_cap, UPCAST=upcast,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def prefill_flops(seq_lens: list[int], num_heads: int, head_dim: int, window: int | None) -> float:
    """Useful FLOPs of causal (windowed) attention, for benchmarks: 4*D per visible (q, k)."""
    pairs = 0
    for n in seq_lens:
        w = n if window is None else min(window, n)
        # row i sees min(i + 1, w) keys
        pairs += w * (w + 1) // 2 + (n - w) * w
    return 4.0 * head_dim * num_heads * pairs
