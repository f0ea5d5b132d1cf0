"""GGUF -> Hugging Face conversion: a tiny GGUF written here, and the real embedded Gemma 3 270M.

References: gguf-py's own GGUFReader + gguf.quants (an independent reader), ggml's C
dequantization transcribed below, llama.cpp's tensor name map, transformers' loader, and token
ids from transformers' GGUF tokenizer (a separate rebuild of the same vocabulary).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from gemma_serve.model import default_model, gguf_convert
from gemma_serve.model.gguf import (
    GGUFError,
    GGUFFile,
    dequantize,
    hf_config,
    hf_tensor_name,
    read_gguf,
)
from gemma_serve.model.gguf_convert import cache_root, cached_conversion, convert_gguf
from gguf import GGMLQuantizationType as Q
from gguf import TokenType
from safetensors.numpy import load_file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 2, 1, 32, 512, 2
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "  ", "   "]  # whitespace runs stored with real spaces, as llama.cpp writes them
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# BPE pieces, best merge first: scores fall with rank like Gemma's.
MERGED = ["he", "ll", "or", "\u2581w", "hell", "hello", "ld", "\u2581wor", "\u2581world"]
CHARS = ["\u2581", "h", "e", "l", "o", "w", "r", "d"]
TOKENS = SPECIALS + USER + BYTES + MERGED + CHARS
TYPES = (
    [TokenType.CONTROL] * len(SPECIALS)  # <unk> too: the real file labels it CONTROL
    + [TokenType.USER_DEFINED] * len(USER)
    + [TokenType.BYTE] * len(BYTES)
    + [TokenType.NORMAL] * (len(MERGED) + len(CHARS))
)
SCORES = [-1000.0] * (len(SPECIALS) + len(USER)) + [0.0] * 256 + [-float(i) for i in range(17)]
# (GGUF name suffix, torch shape, type): every type the real file uses, and a few more.
LAYER_TENSORS = [
    ("attn_q", (HEADS * HEAD_DIM, HIDDEN), Q.Q4_K),
    ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q5_0),
    ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN), Q.F16),
    ("attn_output", (HIDDEN, HEADS * HEAD_DIM), Q.BF16),
    ("ffn_gate", (FFN, HIDDEN), Q.Q6_K),
    ("ffn_up", (FFN, HIDDEN), Q.Q4_0),
    ("ffn_down", (HIDDEN, FFN), Q.Q5_K),
    ("attn_norm", (HIDDEN,), Q.F32),
    ("attn_q_norm", (HEAD_DIM,), Q.F32),
    ("attn_k_norm", (HEAD_DIM,), Q.F32),
    ("post_attention_norm", (HIDDEN,), Q.F32),
    ("ffn_norm", (HIDDEN,), Q.F32),
    ("post_ffw_norm", (HIDDEN,), Q.F32),
]
# Byte offsets of the fp16 scales in each k-quant block: random bytes there could be NaN.
FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _tensor_data(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Data as GGUFWriter takes it: floats, or raw blocks for types gguf-py cannot quantize."""
    if qtype not in FP16_FIELDS:
        values = rng.standard_normal(shape).astype(np.float32)
        return gguf.quants.quantize(values, qtype) if qtype != Q.F32 else values + 1.0
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        scale = rng.uniform(0.001, 0.1, raw.shape[:2]).astype(np.float16)
        raw[:, :, at : at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(shape[0], -1)


def write_tiny_gguf(path: Path, seed: int = 0, untied: bool = False) -> Path:
    """A tiny gemma3 GGUF; `untied` adds an output.weight (an LM head of its own)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(512)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores(SCORES)
    w.add_token_types(TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    for name, shape, qtype in [
        ("token_embd", (len(TOKENS), HIDDEN), Q.Q8_0),
        ("output_norm", (HIDDEN,), Q.F32),
        *([("output", (len(TOKENS), HIDDEN), Q.Q6_K)] if untied else []),
    ] + [(f"blk.{i}.{n}", s, t) for i in range(LAYERS) for n, s, t in LAYER_TENSORS]:
        data = _tensor_data(rng, shape, qtype)
        w.add_tensor(f"{name}.weight", data, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny GGUF, its converted directory)."""
    root = tmp_path_factory.mktemp("tiny")
    path = write_tiny_gguf(root / "tiny.gguf")
    return path, convert_gguf(path, root / "hf", progress=False)


def _reference_weights(path: Path) -> dict[str, np.ndarray]:
    """HF-named float32 weights, read and dequantized by gguf-py itself; norms stored as w + 1
    (q_norm/k_norm too) come back as w."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[hf_tensor_name(t.name)] = w - 1.0 if t.name.endswith("norm.weight") else w
    return out


def test_weights_match_gguf_reader(tiny: tuple[Path, Path]) -> None:
    path, out = tiny
    ours, ref = load_file(out / "model.safetensors"), _reference_weights(path)
    assert ours.keys() == ref.keys() and len(ours) == 2 + LAYERS * len(LAYER_TENSORS)
    for name, w in ref.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == w.shape, name
        np.testing.assert_array_equal(ours[name], w, err_msg=name)
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * HEAD_DIM, HIDDEN)
    assert ours["model.layers.1.mlp.down_proj.weight"].shape == (HIDDEN, FFN)


def test_metadata_parsed_like_gguf_reader(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    path = tiny[0]
    meta, ref = read_gguf(path).metadata, gguf.GGUFReader(path).fields
    assert meta["tokenizer.ggml.tokens"] == TOKENS == ref["tokenizer.ggml.tokens"].contents()
    np.testing.assert_array_equal(meta["tokenizer.ggml.scores"], np.float32(SCORES))
    np.testing.assert_array_equal(meta["tokenizer.ggml.token_type"], TYPES)
    assert (
        meta["gemma3.attention.key_length"] == HEAD_DIM and meta["general.architecture"] == "gemma3"
    )
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_gguf(bad)
    bad.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(bad)
    with pytest.raises(GGUFError, match="no Hugging Face name"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")


def test_quantized_values_close_to_originals() -> None:
    """Independent of gguf.quants' decoder: quantize known floats, read them back. A b-bit
    block format errs by at most one step, block absmax / 2**(b-1)."""
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    absmax = np.abs(x.reshape(64, 8, 32)).max(-1, keepdims=True)
    step = {Q.Q8_0: 1 / 128, Q.Q5_0: 1 / 16, Q.Q4_0: 1 / 8, Q.F16: 1e-3, Q.BF16: 1 / 128}
    for qtype, fraction in step.items():
        raw = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(64, -1)
        err = np.abs(dequantize(raw, qtype) - x).reshape(64, 8, 32)
        assert np.all(err <= fraction * absmax), qtype.name


def _ref_q4_k(block: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q4_K, transcribed loop by loop."""
    d, dmin = (float(v) for v in block[:4].view(np.float16))
    scales, qs = block[4:16], block[16:]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | (
            (scales[j] >> 6) << 4
        )

    y = []
    for chunk in range(4):
        (s1, m1), (s2, m2) = scale_min(2 * chunk), scale_min(2 * chunk + 1)
        q = qs[32 * chunk : 32 * chunk + 32]
        y += [d * s1 * (v & 0xF) - dmin * m1 for v in q] + [
            d * s2 * (v >> 4) - dmin * m2 for v in q
        ]
    return np.array(y, dtype=np.float32)


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q6_K, transcribed loop by loop."""
    ql, qh, sc = block[:128], block[128:192], block[192:208].view(np.int8)
    d = float(block[208:210].view(np.float16)[0])
    y = np.zeros(256, dtype=np.float32)
    for n in range(2):
        l_, h_, s_ = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for i in range(32):
            q = [
                (l_[i] & 0xF) | (((h_[i] >> 0) & 3) << 4),
                (l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4),
                (l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4),
                (l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4),
            ]
            for k in range(4):
                y[128 * n + 32 * k + i] = d * s_[i // 16 + 2 * k] * (int(q[k]) - 32)
    return y


@pytest.mark.parametrize(("qtype", "ref"), [(Q.Q4_K, _ref_q4_k), (Q.Q6_K, _ref_q6_k)])
def test_k_quants_match_ggml_c_reference(qtype: Q, ref: Callable[[np.ndarray], np.ndarray]) -> None:
    raw = _tensor_data(np.random.default_rng(2), (4, 512), qtype)  # 4 rows x 2 blocks
    blocks = raw.reshape(8, -1)
    expected = np.concatenate([ref(b) for b in blocks]).reshape(4, 512)
    np.testing.assert_allclose(dequantize(raw, qtype), expected, rtol=1e-6, atol=1e-6)


def test_tensor_names_match_llama_cpp_map() -> None:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, LAYERS)
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.1.{n}.weight" for n, _, _ in LAYER_TENSORS]
    for name in names:
        assert tmap.get_name(hf_tensor_name(name), try_suffixes=(".weight",)) == name
    assert hf_tensor_name("blk.7.attn_q_norm.weight") == "model.layers.7.self_attn.q_norm.weight"


def test_config_from_metadata(tiny: tuple[Path, Path]) -> None:
    cfg = json.loads((tiny[1] / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    expected = dict(
        vocab_size=len(TOKENS), hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, rms_norm_eps=1e-6,
        rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512,
        max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True, final_logit_softcapping=None, attn_logit_softcapping=None,
        layer_types=["sliding_attention"] * 2, torch_dtype="float32",
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected


def _config_of(arch: str, **meta: object) -> dict:
    base = {"general.architecture": arch, "tokenizer.ggml.tokens": ["a"] * 10}
    hp = {"embedding_length": 4608, "block_count": 46, "attention.head_count": 32,
          "attention.key_length": 128, "feed_forward_length": 36864, "context_length": 8192,
          "attention.layer_norm_rms_epsilon": 1e-6}  # fmt: skip
    base |= {f"{arch}.{k}": v for k, v in hp.items()}
    return hf_config(GGUFFile(Path("x.gguf"), base | meta, ()))


def test_config_gemma2_27b_and_layer_patterns() -> None:
    cfg = _config_of("gemma2", **{"gemma2.attn_logit_softcapping": 50.0})
    assert cfg["model_type"] == "gemma2" and cfg["query_pre_attn_scalar"] == 144  # 4608 / 32
    assert cfg["attn_logit_softcapping"] == 50.0 and cfg["final_logit_softcapping"] == 30.0
    assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = _config_of("gemma3")  # 46 layers is not a Gemma 3 27B: the scale is head_dim
    assert cfg["query_pre_attn_scalar"] == 128 and cfg["layer_types"][5] == "full_attention"
    assert cfg["layer_types"][:5] == ["sliding_attention"] * 5
    pattern = np.array([True, False] * 23)
    cfg = _config_of("gemma3", **{"gemma3.attention.sliding_window_pattern": pattern})
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"]
    linear = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    assert _config_of("gemma3", **linear)["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_tokenizer_rebuilt_as_sentencepiece(tiny: tuple[Path, Path]) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny[1] / "tokenizer.model"))
    ids = {t: i for i, t in enumerate(TOKENS)}
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (
        len(TOKENS), 3, 2, 1, 0,
    )  # fmt: skip
    assert sp.id_to_piece(ids["  "]) == "\u2581\u2581" and sp.is_control(ids["<start_of_turn>"])
    assert [sp.piece_to_id(sp.id_to_piece(i)) for i in range(len(TOKENS))] == list(
        range(len(TOKENS))
    )
    cases = {
        "hello world": ["hello", "\u2581world"],
        " world": ["\u2581world"],  # no dummy prefix: add_space_prefix is false
        "hello  world": ["hello", "  ", "w", "or", "ld"],
        "hello   world\n": ["hello", "   ", "w", "or", "ld", "\n"],
        "h\u00e9": ["h", "<0xC3>", "<0xA9>"],  # byte fallback
    }
    for text, pieces in cases.items():
        assert sp.encode(text) == [ids[p] for p in pieces], text
    for text in [*cases, "<start_of_turn>user\nhi", "\U0001f600 x\ty", "   \n\n  "]:
        ids_ = sp.encode(text)
        assert sp.decode(ids_) == text and ids["<start_of_turn>"] not in ids_


def test_transformers_loads_converted_dir(tiny: tuple[Path, Path]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, out = tiny
    model, info = transformers.Gemma3ForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = _reference_weights(path)
    for name, param in model.state_dict().items():
        expected = ref["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        np.testing.assert_array_equal(param.numpy(), expected, err_msg=name)
    assert model.config.layer_types == ["sliding_attention"] * 2


def test_untied_output_weight_is_the_lm_head(tmp_path: Path) -> None:
    """A GGUF with output.weight converts to an untied checkpoint, and the engine's model uses
    that head: logits equal transformers' on the converted directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gemma_serve.model.attention import VarlenAttention
    from gemma_serve.model.config import ModelConfig
    from gemma_serve.model.loader import load_safetensors

    out = convert_gguf(write_tiny_gguf(tmp_path / "u.gguf", untied=True), tmp_path / "hf", False)
    cfg = ModelConfig.from_file(out)
    assert not cfg.tie_word_embeddings
    ours = load_safetensors(out, cfg, torch.float32, torch.device("cpu"))
    ref = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    ids = torch.tensor([2, 270, 271, 272, 275, 280])
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        got = ours(ids, torch.arange(len(ids)), VarlenAttention(cfg, cu))
    # fp32 noise relative to the largest logit (no final cap here, so |logits| reach ~1e4)
    assert (got - expected).abs().max() <= 2e-6 * expected.abs().max()


def test_half_precision_outputs_round_like_torch(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    full = load_torch(tiny[1] / "model.safetensors")
    for dtype in ("bfloat16", "float16"):
        half = load_torch(
            convert_gguf(tiny[0], tmp_path / dtype, False, dtype=dtype) / "model.safetensors"
        )
        for name, w in full.items():
            assert torch.equal(half[name], w.to(getattr(torch, dtype))), (dtype, name)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEMMA_SERVE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("GEMMA_SERVE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "gemma-serve"


def test_cached_conversion_is_keyed_and_atomic(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny[0]

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-conversion")

    with monkeypatch.context() as m:
        m.setattr(gguf_convert, "_write_safetensors", crash)
        with pytest.raises(RuntimeError):
            cached_conversion(path, tmp_path, progress=False)
    assert list((tmp_path / "converted").iterdir()) == []  # no half-written entry survives
    out = cached_conversion(path, tmp_path, progress=False)
    assert out.name.startswith(gguf_convert.file_sha256(path))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"
    ]  # fmt: skip
    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)  # a cache hit must not convert
    assert cached_conversion(path, tmp_path, progress=False) == out
    assert cached_conversion(path, tmp_path, sha256=out.name.split("-")[0]) == out


def test_default_model_assembles_once(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    joins: list[Path] = []

    def fake_assemble(output_path: Path, overwrite: bool = False) -> Path:
        joins.append(Path(output_path))
        Path(output_path).write_bytes(tiny[0].read_bytes())
        return Path(output_path)

    monkeypatch.setattr(default_model.embedded, "assemble", fake_assemble)
    monkeypatch.setattr(default_model.embedded, "EXPECTED_SHA256", "ab" * 32)
    first = default_model.default_model_dir(tmp_path, progress=False)
    assert default_model.default_model_dir(tmp_path, progress=False) == first
    assert len(joins) == 1 and (first / "model.safetensors").is_file()
    monkeypatch.setattr(default_model, "version", lambda _: "999")  # a package upgrade
    default_model.default_model_dir(tmp_path, progress=False)
    assert len(joins) == 2


# --- The real embedded model (Gemma 3 270M, Q4_K_M) -------------------------------------------

# Ids from transformers' GGUF tokenizer built from the same file (BOS not included).
REAL_IDS = {
    "Hello world": [9259, 1902],
    "The capital of France is Paris.": [818, 5279, 529, 7001, 563, 9079, 236761],
    "  two  spaces\n\nnewlines\ttab": [138, 13498, 138, 35220, 108, 208697, 255968, 4823],
    "emoji \U0001f600\U0001f1eb\U0001f1f7 caf\u00e9 na\u00efve \u65e5\u672c\u8a9e": [
        67906, 163543, 246598, 242644, 33443, 120362, 33375, 238582
    ],
    "def f(x):\n    return x**2  # 12345": [
        2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778, 138, 236865,
        236743, 236770, 236778, 236800, 236812, 236810,
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def real_dir():
    """The default model converted once into a private cache (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="gemma-serve-test-") as tmp:
        start = time.perf_counter()
        out = default_model.default_model_dir(Path(tmp), progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        assert default_model.default_model_dir(Path(tmp), progress=False) == out
        cached = time.perf_counter() - start
        print(f"\ngemma-3-270m: first start (join + convert) {first:.2f} s, cached {cached:.4f} s")
        yield out


@pytest.mark.slow
def test_real_tokenizer(real_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(real_dir / "tokenizer.model"))
    assert (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (
        262144, 2, 1, 0, 3,
    )  # fmt: skip
    for text, ids in REAL_IDS.items():
        assert sp.encode(text) == ids, text
        assert sp.decode(ids) == text
    n = sp.vocab_size()
    assert [sp.piece_to_id(sp.id_to_piece(i)) for i in range(n)] == list(range(n))
    assert sp.id_to_piece(138) == "\u2581\u2581" and sp.id_to_piece(106) == "<end_of_turn>"
    assert sp.encode("<start_of_turn>") != [105]  # typed text never becomes a control token


@pytest.mark.slow
def test_real_config(real_dir: Path) -> None:
    cfg = json.loads((real_dir / "config.json").read_text())
    expected = dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4,
        rms_norm_eps=1e-6, max_position_embeddings=32768,
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    assert full == [5, 11, 17]


@pytest.mark.slow
def test_real_model_completes_capitals(real_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        real_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    sp = spm.SentencePieceProcessor(model_file=str(real_dir / "tokenizer.model"))
    prompts = {
        "The capital of France is Paris. The capital of Germany is": " Berlin",
        "Berlin is the capital of": " Germany",
    }
    for prompt, start in prompts.items():
        ids = torch.tensor([[sp.bos_id(), *sp.encode(prompt)]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        text = sp.decode(out[0, ids.shape[1] :].tolist())
        assert text.startswith(start), (prompt, text)
