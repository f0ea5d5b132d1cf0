"""The KV cache is resident from start-up (zeroed), and a budget the host cannot back is
refused at start with a message naming the flag, not OOM-killed later."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gemma_serve.server.engine import host_memory
from gemma_serve.server.engine.kv_manager import KVUsage
from gemma_serve.server.engine.sampling_params import SamplingParams

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.stress.clients import rss_bytes


def test_mem_available_parses_meminfo() -> None:
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n"
    assert host_memory.mem_available(text) == 22000000 * 1024
    assert host_memory.mem_available("MemTotal: 1 kB\n") is None


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "max\n", "memory.current": "100\n"}, None),
        ({"memory.max": "1000\n", "memory.current": "300\n"}, 700),
        ({"memory.max": "1000\n", "memory.current": "1300\n"}, 0),
        ({"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "5\n"}, None),
        ({"memory.limit_in_bytes": "4096\n", "memory.usage_in_bytes": "96\n"}, 4000),
        ({}, None),
    ],
)
def test_cgroup_headroom(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert host_memory.cgroup_headroom(tmp_path) == expected


def test_available_bytes_is_the_tighter_source(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable: 2000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert host_memory.available_bytes(meminfo, cgroup) == 2000 * 1024
    (cgroup / "memory.max").write_text("1000000\n")
    (cgroup / "memory.current").write_text("0\n")
    assert host_memory.available_bytes(meminfo, cgroup) == 1000000
    assert host_memory.available_bytes(tmp_path / "absent", tmp_path / "absent") is None


def test_kv_budget_beyond_host_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m")
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 300 << 20)
    with pytest.raises(ValueError, match=r"needs \d+ MiB .* lower --kv-cache-memory"):
        tiny_engine(ckpt, kv_cache_memory=100 << 20)
    tiny_engine(ckpt, kv_cache_memory=8 << 20)  # fits beside the headroom: starts


def test_kv_cache_is_resident_from_start(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m")
    budget = 192 << 20
    # Earlier tests' engines freed now, and their pages handed back (malloc_trim): the cache
    # would otherwise reuse memory that is resident already, and RSS would not show it.
    gc.collect()
    host_memory.release_free_memory()
    before = rss_bytes()
    engine = tiny_engine(ckpt, kv_cache_memory=budget)
    kv = engine.layout.nbytes(engine.loaded.config)
    assert kv > 0.95 * budget
    assert rss_bytes() - before > 0.95 * kv, (rss_bytes() - before, kv)


def test_bfloat16_kv_cache_holds_twice_the_tokens_at_float32_fidelity(tmp_path: Path) -> None:
    """--kv-cache-dtype bfloat16 under a float32 model: the same budget holds twice the
    blocks, each K/V entry rounded once (logprobs within ~1e-4 of the float32 cache's on
    this model), and a request's greedy tokens are the same alone and in a crowd."""
    ckpt = tiny_checkpoint(tmp_path / "m")
    exact = tiny_engine(ckpt, kv_cache_memory=8 << 20)
    half = tiny_engine(ckpt, kv_cache_memory=8 << 20, kv_cache_dtype="bfloat16")
    assert half.layout.dtype == "bfloat16" and exact.layout.dtype == "float32"
    assert half.layout.num_global_blocks >= 2 * exact.layout.num_global_blocks - 1
    assert half.layout.nbytes(half.loaded.config) <= 8 << 20
    assert {k.dtype for pair in half.runner.cache.layers for k in pair} == {torch.bfloat16}
    assert {k.dtype for pair in exact.runner.cache.layers for k in pair} == {torch.float32}
    g = torch.Generator().manual_seed(4)
    prompts = [[2] + torch.randint(4, 300, (n,), generator=g).tolist() for n in (9, 30, 55, 17)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    crowd = half.generate(prompts, params)
    for prompt, out in zip(prompts, crowd, strict=True):
        assert half.generate([prompt], params)[0].token_ids == out.token_ids
    for out, ref in zip(crowd, exact.generate(prompts, params), strict=True):
        pairs = zip(out.token_ids, ref.token_ids, strict=True)
        n = next((i for i, (a, b) in enumerate(pairs) if a != b), 12)
        assert n >= 4  # the first tokens agree; a near-tie may split the paths later
        lps = zip(out.logprobs[:n], ref.logprobs[:n], strict=True)
        diffs = [abs(a.logprob - b.logprob) for a, b in lps]
        assert 0 < max(diffs) < 2e-3  # rounded (not the float32 cache), and close


def test_kv_cache_dtype_defaults_to_bfloat16_under_int8_else_the_models(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m")
    assert tiny_engine(ckpt).layout.dtype == "float32"
    assert tiny_engine(ckpt, quantization="none").layout.dtype == "float32"
    int8 = tiny_engine(ckpt, quantization="int8")
    assert int8.layout.dtype == "bfloat16"
    assert {k.dtype for pair in int8.runner.cache.layers for k in pair} == {torch.bfloat16}
    engine = tiny_engine(ckpt, quantization="int8", kv_cache_dtype="float32")
    assert engine.layout.dtype == "float32"


def test_bfloat16_kv_cache_numerics_do_not_depend_on_chunking(tmp_path: Path) -> None:
    """A prefill chunk's fresh K/V are rounded to the cache's dtype before it attends, as
    every later reader sees them: prompts prefilled in 16-token chunks score as prefilled
    whole (unrounded fresh keys made 8e-5 of difference, float32 noise is ~1e-7)."""
    ckpt = tiny_checkpoint(tmp_path / "m")
    g = torch.Generator().manual_seed(4)
    prompts = [[2] + torch.randint(4, 300, (n,), generator=g).tolist() for n in (9, 55, 100)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    runs = [
        tiny_engine(
            ckpt,
            kv_cache_dtype="bfloat16",
            max_num_seqs=4,
            max_num_batched_tokens=budget,
            enable_prefix_caching=False,
        ).generate(prompts, params)
        for budget in (16, 512)
    ]
    for chunked, whole in zip(*runs, strict=True):
        assert chunked.token_ids == whole.token_ids
        lps = zip(chunked.logprobs, whole.logprobs, strict=True)
        assert max(abs(a.logprob - b.logprob) for a, b in lps) < 1e-5


def test_warm_up_leaves_no_trace(tmp_path: Path) -> None:
    """The start-up step ends clean: no request, no used or cached block, and the next
    request is served as on a fresh engine."""
    ckpt = tiny_checkpoint(tmp_path / "m")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    fresh = tiny_engine(ckpt).generate([[2, 7, 9, 11, 13]], params)[0].token_ids
    engine = tiny_engine(ckpt)
    engine.warm_up()
    assert not engine.has_work
    assert engine.kv.usage() == KVUsage(0.0, 0.0)
    assert [t.pool.num_cached for t in engine.kv.pools.values()] == [0, 0]
    assert engine.generate([[2, 7, 9, 11, 13]], params)[0].token_ids == fresh


_FRAGMENTED_HEAP = """
from gemma_serve.server.engine import host_memory
from tests.stress.clients import rss_bytes
# The engine's settings: glibc no longer trims the heap's top on its own, so what is freed
# stays resident wherever the allocator placed the pinning blocks.
assert host_memory.keep_freed_memory()
held, freed = [], []
for _ in range(600):
    freed.append(bytearray(100_000))  # heap blocks (under the 128 KiB mmap threshold)
    held.append(bytearray(600))  # a live malloc block after each one pins them in place
before = rss_bytes()
del freed
after_free = rss_bytes()
trimmed = host_memory.release_free_memory()
print(before, after_free, rss_bytes(), trimmed, len(held))
"""


def test_release_free_memory_hands_freed_heap_pages_back() -> None:
    """Under the engine's malloc settings, blocks freed inside glibc's heap stay resident
    until malloc_trim hands their pages back (a fresh process: the heap's state in this one
    depends on earlier tests)."""
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    before, after_free, after_trim, trimmed, _ = out.stdout.split()
    mib = 1 << 20
    assert trimmed == "True"
    assert int(after_free) > int(before) - 20 * mib  # freed, still resident
    assert int(after_trim) < int(before) - 40 * mib  # of the 57 MiB freed


_REUSE = """
import ctypes, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, countable faults
import torch
from gemma_serve.server.engine import host_memory
from tests.stress.clients import rss_bytes
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # temporaries of a forward: 40 MiB (over glibc's 32 MiB mmap ceiling), 1 MiB
    torch.ones(10 << 20)
    torch.ones(1 << 18)
for _ in range(2):  # warm: the first allocations take their pages in any case
    step()
before = faults()
for _ in range(10):
    step()
per_step = (faults() - before) / 10
held = rss_bytes()
host_memory.release_free_memory()
print(kept, per_step, held, rss_bytes())
"""


def test_keep_freed_memory_spares_the_page_faults_of_each_step() -> None:
    """With glibc's defaults a 40 MiB temporary is mapped and unmapped each time (10,240
    fresh pages); once the engine has set the thresholds its pages are reused, and the idle
    trim still hands them back."""
    runs = {}
    for mode in ("keep", "default"):
        out = subprocess.run(
            [sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True
        )
        runs[mode] = out.stdout.split()
    kept, per_step, held, trimmed = runs["keep"]
    assert kept == "True"
    assert float(per_step) < 100, runs
    assert float(runs["default"][1]) > 8_000, runs  # ~10,240 pages of 4 KiB
    assert int(trimmed) < int(held) - 30 * (1 << 20), runs  # the heap's 40 MiB went back


_SHAPES = """
import os, sys
from gemma_serve.server.engine import host_memory
if sys.argv[1] == "bound":
    host_memory.bound_onednn_cache()
import torch
from tests.stress.clients import rss_bytes
w = torch.randint(-127, 128, (4096, 640), dtype=torch.int8)
packed = torch.ops.onednn.qlinear_prepack(w, None)
scale, zero = torch.rand(4096), torch.zeros(4096, dtype=torch.int64)
def gemm(rows):  # an int8 projection as model/int8_gemm.py runs it
    x = torch.full((rows, 640), 130, dtype=torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        x, 1.0, 128, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], "")
gemm(1)
before = rss_bytes()
for rows in range(2, 402, 2):  # 200 batch shapes, as batch sizes and prefill chunks vary
    gemm(rows)
host_memory.release_free_memory()
print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), rss_bytes() - before)
"""


@pytest.mark.skipif(
    not hasattr(torch.ops.onednn, "qlinear_pointwise"), reason="no oneDNN int8 in this torch"
)
def test_the_onednn_primitive_cache_is_bounded() -> None:
    """oneDNN keeps a primitive per GEMM shape (1,024 by default): bounded by the engine, 200
    batch shapes leave a fraction of the memory they leave otherwise; a user's own setting
    is kept."""
    runs = {}
    # Without the variable (an engine built earlier in this process set it in os.environ).
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    for mode in ("bound", "default"):
        out = subprocess.run(
            [sys.executable, "-c", _SHAPES, mode],
            capture_output=True,
            text=True,
            check=True,
            env=clean,
        )
        runs[mode] = out.stdout.split()
    capacity, bounded = runs["bound"]
    assert capacity == str(host_memory.ONEDNN_CACHE_CAPACITY)
    assert runs["default"][0] == "None"
    grown = int(runs["default"][1])
    assert grown > 30 << 20, runs  # ~0.3 MiB a shape
    assert int(bounded) < grown / 2, runs
    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}
    out = subprocess.run(
        [sys.executable, "-c", _SHAPES, "bound"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.split()[0] == "7"
