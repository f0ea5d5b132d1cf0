"""Deployment swaps applied once after load: the network (model/gemma.py) stays plain torch.

On CPUs the projections and the LM head are replaced by modules with the same call:
- quantization "none": fp32 GEMMs through oneDNN on packed weights (model/cpu_gemm.py), exact;
- quantization "int8": int8 weights x per-token int8 activations (model/int8_gemm.py); the
  embedding table is stored in int8 too and a tied LM head computes on the same int8 rows.
A swapped-out float weight is released: no fp32 copy of a quantised weight is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gemma_serve.model import cpu_gemm, int8_gemm
from gemma_serve.model.config import QUANTIZATIONS
from gemma_serve.model.gemma import GemmaForCausalLM, Linear
from torch import nn


@dataclass(frozen=True)
class Deployment:
    """What `deploy` did, for logs and benchmark records."""

    quantization: str  # "none" or "int8"
    linear: str  # the kernel the projections run: "torch", "onednn-fp32-packed", "onednn-w8a8"


def check(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError for a quantization mode this device/dtype cannot run."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int8":
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError(
                "--quantization int8 is a CPU mode (fp32 activations): use --device cpu"
            )
        if not int8_gemm.available():
            raise ValueError("--quantization int8 needs a torch build with oneDNN (x86 CPUs)")


def _swap_linears(model: nn.Module, make) -> None:
    """Replace every `Linear` under model by make(weight), releasing the float weight."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear)
    ]
    for parent, name in targets:
        weight = getattr(parent, name).weight
        setattr(parent, name, make(weight))
        del weight


def deploy(
    model: GemmaForCausalLM, device: torch.device, dtype: torch.dtype, quantization: str, pack: bool
) -> Deployment:
    """Apply the swaps for `quantization` (and fp32 packing when `pack`) in place."""
    check(quantization, device, dtype)
    if quantization == "int8":
        # The head: one activation pass, smoothed by the final norm's scale (int8_gemm.py).
        head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        smooth = (1.0 + model.model.norm.weight.detach().float()).abs().sqrt().clamp_(min=1e-3)
        model.lm_head = int8_gemm.Int8Linear.from_float(head, passes=1, smooth=smooth)
        del head
        _swap_linears(model, int8_gemm.Int8Linear.from_float)
        table = model.model.embed_tokens.weight
        model.model.embed_tokens = int8_gemm.Int8Embedding(*int8_gemm.quantize_rows(table))
        del table
        return Deployment("int8", "onednn-w8a8")
    if pack and cpu_gemm.should_pack(device, dtype):
        _swap_linears(model, cpu_gemm.PackedLinear)
        if model.lm_head is None:  # a packed copy of the tied table for the step's biggest GEMM
            model.lm_head = cpu_gemm.PackedLinear(model.model.embed_tokens.weight)
        return Deployment("none", "onednn-fp32-packed")
    return Deployment("none", "torch")
