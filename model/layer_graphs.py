"""Compiled decoder-layer graphs run without dynamo or inductor in the process.

model/compiled_layers.py compiles the whole-layer graphs (in a child process, so that the
compiler's ~200 MiB of modules never enter the server's) and records them
(`CompiledLayers.record`): inductor's C++-wrapper output is a CPython extension module whose
`inductor_entry_cpp` takes the graph's inputs as tensor handles, in an order recorded with
where each input comes from. Here those modules are loaded with importlib and called through
`torch._C._aoti`'s handle conversions, as inductor's own wrapper calls them: the same
arithmetic, the compiler's modules never imported (+0.3 MiB of RSS against ~200 MiB,
benchmarks/RESULTS.md). The generated code checks every input's size and stride on each call;
loading checks one call of each graph against the compiling process's output, bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gemma_serve.model.attention import AttentionBackend, RowCache
from gemma_serve.model.gemma import DecoderLayer, GemmaForCausalLM
from safetensors.torch import load_file

# A row's values in the order compiled_layers records and passes them, and the mark of the
# dynamic number of keys (the slots' length).
ROW = ("x", "cos", "sin", "k_cache", "v_cache", "slots", "valid")
SIZE = -1
_SLOTS = ROW.index("slots")


@dataclass(frozen=True)
class _Bound:
    """One layer's call of its graph: the layer's tensors in place, the row's slots marked."""

    entry: Callable
    inputs: list  # tensors, or None where a row input goes
    row: list[tuple[int, int]]  # (position, index into the row's values, or SIZE)


def _load_entry(library: str) -> Callable:
    """A generated module's `inductor_entry_cpp` (it reads torch's tensor-data pointer from
    the environment when it is initialised, as inductor's own loader arranges)."""
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
        torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr  # type: ignore[attr-defined]
    )
    # The extension's init function is PyInit_inductor_entry_cpp: the name's last part.
    name = f"{Path(library).name.split('.')[0]}.inductor_entry_cpp"
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as inductor's loader does: one module per library
    spec.loader.exec_module(module)
    return module.inductor_entry_cpp


def _resolve(layer: DecoderLayer, path: str) -> torch.Tensor:
    value: object = layer
    for part in path.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"layer attribute {path} is not a tensor")
    return value


def _run(entry: Callable, inputs: list) -> torch.Tensor:
    handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(inputs)  # type: ignore[attr-defined]
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(entry(handles))[0]  # type: ignore[attr-defined]


class RowLayers:
    """`GemmaForCausalLM.compiled_layers`' common call: a decode row's layer through its graph
    (`_graph_call`), anything else through the eager layer: not a decode row, or one key (a
    one-token prompt's first step; the graphs are checked from two keys on, dynamo
    specialising sizes 0 and 1)."""

    def _has_graph(self, index: int) -> bool:
        raise NotImplementedError

    def _graph_call(
        self, layer: DecoderLayer, x: torch.Tensor, rope: tuple[torch.Tensor, ...], row: RowCache
    ) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        index = layer.self_attn.layer
        row = attn.row_cache(index) if self._has_graph(index) else None
        if row is None or row.slots.shape[0] < 2:
            return layer(x, rope, attn)
        return self._graph_call(layer, x, rope, row)


class LoadedLayers(RowLayers):
    """`GemmaForCausalLM.compiled_layers` from recorded graphs (module docstring)."""

    def __init__(self, model: GemmaForCausalLM, directory: Path) -> None:
        self.model = model
        manifest = json.loads((directory / "graphs.json").read_text())
        cfg, layers = model.config, model.model.layers
        self._bound: dict[int, _Bound] = {}
        for graph in manifest["graphs"]:
            sources: list[str] = graph["sources"]
            if len(sources) != graph["inputs"]:
                raise ValueError("the recorded sources do not match the graph's inputs")
            row = []  # (position, index into a row's values; SIZE: the number of keys)
            for position, source in enumerate(sources):
                kind, _, what = source.partition(":")
                if kind == "row" and what in ROW:
                    row.append((position, ROW.index(what)))
                elif kind == "size":
                    row.append((position, SIZE))
                elif kind != "layer":
                    raise ValueError(f"a graph input from {source!r}")
            entry = _load_entry(graph["library"])
            for index in range(cfg.num_hidden_layers):
                if cfg.is_sliding(index) == graph["sliding"]:
                    inputs = [
                        _resolve(layers[index], s[len("layer:") :])
                        if s.startswith("layer:")
                        else None
                        for s in sources
                    ]
                    self._bound[index] = _Bound(entry, inputs, row)
        self._check(manifest["graphs"], load_file(directory / "reference.safetensors"))

    def _check(self, graphs: list[dict], tensors: dict[str, torch.Tensor]) -> None:
        """One call of each graph, on zeroed caches, equal to the compiling process's."""
        for graph in graphs:
            ref, kind = graph["reference"], "sliding" if graph["sliding"] else "global"
            row = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(kind + ".")}
            shape, dtype = ref["cache_shape"], getattr(torch, ref["cache_dtype"])
            row["k_cache"], row["v_cache"] = (torch.zeros(shape, dtype=dtype) for _ in "kv")
            got = self._call(ref["layer"], tuple(row[name] for name in ROW))
            if not torch.equal(got, row["out"]):
                raise ValueError(f"the loaded graph of layer {ref['layer']} computes otherwise")

    def _call(self, index: int, values: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Layer `index`'s graph on a row's values (in ROW's order)."""
        bound = self._bound[index]
        inputs = list(bound.inputs)
        for position, i in bound.row:
            inputs[position] = torch.tensor(values[_SLOTS].shape[0]) if i == SIZE else values[i]
        return _run(bound.entry, inputs)

    def _has_graph(self, index: int) -> bool:
        return index in self._bound

    def _graph_call(
        self, layer: DecoderLayer, x: torch.Tensor, rope: tuple[torch.Tensor, ...], row: RowCache
    ) -> torch.Tensor:
        values = (x, *rope, row.k_cache, row.v_cache, row.slots, row.valid)
        return self._call(layer.self_attn.layer, values)
