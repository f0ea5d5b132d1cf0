"""Decoder layers compiled by inductor for one-row forwards (a decode step of one sequence).

A one-sequence decode step on a CPU runs ~2,800 torch ops, most on 640-element rows: each
costs a few microseconds of dispatch for almost no arithmetic, and together they were as much
time as the GEMMs (benchmarks/RESULTS.md). Inductor fuses each half of a layer (norms,
activation quantiser, GEMM epilogues, RoPE, residuals) into a few C++ loops around the GEMMs
(`torch._int_mm`, left to ATen), and with its C++ wrapper calls them without Python. The
attention backend stays eager between the halves (`DecoderLayer.attention_inputs` and
`after_attention`): it reads and writes the KV cache through the batch's tables.

Only int8 layers with the one-row GEMM (model/int8_gemm.py, VNNI) are compiled, and only one
row: a batch's per-op cost is shared by its rows. One compiled graph per half serves every
layer (the layer's tensors are graph inputs, not constants). The halves are compiled ahead of
their calls (dynamo's aot_compile), and dynamo's guards are checked once for every layer at
compile time instead of on every call (`CompiledLayers.compile`): with torch.compile's usual
entry, dynamo's frame handling and guards cost ~20-25 us of each ~50 us call.

The numerics are the eager layers' up to fp32 rounding order (inductor's reductions and fused
arithmetic), which the int8 activation rounding can carry on as it does batch-shape noise:
logits differ from the eager path's by up to a few tenths on the default model, greedy tokens
agree (tests).

Needs a C++ compiler at run time. The first compile takes ~10 s; inductor caches its output
on disk (TORCHINDUCTOR_CACHE_DIR), after which compiling takes ~3 s, mostly one-time imports.
The server compiles in the background and switches when ready (LLMEngine.compile_layers).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from gemma_serve.model.attention import AttentionBackend
from gemma_serve.model.gemma import DecoderLayer, GemmaForCausalLM
from gemma_serve.model.int8_gemm import Int8Linear


def unavailable_reason(model: GemmaForCausalLM) -> str | None:
    """Why this model's layers cannot be compiled here, or None if they can."""
    layers = model.model.layers
    if not layers:
        return "the model has no layers"
    first = layers[0]
    linears = (first.self_attn.qkv_proj, first.self_attn.o_proj)
    linears += (first.mlp.gate_up_proj, first.mlp.down_proj)
    if not all(isinstance(m, Int8Linear) and m.rows is not None for m in linears):
        return "only int8 layers with the one-row GEMM (--quantization int8, VNNI) compile"
    if first.input_layernorm.weight.device.type != "cpu":
        return "compiled layers are for CPUs"
    return missing_compiler()


def missing_compiler() -> str | None:
    """Why inductor has no C++ compiler here ($CXX, else g++), or None if it has one."""
    compiler = os.environ.get("CXX", "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) for inductor"


def _attention_inputs(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.attention_inputs(x, (cos, sin))


def _after_attention(layer: DecoderLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return layer.after_attention(x, out)


def _compile(fn: Callable, example: tuple) -> Callable:
    """fn compiled ahead of its calls for arguments like `example` (dynamo's aot_compile: a
    callable that runs the graph without dynamo's per-call frame handling)."""
    # C++ wrapper: the graph's kernels are called from C++, not from generated Python
    # (a one-row forward 12.8 ms against 14.4 with the Python wrapper, 16.0 eager).
    options = {"cpp_wrapper": True, "compile_threads": 1}
    compiled = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    return compiled.aot_compile((example, {}))


class CompiledLayers:
    """`GemmaForCausalLM.compiled_layers`: runs a decoder layer, one row, through the compiled
    halves."""

    def __init__(self, model: GemmaForCausalLM, cache_dir: Path | None = None) -> None:
        reason = unavailable_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if cache_dir is not None:  # inductor reads it when it first writes (not at import)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        self.model = model
        self._inputs: Callable | None = None
        self._after: Callable | None = None

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        assert self._inputs is not None and self._after is not None, "compile() first"
        q, k, v = self._inputs(layer, x, *rope)
        out = attn(layer.self_attn.layer, q, k, v)
        return self._after(layer, x, out.reshape(1, -1))

    @torch.inference_mode()
    def compile(self) -> None:
        """Compile both halves for the inputs a decode step gives them (the first layer's
        weights, a zero row: the same shapes, dtypes and strides), then check dynamo's guards
        once for every layer and both RoPE tables and turn them off: they cost ~25 us a call
        (a tenth of a step), and every call is one of the cases checked here."""
        m = self.model.model
        x = torch.zeros(1, self.model.config.hidden_size)
        position = torch.zeros(1, dtype=torch.long)
        ropes = [r.cos_sin(position, x.dtype) for r in (m.rope_global, m.rope_local)]
        first = m.layers[0]
        inputs = _compile(_attention_inputs, (first, x, *ropes[0]))
        q, _, _ = inputs(first, x, *ropes[0])
        out = torch.zeros_like(q).reshape(1, -1)
        after = _compile(_after_attention, (first, x, out))
        for layer in m.layers:
            same = all(inputs.guard_check(layer, x, *rope) for rope in ropes)
            if not (same and after.guard_check(layer, x, out)):
                raise ValueError(f"layer {layer.self_attn.layer} differs from the first")
        inputs.disable_guard_check()
        after.disable_guard_check()
        self._inputs, self._after = inputs, after
