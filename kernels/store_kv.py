"""Triton scatter of new K/V rows into the caches (semantics: `kernels.reference.store_kv`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    K, V, KCache, VCache, SlotMapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (T,): copy token t's [Hkv, D] keys and values to slot_mapping[t] (skip if < 0)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + t).to(tl.int64)  # int64: slot * stride overflows i32
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # The slot test is broadcast through an add: the interpreter rejects a scalar-&-tensor mask.
    slot_ok = (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM) & slot_ok
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KCache + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VCache + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VCache.dtype.element_ty), mask=mask)


def launch_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_warps: int,
) -> None:
    """Scatter k, v [T, Hkv, D] into [num_slots, Hkv, D] caches; negative slots are skipped."""
    t, hkv, d = k.shape
    if t == 0:
        return
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_HEADS=hkv, HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        num_warps=num_warps,
    )  # fmt: skip
