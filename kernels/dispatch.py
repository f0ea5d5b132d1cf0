"""Choose the attention ops once at start: Triton kernels on CUDA, torch references elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gemma_serve.kernels import reference


@dataclass(frozen=True)
class AttentionOps:
    """The three attention primitives the engine calls, all with the reference signatures.

    decode_plan, where set, computes once per pool what decode_attention would recompute in
    every layer; decode_attention then takes it as `plan` (the reference: the key slots).
    """

    name: str
    store_kv: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    decode_plan: Callable[..., object] | None = None


REFERENCE_OPS = AttentionOps(
    name="torch-reference",
    store_kv=reference.store_kv,
    prefill_attention=reference.prefill_attention,
    decode_attention=reference.decode_attention,
    decode_plan=reference.decode_plan,
)


def select_ops(device: torch.device, force_reference: bool = False) -> AttentionOps:
    """Triton kernels when running on a CUDA device (unless forced off), else the references."""
    if force_reference or device.type != "cuda":
        return REFERENCE_OPS
    from gemma_serve.kernels import triton_ops  # imported lazily: triton is only needed on GPUs

    return AttentionOps(
        name="triton",
        store_kv=triton_ops.store_kv,
        prefill_attention=triton_ops.prefill_attention,
        decode_attention=triton_ops.decode_attention,
    )
