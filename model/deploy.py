"""Deployment swaps applied once after load: the network (model/gemma.py) stays plain torch.

On CPUs the projections and the LM head are replaced by modules with the same call:
- quantization "none": fp32 GEMMs through oneDNN on packed weights (model/cpu_gemm.py), exact;
- quantization "int8": int8 weights x per-token int8 activations (model/int8_gemm.py): two
  activation passes in the projections; the LM head one pass, the second for each row's top
  candidates; the embedding table is stored in int8 too, and a tied head reads its rows.
A swapped-out float weight is released: no fp32 copy is kept.
The int8 layout is a plain dict of tensors (`int8_state`), so it can be cached beside a
converted checkpoint (model/int8_cache.py) and installed into a model that never had fp32
weights (`loader.meta_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gemma_serve.model import cpu_gemm, int8_gemm
from gemma_serve.model.config import QUANTIZATIONS
from gemma_serve.model.gemma import Attention, GemmaForCausalLM, Linear, RMSNorm
from torch import nn

EMBED = "model.embed_tokens"


@dataclass(frozen=True)
class Deployment:
    """What `deploy` did, for logs and benchmark records."""

    quantization: str  # "none" or "int8"
    linear: str  # the projections' kernels: "torch", "onednn-fp32-packed", int8_gemm.kernels()
    from_cache: bool = False  # int8 weights read from the conversion cache


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


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent, attribute) of every `Linear` but an untied LM head."""
    return [
        (f"{prefix}.{name}" if prefix else name, parent, name)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear) and not (parent is model and name == "lm_head")
    ]


def int8_state(model: GemmaForCausalLM) -> dict[str, torch.Tensor]:
    """The int8 layout of a float model (module docstring of model/int8_gemm.py)."""
    state: dict[str, torch.Tensor] = {}
    table = model.model.embed_tokens.weight
    if model.lm_head is not None:  # untied: its own rows (a tied head reads the table's)
        state["lm_head.q"], state["lm_head.scale"] = int8_gemm.quantize_rows(model.lm_head.weight)
    for name, parent, attr in _linears(model):
        q, scale = int8_gemm.quantize_rows(getattr(parent, attr).weight)
        state.update({f"{name}.q": q, f"{name}.scale": scale})
    state[f"{EMBED}.q"], state[f"{EMBED}.scale"] = int8_gemm.quantize_rows(table)
    for name, p in model.named_parameters():
        if "norm" in name:
            state[name] = p.detach().float().clone()
    return state


def install_int8(model: GemmaForCausalLM, state: dict[str, torch.Tensor]) -> str:
    """Swap the int8 modules of `state` in; the model's norms take its float tensors. Returns
    the kernels the projections run (`Deployment.linear`)."""
    vnni = int8_gemm.has_vnni()  # read /proc/cpuinfo once, not per layer
    # The modules keep the int8 tensors they are given, views of the cache's file map when
    # they come from it (model/int8_cache.py): nothing is copied.
    for name, parent, attr in _linears(model):
        q, scale = state[f"{name}.q"], state[f"{name}.scale"]
        setattr(parent, attr, int8_gemm.Int8Linear(q, scale, vnni=vnni))
    table = int8_gemm.Int8Embedding(state[f"{EMBED}.q"], state[f"{EMBED}.scale"])
    model.model.embed_tokens = table
    if "lm_head.q" in state:
        head_q, head_scale = state["lm_head.q"], state["lm_head.scale"]
    else:
        head_q, head_scale = table.q, table.scale
    model.lm_head = int8_gemm.Int8Head(head_q, head_scale, vnni=vnni)
    model.to_empty(device=torch.device("cpu"))  # only the norms are left to allocate
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    freeze_norms(model)
    return int8_gemm.kernels(vnni)


def freeze_norms(model: nn.Module) -> None:
    """The weights are final: every RMSNorm computes its 1 + w once, and attention with q/k
    norms stacks theirs per head."""
    for module in model.modules():
        qk_norms = isinstance(module, Attention) and module.q_norm is not None
        if isinstance(module, RMSNorm) or qk_norms:
            module.freeze()


def deploy(
    model: GemmaForCausalLM, device: torch.device, dtype: torch.dtype, quantization: str, pack: bool
) -> Deployment:
    """Apply the swaps for `quantization` (and fp32 packing when `pack`) in place."""
    check(quantization, device, dtype)
    if quantization == "int8":  # installing reallocates the norms, then freezes them
        return Deployment("int8", install_int8(model, int8_state(model)))
    freeze_norms(model)
    if pack and cpu_gemm.should_pack(device, dtype):
        for _, parent, attr in _linears(model):
            setattr(parent, attr, cpu_gemm.PackedLinear(getattr(parent, attr).weight))
        # The step's biggest GEMM: a packed copy of the tied table (or the untied head). A
        # tensor-parallel head (model/parallel.py) holds a Linear, packed above.
        if model.lm_head is None or isinstance(model.lm_head, Linear):
            head = (
                model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
            )
            model.lm_head = cpu_gemm.PackedLinear(head)
        return Deployment("none", "onednn-fp32-packed")
    return Deployment("none", "torch")
