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
The server compiles in the background and switches when ready (LLMEngine.compile_layers), in
a child process: `record` writes what model/layer_graphs.py needs to run the graphs in the
server without dynamo or inductor (their modules cost ~200 MiB of RSS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from gemma_serve.kernels.reference import row_decode
from gemma_serve.model.attention import RowCache
from gemma_serve.model.config import ModelConfig
from gemma_serve.model.gemma import DecoderLayer, GemmaForCausalLM
from gemma_serve.model.int8_gemm import Int8Linear
from gemma_serve.model.layer_graphs import ROW, RowLayers
from safetensors.torch import save_file


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


# A generated C++ module's name ends so in sys.modules; how many input handles it takes (its
# source says).
_ENTRY = ".inductor_entry_cpp"
_INPUTS = re.compile(r"steal_from_raw_handles_to_raii_handles\(input_handles, (\d+)\)")


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


class CompiledLayers(RowLayers):
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
        # Per graph (by "sliding window"): the layer and row it was compiled on, and the C++
        # modules its compile loaded (what `record` writes down).
        self._examples: dict[bool, tuple[int, RowCache]] = {}
        self._modules: dict[bool, list] = {}

    def _has_graph(self, index: int) -> bool:
        return self.model.config.is_sliding(index) in self._graphs

    def _graph_call(
        self, layer: DecoderLayer, x: torch.Tensor, rope: tuple[torch.Tensor, ...], row: RowCache
    ) -> torch.Tensor:
        graph = self._graphs[self.model.config.is_sliding(layer.self_attn.layer)]
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
        sliding = self.model.config.is_sliding(index)
        self._examples[sliding] = (index, example)
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
        before = set(sys.modules)
        graph = _compile(step, example_args, dynamic=max_keys is not None)
        self._modules[sliding] = [
            sys.modules[name] for name in set(sys.modules) - before if name.endswith(_ENTRY)
        ]
        for i, r in rows.items():
            for s, v in keys:
                if not graph.guard_check(layers[i], x, *rope, r.k_cache, r.v_cache, s, v):
                    raise ValueError(f"layer {i} differs from layer {index} ({len(s)} keys)")
        graph.disable_guard_check()
        return graph

    @torch.inference_mode()
    def record(self, directory: Path) -> None:
        """Write what runs the compiled graphs without dynamo or inductor in the process
        (model/layer_graphs.py) to `directory`: graphs.json (each graph's C++ module, the
        number of its inputs and where each comes from) and reference.safetensors (one call
        of each, on zeroed caches, to check the loaded graphs against).

        Inductor's C++-wrapper output is a CPython extension module whose
        `inductor_entry_cpp` takes the graph's inputs as tensor handles; their order is
        dynamo's, read here by identity from one call: a layer tensor by its attribute path,
        a row input by name, the dynamic number of keys ("size:slots") as an integer."""
        m = self.model.model
        graphs: list[dict] = []
        reference: dict[str, torch.Tensor] = {}
        for sliding, graph in self._graphs.items():
            index, example = self._examples[sliding]
            rope = (m.rope_local if sliding else m.rope_global).cos_sin(
                torch.tensor([70]), torch.float32
            )
            keys = example.slots.shape[0]
            row = {
                "x": torch.randn(
                    1, self.model.config.hidden_size, generator=torch.Generator().manual_seed(index)
                ),
                "cos": rope[0],
                "sin": rope[1],
                "k_cache": torch.zeros_like(example.k_cache),
                "v_cache": torch.zeros_like(example.v_cache),
                "slots": torch.arange(keys),
                "valid": torch.ones(keys, dtype=torch.bool),
            }
            args, out = _captured_call(graph, m.layers[index], row)
            found = [module for module in self._modules[sliding] if _inputs(module) == len(args)]
            if len(found) != 1:
                raise ValueError(f"{len(found)} C++ modules with {len(args)} inputs, not one")
            kind = "sliding" if sliding else "global"
            graphs.append(
                {
                    "sliding": sliding,
                    "library": found[0].__file__,
                    "inputs": len(args),
                    "sources": [_source(a, m.layers[index], row) for a in args],
                    "reference": {
                        "layer": index,
                        "cache_shape": list(example.k_cache.shape),
                        "cache_dtype": str(example.k_cache.dtype).removeprefix("torch."),
                    },
                }
            )
            for k in ROW:
                if "cache" not in k:
                    reference[f"{kind}.{k}"] = row[k].contiguous()
            reference[f"{kind}.out"] = out
        (directory / "graphs.json").write_text(json.dumps({"graphs": graphs}))
        save_file(reference, directory / "reference.safetensors")


def _captured_call(graph: Callable, layer: DecoderLayer, row: dict) -> tuple[list, torch.Tensor]:
    """One call of the graph: the inputs dynamo hands the compiled graph, in its order, and
    the result."""
    compiled = graph._artifacts.compiled_fn  # type: ignore[attr-defined]
    env = graph.fn.__globals__  # type: ignore[attr-defined]
    names = [k for k, v in env.items() if v is compiled]
    if len(names) != 1:
        raise ValueError("the compiled graph's entry is not where dynamo puts it")
    captured: list[tuple] = []

    def spy(*args: object) -> object:
        captured.append(args)
        return compiled(*args)

    env[names[0]] = spy
    try:
        out = graph(layer, *(row[k] for k in ROW))
    finally:
        env[names[0]] = compiled
    return list(captured[0]), out


def _source(arg: object, layer: DecoderLayer, row: dict) -> str:
    """Where a graph input comes from: "row:NAME", "layer:ATTRIBUTE.PATH" or "size:slots"."""
    if isinstance(arg, int) and arg == row["slots"].shape[0]:
        return "size:slots"
    for name in ROW:
        if arg is row[name]:
            return f"row:{name}"
    for module_name, module in layer.named_modules():
        found = {**vars(module), **module._parameters, **module._buffers}
        for attr, value in found.items():
            if value is arg:
                return f"layer:{module_name}.{attr}" if module_name else f"layer:{attr}"
    raise ValueError(f"a graph input from nowhere known: {arg!r:.80}")


def _inputs(module: object) -> int:
    """How many input handles a generated C++ module takes (its source beside it says)."""
    source = Path(module.__file__).with_suffix(".cpp").read_text()  # type: ignore[attr-defined]
    found = _INPUTS.search(source)
    return int(found.group(1)) if found else -1
