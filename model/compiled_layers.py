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
layer (the layer's tensors are graph inputs, not constants). The numerics are the eager
layers' up to fp32 rounding order (inductor's reductions and fused arithmetic), which the
int8 activation rounding can carry on as it does batch-shape noise: logits differ from the
eager path's by up to a few tenths on the default model, greedy tokens agree (tests).

Needs a C++ compiler at run time. The first compile takes ~10 s; inductor caches its output
on disk (TORCHINDUCTOR_CACHE_DIR), after which compiling takes ~3 s, mostly one-time imports.
The server compiles in the background and switches when ready (server/cli.py).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from gemma_serve.model.attention import AttentionBackend
from gemma_serve.model.gemma import DecoderLayer, GemmaForCausalLM
from gemma_serve.model.int8_gemm import Int8Linear

log = logging.getLogger(__name__)


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
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for inductor"
    return None


def _attention_inputs(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.attention_inputs(x, (cos, sin))


def _after_attention(layer: DecoderLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return layer.after_attention(x, out)


@functools.cache
def _compiled() -> tuple[Callable, Callable]:
    """The two compiled halves, made once per process: dynamo keeps its graphs per compiled
    callable, so engines built later in the process reuse them instead of compiling again."""
    # C++ wrapper: the graph's kernels are called from C++, not from generated Python
    # (16.0 -> 12.8 ms a step here, against 14.4 ms with the Python wrapper).
    options = {"cpp_wrapper": True, "compile_threads": 1}
    return tuple(
        torch.compile(fn, dynamic=False, fullgraph=True, options=options)
        for fn in (_attention_inputs, _after_attention)
    )


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
        self._inputs, self._after = _compiled()

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        q, k, v = self._inputs(layer, x, *rope)
        out = attn(layer.self_attn.layer, q, k, v)
        return self._after(layer, x, out.reshape(1, -1))

    @torch.inference_mode()
    def compile(self) -> None:
        """Compile both halves on the first layer's weights and a zero row (the inputs a
        decode step gives them: the same shapes, dtypes and strides, so its calls find the
        graphs ready)."""
        m = self.model.model
        layer = m.layers[0]
        x = torch.zeros(1, self.model.config.hidden_size)
        rope = m.rope_global.cos_sin(torch.zeros(1, dtype=torch.long), x.dtype)
        q, _, _ = self._inputs(layer, x, *rope)
        self._after(layer, x, torch.zeros_like(q).reshape(1, -1))
