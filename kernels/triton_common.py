"""Triton helpers the kernels share: reading cached K/V through a block table, the log2-domain
score math and the online-softmax step.

Scores are kept in the log2 domain (the softmax scale is multiplied by log2(e)) so the online
softmax can use exp2, which maps to a single hardware instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter has no tanh): t = exp(-2|x|), tanh = sign(x)(1-t)/(1+t)."""
    t = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))  # log2(e): a jit body reads no globals
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, r, -r)


@triton.jit
def log2_scores(qk, qk_scale, softcap_scale, cap_log2e, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> scaled, soft-capped scores in the log2 domain (cap before any masking)."""
    if HAS_SOFTCAP:
        return cap_log2e * tanh(qk * softcap_scale)
    return qk * qk_scale


@triton.jit
def online_update(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """One online-softmax step: fold a tile of log2 scores `s` [M, N] and values `v` [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # masked scores are -inf -> exactly 0
    l_i = l_i * alpha + tl.sum(p, 1)
    # P in V's dtype: bf16 tensor-core MMA on GPU; fp32 when interpreting (V was upcast).
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def load_cached_kv(
    KCache, VCache, bt_row, pos, ok, kv_head, offs_d,
    stride_kcs, stride_kch, stride_vcs, stride_vch, ring_blocks,
    K_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_RING: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Cached keys and values [N, D] of KV head kv_head at positions `pos` [N], through one
    block-table row (paged, or a ring of ring_blocks), cast to K_DTYPE / V_DTYPE as the
    reference casts them (then fp32 when UPCAST). Rows that are not `ok` load 0: a stale or
    never-written slot may hold NaN, and 0 * NaN would poison the sum."""
    blk = pos // BLOCK_SIZE
    if IS_RING:
        blk = blk % ring_blocks
    bid = tl.load(bt_row + blk, mask=ok, other=0)
    slot = bid.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # int64: big caches overflow i32
    kc = KCache + slot[:, None] * stride_kcs + kv_head * stride_kch + offs_d[None, :]
    vc = VCache + slot[:, None] * stride_vcs + kv_head * stride_vch + offs_d[None, :]
    k = tl.load(kc, mask=ok[:, None], other=0.0).to(K_DTYPE)
    v = tl.load(vc, mask=ok[:, None], other=0.0).to(V_DTYPE)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


def score_constants(scale: float, softcap: float | None) -> tuple[float, float, float, bool]:
    """(qk_scale, softcap_scale, cap_log2e, has_softcap) for the log2-domain score math."""
    has_cap = softcap is not None and softcap > 0
    cap = float(softcap) if has_cap else 1.0
    return scale * LOG2E, scale / cap, cap * LOG2E, has_cap
