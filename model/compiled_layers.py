"""Decoder layers compiled by inductor for one-row forwards (a decode step of one sequence).

A one-sequence decode step on a CPU runs ~2,800 torch ops, most on 640-element rows: each
costs a few microseconds of dispatch for almost no arithmetic, and together they were as much
time as the GEMMs (benchmarks/RESULTS.md). Inductor fuses a layer's norms, activation
quantiser, GEMM epilogues, RoPE and residuals into a few C++ loops around the GEMMs
(`torch._int_mm`, left to ATen), and with its C++ wrapper calls them without Python.

A decode row's layer runs whole (`_row_layer`): projections, the decode token's K/V stored
into the cache and attention over its keys (kernels.reference.row_decode), all inside the
graph, through the cache and the keys' slots its backend hands over
(`AttentionBackend.row_cache`). Two graphs: the sliding-window layers' (always
`sliding_window` slots, those before position 0 masked: every shape fixed) and the global
layers' (as many slots as the context: one dynamic dimension). A one-row forward that is not
a decode row over at least two keys (a one-token prompt's first step) runs the eager layers.

Only int8 layers with the one-row GEMM (model/int8_gemm.py, VNNI) are compiled, and only one
row: a batch's per-op cost is shared by its rows. Each graph serves every layer of its kind
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
from gemma_serve.kernels.reference import row_decode
from gemma_serve.model.attention import AttentionBackend, RowCache
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


def _row_layer(cfg: ModelConfig) -> Callable:
    """A decoder layer for one decode row, its cache written and read in place."""

    def step(
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = layer.attention_inputs(x, (cos, sin))
        out = row_decode(
            q, k, v, k_cache, v_cache, slots, valid,
            softcap=cfg.attn_logit_softcapping, scale=cfg.scale,
        )  # fmt: skip
        return layer.after_attention(x, out.reshape(1, -1))

    return step


def _compile(fn: Callable, example: tuple, dynamic: bool = False) -> Callable:
    """fn compiled ahead of its calls for arguments like `example` (dynamo's aot_compile: a
    callable that runs the graph without dynamo's per-call frame handling). Every shape is
    fixed, but with `dynamic` the dimensions marked dynamic in `example`."""
    # C++ wrapper: the graph's kernels are called from C++, not from generated Python
    # (a one-row forward 12.8 ms against 14.4 with the Python wrapper, 16.0 eager).
    options = {"cpp_wrapper": True, "compile_threads": 1}
    compiled = torch.compile(
        fn, dynamic=None if dynamic else False, fullgraph=True, options=options
    )
    return compiled.aot_compile((example, {}))


class CompiledLayers:
    """`GemmaForCausalLM.compiled_layers`: runs a decoder layer, one decode row, through its
    compiled graph (module docstring)."""

    def __init__(self, model: GemmaForCausalLM, cache_dir: Path | None = None) -> None:
        reason = unavailable_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if cache_dir is not None:  # inductor reads it when it first writes (not at import)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        self.model = model
        self._graphs: dict[bool, Callable] = {}  # by "sliding window"

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        index = layer.self_attn.layer
        graph = self._graphs.get(self.model.config.is_sliding(index))
        row = attn.row_cache(index) if graph is not None else None
        # Eager: not compiled, not a decode row, or one key (a one-token prompt's step; the
        # graphs' shapes are checked from 2 keys on: dynamo specialises sizes 0 and 1).
        if graph is None or row is None or row.slots.shape[0] < 2:
            return layer(x, rope, attn)
        return graph(layer, x, *rope, row.k_cache, row.v_cache, row.slots, row.valid)

    @torch.inference_mode()
    def compile(self, rows: Mapping[int, RowCache], max_keys: int) -> None:
        """Compile the whole-layer graphs for the inputs a decode step gives them: a zero row,
        the first layer's weights and `rows`' caches and example keys (every layer's, as its
        backend will hand them over), the global layers' for 2 to `max_keys` keys. Then check
        dynamo's guards once for every layer and turn them off: they cost ~25 us a call (a
        tenth of a step), and every call is one of the cases checked here."""
        m = self.model.model
        x = torch.zeros(1, self.model.config.hidden_size)
        position = torch.zeros(1, dtype=torch.long)
        ropes = {False: m.rope_global, True: m.rope_local}
        graphs = {}
        for sliding, rope in ropes.items():
            mine = {i: r for i, r in rows.items() if m.config.is_sliding(i) == sliding}
            if mine:  # the global layers' number of keys grows with the context
                cos_sin = rope.cos_sin(position, x.dtype)
                keys = None if sliding else max_keys
                graphs[sliding] = self._compile_graph(mine, x, cos_sin, keys)
        self._graphs = graphs

    def _compile_graph(
        self,
        rows: Mapping[int, RowCache],
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        max_keys: int | None,
    ) -> Callable:
        """One whole-layer graph for `rows`' layers, its guards checked for each of them; with
        `max_keys` the number of keys is dynamic, checked for 2 and max_keys too."""
        layers = self.model.model.layers
        index, example = next(iter(rows.items()))
        # Compiled against copies (compiling never writes into a cache that is serving), made
        # as the caches were: an inference tensor or not is part of the guards. The keys are
        # made here, in inference mode, as the backend makes them in the forward pass.
        with torch.inference_mode(example.k_cache.is_inference()):
            k_cache, v_cache = example.k_cache.clone(), example.v_cache.clone()
        slots, valid = example.slots.clone(), example.valid.clone()
        keys = [(slots.clone(), valid.clone())]
        if max_keys is not None:
            torch._dynamo.mark_dynamic(slots, 0)
            torch._dynamo.mark_dynamic(valid, 0)
            keys += [
                (torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool))
                for n in (2, max_keys)
            ]
        step = _row_layer(self.model.config)
        example_args = (layers[index], x, *rope, k_cache, v_cache, slots, valid)
        graph = _compile(step, example_args, dynamic=max_keys is not None)
        for i, r in rows.items():
            for s, v in keys:
                if not graph.guard_check(layers[i], x, *rope, r.k_cache, r.v_cache, s, v):
                    raise ValueError(f"layer {i} differs from layer {index} ({len(s)} keys)")
        graph.disable_guard_check()
        return graph
