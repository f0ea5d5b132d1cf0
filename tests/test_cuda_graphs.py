"""Decode steps through static buffers and per-bucket graphs (server/engine/cuda_graphs.py).

On a CPU the buffers and padding run eagerly (capture=False): a crowd whose decode batches
shrink across buckets must give the tokens and logprobs of the plain engine. With
GEMMA_SERVE_TEST_GPU=1 (benchmarks/gpu.sh) the engine captures real CUDA graphs and is checked
against itself with --enforce-eager.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gemma_serve.server.engine.block_table import cdiv
from gemma_serve.server.engine.cuda_graphs import DecodeGraphs, buckets_for
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine

GPU = bool(os.environ.get("GEMMA_SERVE_TEST_GPU"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


def _crowd(engine: LLMEngine) -> tuple[list[list[int]], list[list[float]]]:
    """Seven requests that finish at different steps: decode batches of 7, 6, ... 1 rows."""
    vocab = engine.loaded.config.vocab_size
    g = torch.Generator().manual_seed(1)
    tokens, logprobs = {}, {}
    for i in range(7):
        prompt = [2] + torch.randint(4, vocab, (3 + 5 * i,), generator=g).tolist()
        params = SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True, logprobs=1)
        engine.add_request(f"r{i}", prompt, params)
        tokens[f"r{i}"], logprobs[f"r{i}"] = [], []
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.new_logprobs or ()]
    keys = sorted(tokens)
    return [tokens[k] for k in keys], [logprobs[k] for k in keys]


def test_buckets() -> None:
    assert buckets_for(1) == (1,)
    assert buckets_for(8) == (1, 2, 4, 8)
    assert buckets_for(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets_for(300) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 300)


def test_static_buffer_decodes_equal_the_plain_engine(checkpoint: Path) -> None:
    plain = tiny_engine(checkpoint, max_num_seqs=8)
    want_tokens, want_lps = _crowd(plain)
    engine = tiny_engine(checkpoint, max_num_seqs=8)
    # Poison the cache: a padding row that stored or read a live slot would show as NaN.
    for k, v in engine.runner.cache.layers:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    graphs = DecodeGraphs(
        engine.loaded.model,
        engine.runner.cache,
        engine.ops,
        max_num_seqs=8,
        global_width=cdiv(engine.max_model_len, engine.config.block_size),
        ring_blocks=engine.layout.ring_blocks,
        block_size=engine.config.block_size,
        device=torch.device("cpu"),
        capture=False,
    )
    used: list[int] = []
    run = graphs.run

    def counted(*args):
        logits = run(*args)
        if logits is not None:
            used.append(logits.shape[0])
        return logits

    graphs.run = counted
    engine.runner.graphs = graphs
    got_tokens, got_lps = _crowd(engine)
    assert got_tokens == want_tokens
    for got, want in zip(got_lps, want_lps, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    # Decode-only steps went through the buffers, at sizes that pad (3 rows -> bucket 4, ...).
    assert {7, 6, 5, 3, 1} <= set(used)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU (benchmarks/gpu.sh runs this)")
def test_cuda_graphs_equal_eager(checkpoint: Path) -> None:
    kw = dict(max_num_seqs=8, device="cuda", dtype="float32")
    eager = tiny_engine(checkpoint, **kw, enforce_eager=True)
    graphed = tiny_engine(checkpoint, **kw)
    assert eager.runner.graphs is None
    assert graphed.runner.graphs is not None
    assert sorted(graphed.runner.graphs.graphs) == [1, 2, 4, 8]
    want_tokens, want_lps = _crowd(eager)
    got_tokens, got_lps = _crowd(graphed)
    assert got_tokens == want_tokens
    for got, want in zip(got_lps, want_lps, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
