"""Checkpoints beyond the plain tied Gemma 2/3 text model, each against transformers: configs
that leave keys to their defaults, an untied LM head, multimodal Gemma 3 (its text model), the
EOS ids of generation_config.json, and settings we refuse rather than silently ignore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma_serve.model.config import ConfigError, ModelConfig
from gemma_serve.model.deploy import deploy
from gemma_serve.model.loader import load_safetensors

from tests.model_helpers import TINY, hf_model, make_gemma2, make_gemma3
from tests.test_model import forward_flat, hf_logits, random_seqs

TOL = 1e-4
CPU = torch.device("cpu")

# What configs on the Hub look like when they list only what differs from the defaults: the
# nested text_config of google/gemma-3-4b-it, and a bare Gemma 2 and Gemma 3 text config.
SPARSE = {
    "gemma-3-4b text_config": {
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    },
    "bare gemma2": {"model_type": "gemma2", "num_hidden_layers": 4},
    "bare gemma3_text": {"model_type": "gemma3_text", "num_hidden_layers": 12},
}


def transformers_view(d: dict[str, Any]) -> dict[str, Any]:
    """The fields we read, as transformers' config classes resolve them."""
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

    if d["model_type"] == "gemma3":
        top = Gemma3Config(**d)
        hf, eos = top.text_config, top.eos_token_id
    else:
        hf = (Gemma2Config if d["model_type"] == "gemma2" else Gemma3TextConfig)(**d)
        eos = hf.eos_token_id
    rope = hf.rope_parameters
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", rope)
    return {
        "vocab_size": hf.vocab_size,
        "heads": (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim),
        "query_pre_attn_scalar": hf.query_pre_attn_scalar,
        "sliding_window": hf.sliding_window,
        "layer_types": tuple(hf.layer_types),
        "final_logit_softcapping": hf.final_logit_softcapping,
        "rope": (full["rope_theta"], local["rope_theta"], full.get("factor", 1.0)),
        "max_position_embeddings": hf.max_position_embeddings,
        "eos": tuple(eos if isinstance(eos, list) else [eos]),
    }


def our_view(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "heads": (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "rope": (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_factor),
        "max_position_embeddings": cfg.max_position_embeddings,
        "eos": cfg.eos_token_ids,
    }


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_keys_left_out_take_transformers_defaults(name: str) -> None:
    d = SPARSE[name]
    assert our_view(ModelConfig.from_hf_dict(d)) == transformers_view(d)


def test_gemma2_config_without_soft_cap_keys_matches_transformers(tmp_path: Path) -> None:
    """A config.json without the soft-cap keys: transformers caps at 50 and 30, and so must we."""
    path = make_gemma2(tmp_path)
    data = json.loads((path / "config.json").read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        del data[key]
    (path / "config.json").write_text(json.dumps(data))
    cfg = ModelConfig.from_file(path)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    model = load_safetensors(path, cfg, torch.float32, CPU)
    seq = random_seqs([20], cfg.vocab_size, seed=1)[0]
    diff = (forward_flat(model, [seq])[0] - hf_logits(hf_model(path), seq)).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("maker", [make_gemma2, make_gemma3], ids=["gemma2", "gemma3"])
def test_untied_lm_head_matches_transformers(tmp_path: Path, maker) -> None:
    path = maker(tmp_path, tie_word_embeddings=False, embed_scale=10.0)
    cfg = ModelConfig.from_file(path)
    assert not cfg.tie_word_embeddings
    ref = hf_model(path)
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    model = load_safetensors(path, cfg, torch.float32, CPU)
    seqs = random_seqs([2 * cfg.sliding_window + 1, 5], cfg.vocab_size, seed=2)
    for packed in (False, True):
        if packed:
            deploy(model, CPU, torch.float32, "none", pack=True)
        for seq, ours in zip(seqs, forward_flat(model, seqs), strict=True):
            diff = (ours - hf_logits(ref, seq)).abs().max().item()
            assert diff <= TOL, f"packed={packed}, len {len(seq)}: max |diff| {diff}"
    # The int8 layers use the untied head too: their logits are far nearer the reference than
    # the same network's logits through the embedding table.
    int8 = load_safetensors(path, cfg, torch.float32, CPU)
    deploy(int8, CPU, torch.float32, "int8", pack=True)
    ours = forward_flat(int8, seqs)
    untied = [hf_logits(ref, seq) for seq in seqs]
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.model.embed_tokens.weight)
    tied = [hf_logits(ref, seq) for seq in seqs]
    for o, u, t in zip(ours, untied, tied, strict=True):
        assert (o - u).norm() < 0.5 * (o - t).norm()


def make_gemma3_multimodal(path: Path) -> Path:
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower, projector, text model) on disk."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(3)
    text = Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6, "query_pre_attn_scalar": 16})
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=498,
        eoi_token_index=499,
        image_token_index=500,
        eos_token_id=[1, 106],
    )
    Gemma3ForConditionalGeneration(cfg).eval().save_pretrained(path)
    return path


def test_multimodal_gemma3_serves_its_text_model(tmp_path: Path) -> None:
    """The text model of a Gemma3ForConditionalGeneration checkpoint; the vision tower and
    projector are dropped. Logits equal transformers' multimodal model on text-only input."""
    path = make_gemma3_multimodal(tmp_path)
    cfg = ModelConfig.from_file(path)
    assert cfg.model_type == "gemma3_text" and cfg.eos_token_ids == (1, 106)
    model = load_safetensors(path, cfg, torch.float32, CPU)
    ref = hf_model(path)
    seqs = random_seqs([3 * cfg.sliding_window + 2, 4], 400, seed=4)  # below the image ids
    for seq, ours in zip(seqs, forward_flat(model, seqs), strict=True):
        diff = (ours - hf_logits(ref, seq)).abs().max().item()
        assert diff <= TOL, f"len {len(seq)}: max |diff| {diff}"


def test_generation_config_eos_ids_are_added(tmp_path: Path) -> None:
    """Gemma 2 -it lists <end_of_turn> (107) as an EOS only in generation_config.json."""
    path = make_gemma2(tmp_path)
    assert ModelConfig.from_file(path).eos_token_ids == (1,)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 107]}))
    assert ModelConfig.from_file(path).eos_token_ids == (1, 107)
    (path / "generation_config.json").write_text("[1, 107]")
    with pytest.raises(ConfigError, match="generation_config.json is not a valid"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_settings_we_cannot_honour_are_refused(edit: dict[str, Any], message: str) -> None:
    d = {"model_type": "gemma3_text", **TINY, **edit}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(d)


def test_gemma3_attention_soft_cap_is_not_applied(tmp_path: Path) -> None:
    """transformers' Gemma 3 reads attn_logit_softcapping and never applies it; match that."""
    path = make_gemma3(tmp_path, qk_scale=3.0, attn_logit_softcapping=5.0)
    cfg = ModelConfig.from_file(path)
    assert cfg.attn_logit_softcapping is None
    model = load_safetensors(path, cfg, torch.float32, CPU)
    seq = random_seqs([12], cfg.vocab_size, seed=5)[0]
    diff = (forward_flat(model, [seq])[0] - hf_logits(hf_model(path), seq)).abs().max().item()
    assert diff <= TOL
