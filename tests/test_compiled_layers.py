"""Compiled decoder layers (model/compiled_layers.py): the default model's one-row steps through
inductor's graphs give the eager layers' tokens, and the engine compiles only where it may."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from gemma_serve.model import compiled_layers, int8_gemm
from gemma_serve.model.gguf_convert import cache_root
from gemma_serve.model.layer_graphs import LoadedLayers
from gemma_serve.server.engine import layer_compiler
from gemma_serve.server.engine.cache_attention import row_caches
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from safetensors.torch import load_file, save_file

from tests.engine_helpers import tiny_checkpoint, tiny_engine

needs_compiler = pytest.mark.skipif(
    not int8_gemm.has_vnni() or compiled_layers.missing_compiler() is not None,
    reason="the compiled layers need the one-row int8 GEMM (VNNI) and a C++ compiler",
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are",
]


def _default_engine(**overrides) -> LLMEngine:
    args = {"device": "cpu", "kv_cache_memory": 64 << 20, "max_model_len": 512, **overrides}
    return LLMEngine(EngineConfig(**args))


def _alone(engine: LLMEngine, n: int) -> list:
    params = SamplingParams(max_tokens=n, temperature=0.0, logprobs=1)
    return [engine.generate([p], params)[0] for p in PROMPTS]


@needs_compiler
@pytest.mark.slow
def test_compiled_one_row_steps_give_the_eager_tokens() -> None:
    """Greedy continuations of four prompts, each alone (every decode step one row), eager
    and compiled: the same tokens, and logprobs within 0.1 (fp32 rounding order, carried on
    by the int8 activation rounding: ~0.01-0.03 measured)."""
    engine = _default_engine()
    assert compiled_layers.unavailable_reason(engine.runner.model) is None
    eager = _alone(engine, 24)
    assert engine.compile_layers(in_child=False)  # compiled in this process
    layers = engine.runner.model.compiled_layers
    assert isinstance(layers, compiled_layers.CompiledLayers)
    calls: list[int] = []

    def counting(*args):
        calls.append(1)
        return layers(*args)

    engine.runner.model.compiled_layers = counting
    rows = _count_row_calls(layers)
    compiled = _alone(engine, 24)
    # Every decode step (23 a prompt) and no prefill ran the compiled layers, all 18, each as
    # its whole-layer graph (15 sliding-window layers, 3 global).
    cfg = engine.loaded.config
    assert len(calls) == len(PROMPTS) * 23 * cfg.num_hidden_layers
    assert len(rows[True]) == len(PROMPTS) * 23 * len(cfg.sliding_layers) > 0
    assert len(rows[False]) == len(PROMPTS) * 23 * len(cfg.full_layers) > 0
    for a, b in zip(eager, compiled, strict=True):
        assert a.token_ids == b.token_ids, (a.text, b.text)
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert diff < 0.1, diff
    # A one-token prompt: its first step is a one-row decode over one key, which the global
    # layers' graph (checked from two keys on) leaves to the eager layers.
    calls.clear()
    bos = [engine.tokenizer.bos_id]
    greedy6 = SamplingParams(max_tokens=6, temperature=0.0)
    alone = engine.generate([bos], greedy6)[0]
    engine.runner.model.compiled_layers = None
    assert alone.token_ids == engine.generate([bos], greedy6)[0].token_ids
    assert len(calls) == 6 * cfg.num_hidden_layers  # the first step's and 5 decodes' layers
    steps = len(PROMPTS) * 23
    assert len(rows[True]) == (steps + 6) * len(cfg.sliding_layers)  # a window: fixed shapes
    assert len(rows[False]) == (steps + 5) * len(cfg.full_layers)
    engine.runner.model.compiled_layers = counting
    # A batch of several rows still runs the eager layers, to the same tokens.
    calls.clear()
    crowd = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    assert [r.token_ids for r in crowd] == [r.token_ids[:8] for r in eager]
    assert calls == []


def _count_row_calls(layers) -> dict[bool, list[int]]:
    """Count the whole-layer graphs' calls, by "sliding window", compiled here
    (CompiledLayers) or loaded from a child process (LoadedLayers)."""
    calls: dict[bool, list[int]] = {True: [], False: []}
    if isinstance(layers, LoadedLayers):
        cfg, call = layers.model.config, layers._call

        def counting_call(index, row):
            calls[cfg.is_sliding(index)].append(1)
            return call(index, row)

        layers._call = counting_call
        return calls
    for sliding, graph in list(layers._graphs.items()):

        def counting(*args, graph=graph, sliding=sliding):
            calls[sliding].append(1)
            return graph(*args)

        layers._graphs[sliding] = counting
    return calls


@needs_compiler
@pytest.mark.slow
def test_compiled_layers_past_the_window() -> None:
    """A context longer than the sliding window (the ring wrapped, every window slot real):
    compiled one-row steps give the eager tokens, logprobs within 0.1."""
    engine = _default_engine(max_model_len=1024)
    window = engine.loaded.config.sliding_window
    g = torch.Generator().manual_seed(5)
    prompt = [engine.tokenizer.bos_id] + torch.randint(
        300, 20000, (window - 8,), generator=g
    ).tolist()
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=1, ignore_eos=True)
    eager = engine.generate([prompt], params)[0]
    assert engine.compile_layers()  # in a child process, loaded here without the compiler
    layers = engine.runner.model.compiled_layers
    assert isinstance(layers, LoadedLayers)
    rows = _count_row_calls(layers)
    compiled = engine.generate([prompt], params)[0]
    cfg = engine.loaded.config
    assert len(rows[True]) == 23 * len(cfg.sliding_layers)
    assert len(rows[False]) == 23 * len(cfg.full_layers)
    assert eager.token_ids == compiled.token_ids
    diff = max(
        abs(x.logprob - y.logprob) for x, y in zip(eager.logprobs, compiled.logprobs, strict=True)
    )
    assert diff < 0.1, diff


@needs_compiler
def test_compiling_in_the_background_switches_when_ready() -> None:
    engine = _default_engine()
    assert engine.runner.model.compiled_layers is None
    assert engine.compile_layers(background=True)
    deadline = time.monotonic() + 120
    while engine.runner.model.compiled_layers is None:
        assert time.monotonic() < deadline, "the layers never got compiled"
        time.sleep(0.1)
    out = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4


def test_the_engine_compiles_only_where_it_may(tmp_path: Path, monkeypatch) -> None:
    """--enforce-eager, the exact fp32 path and a missing C++ compiler each keep the eager
    layers, with the reason logged, and nothing is compiled."""
    eager = _default_engine(enforce_eager=True)
    assert not eager.compile_layers() and eager.runner.model.compiled_layers is None
    exact = tiny_engine(tiny_checkpoint(tmp_path / "tiny"), quantization="none")
    reason = compiled_layers.unavailable_reason(exact.runner.model)
    assert reason is not None and "int8" in reason
    assert not exact.compile_layers() and exact.runner.model.compiled_layers is None
    if int8_gemm.has_vnni():
        int8 = _default_engine()
        monkeypatch.setenv("CXX", "no-such-compiler-gemma-serve")
        assert "no-such-compiler" in compiled_layers.unavailable_reason(int8.runner.model)
        assert not int8.compile_layers() and int8.runner.model.compiled_layers is None
        with pytest.raises(ValueError, match="C\\+\\+ compiler"):
            compiled_layers.CompiledLayers(int8.runner.model)


def test_row_codes_are_the_batch_quantisers_rows() -> None:
    """The one-row quantiser (separate code tensors, as the compiled graphs need them) gives
    `codes`' values bit for bit, outliers and an all-zero row included."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 640, generator=g) * torch.linspace(0.01, 300, 640)
    x[2] = 0.0
    for vnni in (True, False):
        quantizer = int8_gemm.ActivationQuantizer(vnni)
        for passes in (1, 2):
            for row in x.split(1):
                want, want_scale = quantizer.codes(row, passes)
                got, scale = quantizer.row_codes(row, passes)
                assert torch.equal(torch.cat(got), want) and torch.equal(scale, want_scale)


@needs_compiler
def test_a_gemma2_models_compiled_layers_match_its_eager_ones(tmp_path: Path) -> None:
    """Gemma 2's layers (no q/k norms; soft-capped attention in fp32 inside the whole-layer
    graphs, past the window):
    compiled and eager one-row steps of a tiny int8 model give the same greedy tokens and
    logprobs within 1e-3."""
    engine = tiny_engine(tiny_checkpoint(tmp_path / "tiny"), quantization="int8")
    assert engine.loaded.config.model_type == "gemma2"
    prompts = [[engine.tokenizer.bos_id, 5 + i, 9, 12 + 2 * i] for i in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, ignore_eos=True)
    eager = [engine.generate([p], params)[0] for p in prompts]
    assert engine.compile_layers()  # in a child process, loaded here without the compiler
    layers = engine.runner.model.compiled_layers
    assert isinstance(layers, LoadedLayers)
    rows = _count_row_calls(layers)
    compiled = [engine.generate([p], params)[0] for p in prompts]
    # 11 decode steps a prompt, 15 tokens in all: past the window of 8 (the ring wrapped).
    cfg = engine.loaded.config
    assert cfg.sliding_window < 15 and engine.layout.ring_blocks > 0
    assert len(rows[True]) == len(prompts) * 11 * len(cfg.sliding_layers) > 0
    assert len(rows[False]) == len(prompts) * 11 * len(cfg.full_layers) > 0
    for a, b in zip(eager, compiled, strict=True):
        assert a.token_ids == b.token_ids
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert diff < 1e-3, diff


@needs_compiler
def test_a_layer_unlike_the_first_keeps_the_eager_layers() -> None:
    """The compiled graphs run without dynamo's per-call guards, so compiling checks them once
    for every layer: a layer whose graph would differ from the first of its kind (here one
    projection quantised in one pass) makes the engine keep its eager layers."""
    engine = _default_engine()
    assert engine.loaded.config.is_sliding(4) and engine.loaded.config.is_sliding(0)
    engine.runner.model.model.layers[4].mlp.gate_up_proj.passes = 1
    assert not engine.compile_layers(in_child=False)
    assert engine.runner.model.compiled_layers is None
    rows = row_caches(engine.loaded.config, engine.runner.cache.layers, context=64)
    with pytest.raises(ValueError, match="layer 4 differs from layer 0"):
        compiled_layers.CompiledLayers(engine.runner.model).compile(rows, max_keys=512)


@needs_compiler
def test_loaded_graphs_are_checked_against_the_compiling_process(tmp_path: Path) -> None:
    """The child's records load into this process; a graph whose check call differs from the
    child's (here a tampered reference) is refused."""
    engine = _default_engine()
    caches = [
        (tuple(k.shape), str(k.dtype).removeprefix("torch.")) for k, _ in engine.runner.cache.layers
    ]
    job = layer_compiler.Job(engine.config, caches, engine.max_model_len, cache_root() / "inductor")
    layer_compiler.compile_in_child(job, tmp_path)
    loaded = LoadedLayers(engine.runner.model, tmp_path)
    cfg = engine.loaded.config
    assert sorted(loaded._bound) == list(range(cfg.num_hidden_layers))
    reference = load_file(tmp_path / "reference.safetensors")
    reference["global.out"] = reference["global.out"] + 1e-3
    save_file(reference, tmp_path / "reference.safetensors")
    with pytest.raises(ValueError, match="computes otherwise"):
        LoadedLayers(engine.runner.model, tmp_path)


@needs_compiler
def test_a_failing_child_falls_back_to_compiling_here(monkeypatch) -> None:
    engine = _default_engine()

    def failing(job, directory):
        raise RuntimeError("the compiling process failed: (test)")

    monkeypatch.setattr(layer_compiler, "compile_in_child", failing)
    assert engine.compile_layers()
    assert isinstance(engine.runner.model.compiled_layers, compiled_layers.CompiledLayers)
