"""Parity of the Gemma network with Hugging Face transformers (fp32, tiny random checkpoints)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gemma_serve.model import cpu_gemm
from gemma_serve.model.attention import VarlenAttention
from gemma_serve.model.config import ConfigError, ModelConfig, preset
from gemma_serve.model.deploy import Deployment, deploy
from gemma_serve.model.gemma import GemmaForCausalLM
from gemma_serve.model.loader import CheckpointError, load_safetensors
from safetensors.torch import load_file, save_file

from tests.model_helpers import hf_model, make_gemma2, make_gemma3

TOL = 1e-4
CPU = torch.device("cpu")

CONFIGS = {
    "base": {},
    "qpas_ne_head_dim": {"query_pre_attn_scalar": 24, "num_key_value_heads": 1},
    "mha_long_window": {"num_key_value_heads": 4, "sliding_window": 16},
}


def load(path: Path) -> tuple[GemmaForCausalLM, ModelConfig]:
    cfg = ModelConfig.from_file(path)
    return load_safetensors(path, cfg, torch.float32, CPU), cfg


def forward_flat(model: GemmaForCausalLM, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of several sequences packed into one flat batch."""
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    lens = torch.tensor([0] + [len(s) for s in seqs])
    cu = torch.cumsum(lens, 0).to(torch.int32)
    logits = model(ids, pos, VarlenAttention(model.config, cu))
    return list(logits.split([len(s) for s in seqs]))


def hf_logits(ref: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([seq])).logits[0].float()


def random_seqs(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def _pack(model: GemmaForCausalLM) -> Deployment:
    return deploy(model, torch.device("cpu"), torch.float32, "none", pack=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return make_gemma2(path, seed=len(request.param), **CONFIGS[request.param])


@pytest.mark.parametrize("packed", [False, True], ids=["torch-gemm", "onednn-packed"])
def test_logits_match_transformers_in_a_flat_batch(checkpoint: Path, packed: bool) -> None:
    model, cfg = load(checkpoint)
    if packed:  # what the engine serves on CPU (model/cpu_gemm.py, model/deploy.py)
        assert cpu_gemm.available(), "this torch build lacks oneDNN's packed linear ops"
        assert _pack(model).linear == "onednn-fp32-packed"
        assert isinstance(model.lm_head, cpu_gemm.PackedLinear)
    ref = hf_model(checkpoint)
    # Lengths around and beyond the window (positions window-1, window, window+1 included).
    w = cfg.sliding_window
    seqs = random_seqs([3 * w + 5, w + 1, w, 5, 1], cfg.vocab_size, seed=1)
    for seq, ours in zip(seqs, forward_flat(model, seqs), strict=True):
        diff = (ours - hf_logits(ref, seq)).abs().max().item()
        assert diff <= TOL, f"len {len(seq)}: max |diff| {diff}"


def test_flat_batch_equals_each_sequence_alone(checkpoint: Path) -> None:
    model, cfg = load(checkpoint)
    seqs = random_seqs([21, 7, 13], cfg.vocab_size, seed=2)
    batched = forward_flat(model, seqs)
    for seq, b in zip(seqs, batched, strict=True):
        alone = forward_flat(model, [seq])[0]
        assert (b - alone).abs().max().item() <= TOL


def test_both_soft_caps_are_active(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    model, cfg = load(path)
    seq = random_seqs([30], cfg.vocab_size, seed=3)
    capped = forward_flat(model, seq)[0]
    assert capped.abs().max() > 0.9 * cfg.final_logit_softcapping
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        model.config = dataclasses.replace(cfg, **{field: None})
        uncapped = forward_flat(model, seq)[0]
        assert (uncapped - capped).abs().max() > 100 * TOL, field
    model.config = cfg


def test_greedy_continuation_matches_transformers_generate(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path, seed=5)
    model, cfg = load(path)
    ref = hf_model(path)
    prompt = random_seqs([11], cfg.vocab_size, seed=4)[0]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[0, len(prompt) :].tolist()
    seq = list(prompt)
    for _ in range(32):
        seq.append(int(forward_flat(model, [seq])[0][-1].argmax()))
    assert seq[len(prompt) :] == expected
    assert len(expected) == 32


@pytest.mark.parametrize("packed", [False, True], ids=["torch-gemm", "onednn-packed"])
def test_gemma3_logits_match_transformers(tmp_path: Path, packed: bool) -> None:
    path = make_gemma3(tmp_path, seed=7, qk_scale=3.0, embed_scale=10.0)
    model, cfg = load(path)
    if packed:  # deployment also stacks each layer's q/k norm scales (Attention.freeze)
        _pack(model)
    assert all((lay.self_attn.qk_scale is not None) == packed for lay in model.model.layers)
    assert cfg.use_qk_norm and cfg.attn_logit_softcapping is None
    assert cfg.full_layers == (5,) and cfg.rope_theta != cfg.rope_local_theta
    ref = hf_model(path)
    seqs = random_seqs([3 * cfg.sliding_window + 3, 9, 1], cfg.vocab_size, seed=8)
    for seq, ours in zip(seqs, forward_flat(model, seqs), strict=True):
        diff = (ours - hf_logits(ref, seq)).abs().max().item()
        assert diff <= TOL, f"len {len(seq)}: max |diff| {diff}"


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single = make_gemma2(tmp_path / "single")
    ref = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, cfg = load(single)
    b, _ = load(tmp_path / "sharded")
    seq = random_seqs([12], cfg.vocab_size, seed=9)
    assert torch.equal(forward_flat(a, seq)[0], forward_flat(b, seq)[0])


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        load(path)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    _rewrite(path, lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.extra\.weight"):
        load(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(path, lambda t: t.update({key: torch.ones(64, 32)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \(64, 32\)"):
        load(path)


def test_wrong_model_type_and_inconsistent_configs(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_file(path)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**data, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="invalid value in config.json"):
        ModelConfig.from_hf_dict({**data, "hidden_size": "wide"})
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "nowhere")


def test_presets_match_the_paper() -> None:
    two, nine, big = preset("gemma-2-2b"), preset("gemma-2-9b"), preset("gemma-2-27b")
    assert (two.hidden_size, two.num_hidden_layers, 2 * two.intermediate_size) == (2304, 26, 18432)
    assert (nine.num_attention_heads, nine.num_key_value_heads, nine.head_dim) == (16, 8, 256)
    assert big.query_pre_attn_scalar == 144 and big.head_dim == 128
    assert big.scale == pytest.approx(144**-0.5)
    assert two.is_sliding(0) and not two.is_sliding(1) and two.sliding_window == 4096
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gemma-2-1b")


def test_hf_dict_round_trips(tmp_path: Path) -> None:
    """to_hf_dict reads back to the same config: presets, and a Gemma 3 with linear RoPE
    scaling and distinct local/global thetas (what benchmarks/gpu_prep.py writes out)."""
    from transformers import Gemma2Config

    for name in ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b"):
        cfg = preset(name)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
        hf = Gemma2Config(**cfg.to_hf_dict())  # the keys are the ones transformers reads
        assert (hf.head_dim, hf.query_pre_attn_scalar) == (cfg.head_dim, cfg.query_pre_attn_scalar)
        assert hf.attn_logit_softcapping == 50.0 and hf.final_logit_softcapping == 30.0
    scaling = {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6}
    g3 = ModelConfig.from_file(make_gemma3(tmp_path, **scaling))
    assert (g3.rope_scaling_factor, g3.rope_theta, g3.rope_local_theta) == (8.0, 1e6, 10000.0)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(g3.to_hf_dict()))) == g3


def test_streamed_loading_converts_dtypes_in_small_chunks(tmp_path: Path, monkeypatch) -> None:
    import gemma_serve.model.safetensors_stream as stream

    path = make_gemma2(tmp_path)
    cfg = ModelConfig.from_file(path)
    direct = load_safetensors(path, cfg, torch.float32, CPU)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)  # many chunks per tensor
    bf16 = load_safetensors(path, cfg, torch.bfloat16, CPU)
    for (name, a), b in zip(direct.named_parameters(), bf16.parameters(), strict=True):
        assert b.dtype == torch.bfloat16
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = make_gemma2(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="file truncated"):
        load(path)
