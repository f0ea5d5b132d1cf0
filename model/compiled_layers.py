"""Decoder layers compiled by inductor for one-row forwards (a decode step of one sequence).

A one-sequence decode step on a CPU runs ~2,800 torch ops, most on 640-element rows: each
costs a few microseconds of dispatch for almost no arithmetic, and together they were as much
time as the GEMMs (benchmarks/RESULTS.md). Inductor fuses a layer's norms, activation
quantiser, GEMM epilogues, RoPE and residuals into a few C++ loops around the GEMMs
(`torch._int_mm`, left to ATen), and with its C++ wrapper calls them without Python.

Two kinds of graph:
- a sliding-window layer whole (`_window_layer`): the decode token's K/V stored into the
  sequence's ring and attention over the window's slots inside the graph
  (kernels.reference.window_decode: always `sliding_window` slots, those before position 0
  masked, so every shape is fixed), when the backend hands over the ring
  (`AttentionBackend.row_window`);
- otherwise each half of a layer around the attention backend (`DecoderLayer.attention_inputs`
  and `after_attention`), which reads and writes the KV cache through the batch's tables: the
  global layers, whose context grows with every token.

Only int8 layers with the one-row GEMM (model/int8_gemm.py, VNNI) are compiled, and only one
row: a batch's per-op cost is shared by its rows. One graph of each kind serves every layer
(the layer's tensors, its caches included, are graph inputs, not constants). They are compiled
ahead of their calls (dynamo's aot_compile), and dynamo's guards are checked once for every
layer at compile time instead of on every call (`CompiledLayers.compile`): with
torch.compile's usual entry, dynamo's frame handling and guards cost ~20-25 us of each ~50 us
call.

The numerics are the eager layers' up to fp32 rounding order (inductor's reductions and fused
arithmetic), which the int8 activation rounding can carry on as it does batch-shape noise:
logits differ from the eager path's by up to a few tenths on the default model, greedy tokens
agree (tests).

Needs a C++ compiler at run time. The first compile takes ~10-20 s; inductor caches its output
on disk (TORCHINDUCTOR_CACHE_DIR), after which compiling takes ~3-5 s, mostly one-time imports.
The server compiles in the background and switches when ready (LLMEngine.compile_layers).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from gemma_serve.kernels.reference import window_decode
from gemma_serve.model.attention import AttentionBackend, RowWindow
from gemma_serve.model.config import ModelConfig
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


def _window_layer(cfg: ModelConfig, block_size: int) -> Callable:
    """A sliding-window layer for one decode row, its ring read and written in place."""

    def step(
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        table: torch.Tensor,
        seq_len: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = layer.attention_inputs(x, (cos, sin))
        out = window_decode(
            q, k, v, k_cache, v_cache, table, seq_len,
            block_size=block_size, window=cfg.sliding_window,
            softcap=cfg.attn_logit_softcapping, scale=cfg.scale,
        )  # fmt: skip
        return layer.after_attention(x, out.reshape(1, -1))

    return step


def _compile(fn: Callable, example: tuple) -> Callable:
    """fn compiled ahead of its calls for arguments like `example` (dynamo's aot_compile: a
    callable that runs the graph without dynamo's per-call frame handling)."""
    # C++ wrapper: the graph's kernels are called from C++, not from generated Python
    # (a one-row forward 12.8 ms against 14.4 with the Python wrapper, 16.0 eager).
    options = {"cpp_wrapper": True, "compile_threads": 1}
    compiled = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    return compiled.aot_compile((example, {}))


class CompiledLayers:
    """`GemmaForCausalLM.compiled_layers`: runs a decoder layer, one row, through its compiled
    graph (module docstring)."""

    def __init__(self, model: GemmaForCausalLM, cache_dir: Path | None = None) -> None:
        reason = unavailable_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if cache_dir is not None:  # inductor reads it when it first writes (not at import)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        self.model = model
        self._inputs: Callable | None = None
        self._after: Callable | None = None
        self._window: Callable | None = None

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        assert self._inputs is not None and self._after is not None, "compile() first"
        index = layer.self_attn.layer
        ring = attn.row_window(index) if self._window is not None else None
        if ring is not None:
            assert self._window is not None
            return self._window(
                layer, x, *rope, ring.k_cache, ring.v_cache, ring.table, ring.seq_len
            )
        q, k, v = self._inputs(layer, x, *rope)
        out = attn(index, q, k, v)
        return self._after(layer, x, out.reshape(1, -1))

    @torch.inference_mode()
    def compile(self, windows: Mapping[int, RowWindow] | None = None) -> None:
        """Compile the halves for the inputs a decode step gives them (the first layer's
        weights, a zero row: the same shapes, dtypes and strides), and with `windows` (each
        sliding-window layer's cache, as its backend will hand it over) the whole-layer graph
        of those layers; then check dynamo's guards once for every layer and turn them off:
        they cost ~25 us a call (a tenth of a step), and every call is one of the cases
        checked here."""
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
        window = self._compile_window(windows, x, ropes[1]) if windows else None
        inputs.disable_guard_check()
        after.disable_guard_check()
        self._inputs, self._after, self._window = inputs, after, window

    def _compile_window(
        self, windows: Mapping[int, RowWindow], x: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> Callable:
        """The sliding-window layers' graph, guards checked for each of `windows`' layers."""
        layers = self.model.model.layers
        index, example = next(iter(windows.items()))
        # Compiled against copies (compiling never writes into a cache that is serving), made
        # as the caches were: an inference tensor or not is part of the guards.
        with torch.inference_mode(example.k_cache.is_inference()):
            k_cache, v_cache = example.k_cache.clone(), example.v_cache.clone()
        step = _window_layer(self.model.config, example.block_size)
        args = (x, *rope, k_cache, v_cache, example.table, example.seq_len)
        window = _compile(step, (layers[index], *args))
        for i, w in windows.items():
            if w.block_size != example.block_size or not window.guard_check(
                layers[i], x, *rope, w.k_cache, w.v_cache, w.table, w.seq_len
            ):
                raise ValueError(f"sliding-window layer {i} differs from layer {index}")
        window.disable_guard_check()
        return window
