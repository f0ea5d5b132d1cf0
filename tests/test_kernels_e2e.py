"""The tiny model served end to end through the Triton kernels (interpreted on CPU).

With GEMMA_SERVE_TEST_GPU=1 (benchmarks/gpu.sh) both engines run on CUDA: the Triton one through
the engine's own dispatch, the reference one forced by `force_reference_kernels`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gemma_serve.kernels import triton_ops
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model import int8_gemm
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine

DEVICE = "cuda" if os.environ.get("GEMMA_SERVE_TEST_GPU") else "cpu"
TRITON_OPS = AttentionOps(
    name="triton",
    store_kv=triton_ops.store_kv,
    prefill_attention=triton_ops.prefill_attention,
    decode_attention=triton_ops.decode_attention,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=21)


def test_engine_logits_and_tokens_match_the_reference_path(checkpoint: Path) -> None:
    prompts = [[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [2, 7], [2] + list(range(60, 80))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    # Chunks of 8 (the window) over blocks of 4: chunked prefill, ring wrap-around in decode.
    kw = dict(max_num_batched_tokens=8, device=DEVICE, dtype="float32")
    ref = tiny_engine(checkpoint, **kw, force_reference_kernels=True)
    tri = tiny_engine(checkpoint, **kw)  # on CUDA: decode steps replay CUDA graphs
    if DEVICE == "cpu":  # the engine picks the references on a CPU
        tri.runner.ops = TRITON_OPS
    assert (ref.runner.ops.name, tri.runner.ops.name) == ("torch-reference", "triton")
    want = ref.generate(prompts, params)
    got = tri.generate(prompts, params)
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
    # Logprobs of the same tokens agree to fp32 accuracy. The prompt was served above, so its
    # prefill now starts from cached blocks: the kernels read that context through the ring.
    cached_before = tri.kv.num_cached_tokens
    for rid, p in (("a", prompts[2]),):
        for engine in (ref, tri):
            engine.add_request(rid, p, params)
        outs = {}
        for name, engine in (("ref", ref), ("tri", tri)):
            lps = []
            while engine.has_work:
                for o in engine.step():
                    lps += [lp.logprob for lp in o.new_logprobs or ()]
            outs[name] = torch.tensor(lps)
        assert torch.allclose(outs["ref"], outs["tri"], atol=1e-4)
    assert tri.kv.num_cached_tokens - cached_before == 20  # its 5 full blocks; 1 token to compute


@pytest.mark.skipif(DEVICE != "cpu", reason="--quantization int8 is a CPU mode")
def test_int8_engine_through_the_triton_kernels(checkpoint: Path) -> None:
    """The int8 path with the Triton attention (interpreted): the same tokens as with the
    references, logprobs within the int8 path's own batch noise (1e-3)."""
    prompts = [[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [2] + list(range(60, 80))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    kw = dict(max_num_batched_tokens=8, quantization="int8")
    ref = tiny_engine(checkpoint, **kw)
    tri = tiny_engine(checkpoint, **kw)
    tri.runner.ops = TRITON_OPS
    linear = int8_gemm.kernels(int8_gemm.has_vnni())
    assert ref.loaded.deployment.linear == tri.loaded.deployment.linear == linear
    for w, g in zip(ref.generate(prompts, params), tri.generate(prompts, params), strict=True):
        assert g.token_ids == w.token_ids
        got, want = ([lp.logprob for lp in r.logprobs] for r in (g, w))
        assert got == pytest.approx(want, abs=1e-3)
