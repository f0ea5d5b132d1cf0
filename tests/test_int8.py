"""--quantization int8 (model/int8_gemm.py, model/deploy.py): each quantised layer against its
fp32 reference within the stated bound, batch invariance, and the engine served alone vs in a
crowd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gemma_serve.model import int8_gemm
from gemma_serve.model.deploy import Deployment
from gemma_serve.model.gemma import Linear
from gemma_serve.server.engine.sampling_params import SamplingParams

from benchmarks.quant_fidelity import prompt_logprobs
from tests.engine_helpers import tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.skipif(not int8_gemm.available(), reason="no oneDNN int8 in this torch")

CPU = torch.device("cpu")


def _weights(out: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.05
    w[::7, :3] *= 40  # outlier channels: per-row scales must absorb them
    return w


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("vnni", [True, False], ids=["vnni", "7-bit"])
@pytest.mark.parametrize("rows", [1, 5, 33, 130])
@pytest.mark.parametrize(("k", "out"), [(64, 48), (640, 1536), (2048, 640)])
def test_int8_linear_within_its_bound_of_the_fp32_product(rows, k, out, vnni, passes) -> None:
    w = _weights(out, k, seed=k + out)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    x[:, 1] *= 30  # an outlier feature, as Gemma's residual stream has
    x[0] = 0.0 if rows > 1 else x[0]  # an all-zero row quantises without NaN
    layer = int8_gemm.Int8Linear(*int8_gemm.quantize_rows(w), passes=passes, vnni=vnni)
    y = layer(x)
    ref = x.double() @ w.double().t()
    bound = int8_gemm.quantisation_bound(x, w, passes, vnni).double()
    assert torch.all((y.double() - ref).abs() <= bound + 1e-4), "outside the stated bound"
    # ... and it is the exact integer product of what the rows represent, up to fp32 rounding.
    q_w, s_w = int8_gemm.quantize_rows(w)
    q_x, s_x = layer.quantizer(x, passes)
    exact = (
        layer.quantizer.dequantize(q_x, s_x, passes) @ (q_w.double() * s_w.double()[:, None]).t()
    )
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < (0.03 if passes == 1 else 0.01), rel  # typical errors: far inside the bound


@pytest.mark.skipif(not int8_gemm.has_vnni(), reason="the one-row path runs only with VNNI")
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize(("k", "out"), [(64, 48), (640, 1536), (2048, 640)])
def test_one_row_through_int_mm_is_the_batch_row_bit_for_bit(k: int, out: int, passes: int):
    """A single row takes torch._int_mm over the plain weights, a batch oneDNN's packed GEMM:
    the same integer sums scaled the same way, so each row's result is bit-identical, also
    where every product is at the codes' extremes (no saturation anywhere)."""
    layer = int8_gemm.Int8Linear(*int8_gemm.quantize_rows(_weights(out, k, seed=k)), passes)
    assert layer.rows is not None
    g = torch.Generator().manual_seed(out)
    x = torch.randn(9, k, generator=g)
    x[:, 1] *= 30
    batch = layer(x)
    for i in range(len(x)):
        assert torch.equal(layer(x[i : i + 1]), batch[i : i + 1]), i
    signs = torch.where(torch.randn(out, k, generator=g) > 0, 1.0, -1.0)
    signs[0] = 1.0  # one output sums 127 * 127 * k
    extreme = int8_gemm.Int8Linear(*int8_gemm.quantize_rows(signs), passes)
    ones = torch.ones(2, k)  # every code 127 (the residual pass: 0)
    one, both = extreme(ones[:1]), extreme(ones)
    assert torch.equal(one, both[:1]) and torch.equal(both[0], both[1])
    want = signs.double().sum(1)  # 127 x 127 x sum(signs) x (1 / 127) x (1 / 127)
    assert torch.allclose(one[0].double(), want, rtol=1e-6, atol=0) and want[0] == k


def test_two_passes_leave_the_weights_as_the_only_real_error() -> None:
    """Against the product with quantised weights and exact activations, the second pass cuts
    the activations' error by two orders of magnitude."""
    w, x = torch.randn(256, 512) * 0.05, torch.randn(16, 512) * torch.linspace(0.1, 30, 512)
    q, s = int8_gemm.quantize_rows(w)
    weights_only = x.double() @ (q.double() * s.double()[:, None]).t()
    one, two = (int8_gemm.Int8Linear.from_float(w, passes=p)(x).double() for p in (1, 2))
    err_one, err_two = ((y - weights_only).norm() / weights_only.norm() for y in (one, two))
    assert err_two < err_one / 100, (err_one, err_two)
    assert err_one < 0.02


@pytest.mark.parametrize("rows", [3, 40])  # both ways of finding the scale
@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("passes", [1, 2])
def test_activation_quantiser_is_the_plain_formula(rows: int, vnni: bool, passes: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 300, generator=g) * torch.linspace(0.01, 50, 300)
    x[1] = 0.0  # an all-zero row: scale at its floor, every code the zero point
    quantizer = int8_gemm.ActivationQuantizer(vnni)
    q, scale = quantizer(x, passes)
    qmax, zero = (127, 128) if vnni else (63, 64)
    want_scale = (x.abs().amax(1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    y = x * want_scale.reciprocal()
    hi = torch.round(y)
    codes = [hi] if passes == 1 else [hi, torch.round((y - hi) * 2 * qmax)]
    assert torch.equal(scale, want_scale)
    assert q.dtype == torch.uint8
    assert torch.equal(q.long(), torch.cat(codes).long() + zero)
    assert int(q.min()) >= zero - qmax and int(q.max()) <= zero + qmax
    assert q[1].eq(zero).all() and (passes == 1 or q[rows + 1].eq(zero).all())


@pytest.mark.parametrize(("vnni", "vocab"), [(True, 6000), (False, 6000), (True, 8192)])
def test_int8_head_decides_its_top_candidates_at_two_pass_precision(vnni: bool, vocab: int) -> None:
    """One pass over the vocabulary, the second for each row's top candidates: those logits are
    the two-pass head's bit for bit, every other one the one-pass head's, and the argmax is the
    two-pass argmax (activations with norm-like outlier channels, as the head's input has)."""
    g = torch.Generator().manual_seed(5)
    norm = torch.ones(96)
    norm[torch.randperm(96, generator=g)[:4]] = torch.tensor([300.0, 120, 40, 20])
    x = torch.randn(24, 96, generator=g) * norm
    q, s = int8_gemm.quantize_rows(torch.randn(vocab, 96, generator=g) * 0.05)
    head = int8_gemm.Int8Head(q, s, refine=16, vnni=vnni)
    y = head(x)
    one, two = (int8_gemm.Int8Linear(q, s, passes=p, vnni=vnni)(x) for p in (1, 2))
    top = one.topk(16, dim=1).indices
    assert torch.equal(y.gather(1, top), two.gather(1, top))
    rest = torch.ones_like(y, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(y[rest], one[rest])
    assert torch.equal(y.argmax(1), two.argmax(1))
    assert (one - two).abs().max() > 100 * (y.gather(1, top) - two.gather(1, top)).abs().max()
    # A row's logits do not depend on the other rows (alone, a row takes torch._int_mm over
    # the plain rows with VNNI, a batch oneDNN's packed copy).
    for i in range(len(x)):
        assert torch.equal(head(x[i : i + 1]), y[i : i + 1]), i


@pytest.mark.parametrize("vocab", [16384, 262144, 6000])
def test_top_candidates_are_topks(vocab: int) -> None:
    """The block-maximum search finds each row's top k as topk does (the fast path where the
    row splits into blocks, topk itself otherwise): spread rows, rows whose top values
    crowd into one block or sit one per block, and ties at the k-th value."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(6, vocab, generator=g)
    y[1, 256:288] += 50.0  # the whole top 32 inside one block
    y[2, torch.arange(32) * 128 + 5] += 50.0  # one per block
    y[3] = torch.randint(0, 4, (vocab,), generator=g).float()  # thousands tie at the top
    y[4, :10] = 9.0
    y[4, 100:140] = 8.0  # a tie across the k-th
    y[5, -1] = 99.0  # the last column
    got = int8_gemm.top_candidates(y, 32)
    want = y.topk(32, dim=1)
    assert got.shape == (6, 32)
    assert torch.equal(y.gather(1, got).sort(1, descending=True).values, want.values)
    assert all(len(set(row.tolist())) == 32 for row in got)
    distinct = [0, 1, 2, 5]  # no ties: the very same columns
    assert torch.equal(got[distinct].sort(1).values, want.indices[distinct].sort(1).values)


def test_int8_embedding_rows_are_the_lm_heads_rows() -> None:
    table = _weights(50, 32, seed=2)
    q, scale = int8_gemm.quantize_rows(table)
    emb = int8_gemm.Int8Embedding(q, scale)
    ids = torch.tensor([0, 7, 49, 7])
    rows = emb(ids)
    assert torch.equal(rows, q[ids].float() * scale[ids, None])
    assert (rows - table[ids]).abs().max() <= scale[ids].max() / 2 + 1e-7


def test_deploy_int8_keeps_no_float_weight(tmp_path: Path) -> None:
    engine = tiny_engine(tiny_checkpoint(tmp_path), quantization="int8")
    model = engine.loaded.model
    assert engine.loaded.deployment.quantization == "int8"
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert isinstance(model.model.embed_tokens, int8_gemm.Int8Embedding)
    assert isinstance(model.lm_head, int8_gemm.Int8Head)
    assert model.lm_head.q is model.model.embed_tokens.q  # a tied head reads the table's rows
    floats = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert floats == norms  # only the RMSNorm weights stay in fp32


def test_an_untied_head_keeps_its_own_int8_rows(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m", tie_word_embeddings=False)
    engine = tiny_engine(ckpt, quantization="int8")
    model = engine.loaded.model
    assert isinstance(model.lm_head, int8_gemm.Int8Head)
    assert not torch.equal(model.lm_head.q, model.model.embed_tokens.q)
    prompts = [list(range(2, 40))]
    fp32 = prompt_logprobs(tiny_engine(ckpt, quantization="none"), prompts)[0]
    int8 = prompt_logprobs(engine, prompts)[0]
    assert int8 == pytest.approx(fp32, rel=0.02, abs=0.02)


def test_quantization_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        tiny_engine(tiny_checkpoint(tmp_path), quantization="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="quantization must be one of"):
        tiny_engine(tmp_path, quantization="int4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-int8"), seed=11)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_num_batched_tokens": 5},  # chunks shorter than the window
        {"max_num_batched_tokens": 13, "block_size": 2},  # chunks longer than the ring
        {"kv_cache_memory": 96 << 10},  # preemptions
    ],
    ids=["budget64", "chunk5", "chunk13-block2", "preempting"],
)
def test_int8_engine_in_a_crowd_equals_each_request_alone(checkpoint: Path, overrides) -> None:
    """Greedy tokens and logprobs of int8 requests served together (chunked, preempted, with
    prefix-cache hits on a shared prefix) equal each served alone."""
    alone_engine = tiny_engine(checkpoint, quantization="int8", enable_prefix_caching=False)
    vocab = alone_engine.loaded.config.vocab_size
    g = torch.Generator().manual_seed(3)
    shared = [2] + torch.randint(4, vocab, (30,), generator=g).tolist()
    prompts = [[2] + torch.randint(4, vocab, (n,), generator=g).tolist() for n in (1, 6, 40, 75)]
    prompts += [shared + torch.randint(4, vocab, (n,), generator=g).tolist() for n in (2, 9)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    alone = [alone_engine.generate([p], params)[0] for p in prompts]
    crowd_engine = tiny_engine(checkpoint, quantization="int8", **overrides)
    for results in (crowd_engine.generate(prompts, params), crowd_engine.generate(prompts, params)):
        for r, a in zip(results, alone, strict=True):
            assert r.token_ids == a.token_ids
            assert [lp.logprob for lp in r.logprobs] == pytest.approx(
                [lp.logprob for lp in a.logprobs], abs=1e-3
            )
    if "kv_cache_memory" in overrides:
        assert crowd_engine.scheduler.num_preemptions > 0
    assert crowd_engine.kv.num_cached_tokens > 0


def test_int8_prompt_logprobs_stay_close_to_fp32(checkpoint: Path) -> None:
    """The whole path on a random model: int8 and fp32 prompt logprobs stay close."""
    prompts = [list(range(2, 40)), list(range(50, 9, -1))]
    fp32 = prompt_logprobs(tiny_engine(checkpoint, quantization="none"), prompts)
    int8 = prompt_logprobs(tiny_engine(checkpoint, quantization="int8"), prompts)
    a, b = torch.tensor(sum(fp32, [])), torch.tensor(sum(int8, []))
    assert len(a) == 37 + 40
    assert (a - b).abs().mean() < 0.02 * a.abs().mean()


def test_deploy_none_leaves_the_exact_path(tmp_path: Path) -> None:
    engine = tiny_engine(tiny_checkpoint(tmp_path), quantization="none")
    assert engine.loaded.deployment.quantization == "none"
    model = engine.loaded.model
    assert not any(isinstance(m, int8_gemm.Int8Linear) for m in model.modules())


def test_a_gguf_defaults_to_int8_and_starts_from_its_int8_cache(tmp_path, monkeypatch) -> None:
    """The first start quantises the converted fp32 weights and caches the int8 layout; the
    second reads only that cache and serves the same tokens and logprobs."""
    from gemma_serve.model import int8_cache
    from gemma_serve.model.gguf_convert import cached_conversion

    from tests.test_gguf import write_tiny_gguf

    monkeypatch.setenv("GEMMA_SERVE_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    prompts = [[2, 270, 271, 272, 275, 280], [2, 260, 281]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    first = tiny_engine(gguf, kv_cache_memory=16 << 20)
    linear = int8_gemm.kernels(int8_gemm.has_vnni())
    assert first.loaded.deployment == Deployment("int8", linear, from_cache=False)
    cache = cached_conversion(gguf, progress=False) / int8_cache.FILE_NAME
    assert cache.is_file()
    second = tiny_engine(gguf, kv_cache_memory=16 << 20)
    assert second.loaded.deployment.from_cache
    a, b = first.generate(prompts, params), second.generate(prompts, params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [lp.logprob for r in a for lp in r.logprobs] == [
        lp.logprob for r in b for lp in r.logprobs
    ]
    # A cache of another format is rebuilt, not trusted.
    mapped = int8_cache.load(cache)
    assert mapped is not None
    int8_cache.save(cache, mapped.tensors)
    raw = cache.read_bytes().replace(int8_cache.FORMAT.encode(), b"gemma-serve-int8-v0")
    stale = cache.with_name("stale")  # replaced, not rewritten: the engines above map it
    stale.write_bytes(raw)
    stale.replace(cache)
    third = tiny_engine(gguf, kv_cache_memory=16 << 20)
    assert not third.loaded.deployment.from_cache
    assert int8_cache.load(cache) is not None  # rewritten in the current format
    assert [r.token_ids for r in third.generate(prompts, params)] == [r.token_ids for r in a]
    # Served from the cache's map, not copied out of it: the embedding table (the tied
    # head's rows) and a projection's plain rows are views of the whole file.
    model = third.runner.model
    size = cache.stat().st_size
    assert model.model.embed_tokens.q.untyped_storage().nbytes() == size
    assert model.lm_head.q.data_ptr() == model.model.embed_tokens.q.data_ptr()
    proj = model.model.layers[0].mlp.down_proj
    assert proj.rows.untyped_storage().nbytes() == size
    exact = tiny_engine(gguf, kv_cache_memory=16 << 20, quantization="none")
    assert exact.loaded.deployment.quantization == "none"


def _mapped_rss_kib(path: Path) -> int:
    """This process's resident KiB of its maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and not line.endswith(":"):
            inside = line.split()[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="no /proc/self/smaps")
def test_the_int8_cache_is_a_private_map_whose_pages_can_be_dropped(tmp_path) -> None:
    """int8 tensors are views of the file's map (never written through), the rest copies; after
    `evict` the map holds no resident page and reads fault the same bytes back in."""
    from gemma_serve.model import int8_cache

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, generator=g)  # 16 MiB
    scale = torch.rand(4096, generator=g)
    path = tmp_path / int8_cache.FILE_NAME
    int8_cache.save(path, {"w.q": q, "w.scale": scale})
    mapped = int8_cache.load(path)
    assert mapped is not None
    view = mapped.tensors["w.q"]
    assert view.untyped_storage().nbytes() == path.stat().st_size  # a view of the whole map
    assert mapped.tensors["w.scale"].untyped_storage().nbytes() == scale.numel() * 4  # a copy
    assert torch.equal(view, q) and torch.equal(mapped.tensors["w.scale"], scale)
    assert _mapped_rss_kib(path) >= 16384  # every page read above is resident
    mapped.evict()
    assert _mapped_rss_kib(path) < 64
    assert torch.equal(view[1000:1010], q[1000:1010])  # faulted back in, unchanged
    # 40 KiB read: the kernel maps around a fault (64 KiB, or a large folio of the page cache)
    assert 0 < _mapped_rss_kib(path) <= 4096
    view.zero_()  # a write stays in this process (copy-on-write): the file keeps its bytes
    again = int8_cache.load(path)
    assert again is not None and torch.equal(again.tensors["w.q"], q)
    # A file cut short (a full disk) is refused, not mapped past its end.
    short = tmp_path / "short" / int8_cache.FILE_NAME
    short.parent.mkdir()
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert int8_cache.load(short) is None


def test_a_cache_that_does_not_fit_and_cannot_be_rewritten_is_not_served(
    tmp_path, monkeypatch
) -> None:
    """A cache of the current format that lacks a tensor the model needs is rebuilt from the
    fp32 weights; where the rebuilt one cannot be written, the quantised weights are served
    from memory (not the stale map again)."""
    from gemma_serve.model import int8_cache
    from gemma_serve.model.gguf_convert import cached_conversion

    from tests.test_gguf import write_tiny_gguf

    monkeypatch.setenv("GEMMA_SERVE_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    prompts = [[2, 270, 271, 272, 275, 280]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = tiny_engine(gguf, kv_cache_memory=16 << 20)
    want = [r.token_ids for r in first.generate(prompts, params)]
    cache = cached_conversion(gguf, progress=False) / int8_cache.FILE_NAME
    mapped = int8_cache.load(cache)
    assert mapped is not None
    partial = {k: v for k, v in mapped.tensors.items() if not k.endswith("down_proj.q")}
    int8_cache.save(cache, partial)

    def refuse(path, state):
        raise OSError("read-only")

    monkeypatch.setattr(int8_cache, "save", refuse)
    second = tiny_engine(gguf, kv_cache_memory=16 << 20)
    assert not second.loaded.deployment.from_cache
    assert [r.token_ids for r in second.generate(prompts, params)] == want
