"""Model configuration: read from a Hugging Face config.json or a named preset (torch-free)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text")
# The one activation Gemma uses; HF configs name it, and anything else is refused, not ignored.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
# --quantization modes (model/deploy.py): "none" is the exact fp32 path, "int8" W8A8 on CPUs.
QUANTIZATIONS = ("none", "int8")

# transformers' defaults (Gemma2Config, Gemma3TextConfig) for the keys a config.json leaves out.
# Saved configs omit values equal to the default: the nested text_config of a multimodal Gemma 3
# checkpoint lists only a handful of fields.
_COMMON_DEFAULTS: dict[str, Any] = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": _COMMON_DEFAULTS
    | {
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": _COMMON_DEFAULTS
    | {
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    },
}
# Keys of a multimodal Gemma 3 config (model_type gemma3) that apply to its text model too.
_TOP_LEVEL_TEXT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")


class ConfigError(ValueError):
    """An unsupported or inconsistent model configuration."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of a Gemma 2 / Gemma 3 (text) network."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # HF convention: half the paper's feed-forward dim
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0  # global (full-attention) layers
    rope_local_theta: float = 10000.0  # sliding-window layers
    rope_scaling_factor: float = 1.0  # linear scaling, global layers only (Gemma 3)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    use_qk_norm: bool = False
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    tie_word_embeddings: bool = True  # False: a separate lm_head.weight

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types lists {len(self.layer_types)} layers, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}")

    @property
    def scale(self) -> float:
        """Softmax scale: query_pre_attn_scalar ** -0.5 (not head_dim: they differ for 27B)."""
        return self.query_pre_attn_scalar**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4.x and 5.x spellings).

        Keys left out take transformers' defaults for the model type, as transformers would.
        """
        if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):
            top = {k: d[k] for k in _TOP_LEVEL_TEXT_KEYS if k in d}
            d = {**top, **d["text_config"], "model_type": "gemma3_text"}
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        d = {**HF_DEFAULTS[model_type], **d}
        try:
            activation = d["hidden_activation"] or d.get("hidden_act")
            if activation not in SUPPORTED_ACTIVATIONS:
                raise ConfigError(
                    f"unsupported hidden_activation {activation!r}; "
                    f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
                )
            if d.get("use_bidirectional_attention"):
                raise ConfigError(
                    "bidirectional attention (an embedding model) is not supported: "
                    "this server generates text with causal Gemma models"
                )
            n_layers = int(d["num_hidden_layers"])
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            head_dim = int(d["head_dim"] or hidden // heads)
            layer_types = tuple(
                d.get("layer_types") or _default_layer_types(model_type, d, n_layers)
            )
            rope_global, rope_local, factor = _rope(model_type, d)
            eos = d["eos_token_id"]
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(d["num_key_value_heads"] or heads),
                head_dim=head_dim,
                query_pre_attn_scalar=float(d["query_pre_attn_scalar"] or head_dim),
                sliding_window=int(d["sliding_window"] or 4096),
                layer_types=layer_types,
                # transformers' Gemma 3 reads attn_logit_softcapping but never applies it.
                attn_logit_softcapping=(
                    _opt_float(d["attn_logit_softcapping"]) if model_type == "gemma2" else None
                ),
                final_logit_softcapping=_opt_float(d["final_logit_softcapping"]),
                rope_theta=rope_global,
                rope_local_theta=rope_local,
                rope_scaling_factor=factor,
                rms_norm_eps=float(d["rms_norm_eps"]),
                max_position_embeddings=int(d["max_position_embeddings"]),
                use_qk_norm=model_type == "gemma3_text",
                bos_token_id=int(d["bos_token_id"]),
                eos_token_ids=_ids(eos),
                pad_token_id=int(d["pad_token_id"] or 0),
                tie_word_embeddings=bool(d["tie_word_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid value in config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face config dict that `from_hf_dict` reads back to this config."""
        scaling = None
        if self.rope_scaling_factor != 1.0:
            scaling = {"rope_type": "linear", "factor": self.rope_scaling_factor}
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_theta,
            "rope_scaling": scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        cfg = cls.from_hf_dict(data)
        # Instruction-tuned checkpoints list their end-of-turn token as an EOS only here (Gemma
        # 2 -it: [1, 107]); transformers' generate and vLLM stop at it, so do we.
        gen = path.parent / "generation_config.json"
        if gen.is_file():
            try:
                extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
                raise ConfigError(f"{gen} is not a valid generation config: {e}") from None
            eos = cfg.eos_token_ids + tuple(i for i in extra if i not in cfg.eos_token_ids)
            cfg = dataclasses.replace(cfg, eos_token_ids=eos)
        return cfg


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _default_layer_types(model_type: str, d: dict[str, Any], n: int) -> list[str]:
    if model_type == "gemma2":  # even layers slide, odd layers are global
        return [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]


def _rope(model_type: str, d: dict[str, Any]) -> tuple[float, float, float]:
    """(global theta, local theta, linear scaling factor of the global layers)."""
    theta = float(d["rope_theta"])
    local_default = theta if model_type == "gemma2" else 10000.0
    local_theta = float(d.get("rope_local_base_freq", local_default))
    params = d.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # transformers 5, per layer type
        full, local = params[FULL] or {}, params.get(SLIDING) or {}
        _check_rope_type(local)
        return (
            float(full.get("rope_theta", theta)),
            float(local.get("rope_theta", local_theta)),
            _check_rope_type(full),
        )
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", theta))
        return theta, theta if model_type == "gemma2" else local_theta, _check_rope_type(params)
    return theta, local_theta, _check_rope_type(d.get("rope_scaling") or {})


def _check_rope_type(params: dict[str, Any]) -> float:
    """The linear scaling factor of a RoPE spec; other scaling types are refused."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        return float(params.get("factor", 1.0))
    if rope_type != "default":
        raise ConfigError(f"unsupported rope_type {rope_type!r}; supported: default, linear")
    return 1.0


def _ids(value: Any) -> tuple[int, ...]:
    """An HF token-id field: one id, a list of ids, or null."""
    if value is None:
        return ()
    return tuple(int(e) for e in (value if isinstance(value, list) else [value]))


def _gemma2_preset(
    hidden: int, layers: int, ffn: int, heads: int, kv: int, head_dim: int, qpas: float
) -> ModelConfig:
    return ModelConfig(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        query_pre_attn_scalar=qpas,
        sliding_window=4096,
        layer_types=tuple(_default_layer_types("gemma2", {}, layers)),
    )


# Shapes from the Gemma 2 paper, Table 1 (intermediate_size = paper's feed-forward dim / 2).
PRESETS: dict[str, ModelConfig] = {
    "gemma-2-2b": _gemma2_preset(2304, 26, 9216, 8, 4, 256, 256),
    "gemma-2-9b": _gemma2_preset(3584, 42, 14336, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2_preset(4608, 46, 36864, 32, 16, 128, 144),
}


def preset(name: str) -> ModelConfig:
    """The config of a named preset (gemma-2-2b, gemma-2-9b, gemma-2-27b)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
