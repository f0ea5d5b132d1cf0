"""The Gemma 2 / Gemma 3 (text) network in plain torch, over a flat, unpadded batch.

Every detail that engines have got wrong is here on purpose (see GEMMA.md): RMSNorm in fp32
scaling by (1 + w); four norms per layer (sandwich); embeddings scaled by sqrt(d_model) cast to
the model dtype first; tanh-GELU; soft-capped attention (in the backend) and final logits in
fp32; tied LM head (a separate one only where the config unties it). Gemma 3 adds per-head q/k
RMSNorm and separate local/global RoPE bases.

q/k/v and gate/up projections are fused (one matmul each); the loader splits HF tensors in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gemma_serve.model.attention import AttentionBackend
from gemma_serve.model.config import ModelConfig
from torch import nn


class Linear(nn.Module):
    """A bias-free linear layer, weight [out, in]. Deployment may swap it after load for a
    packed or quantized equivalent with the same call (model/deploy.py)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    """A token embedding table [vocab, hidden]. Unlike nn.Embedding it runs no initialiser, so
    building the model on the meta device stays cheap (weights always come from a loader)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.scale: torch.Tensor | None = None  # 1 + w, once the weights are final (freeze)

    def freeze(self) -> None:
        """Compute 1 + w once: deployment calls this when the weights are final, sparing
        every later call two ops (a decode step runs ~100 norms)."""
        self.scale = 1.0 + self.weight.detach().float()

    def factor(self) -> torch.Tensor:
        """1 + w in fp32, what the normalised x is multiplied by."""
        return self.scale if self.scale is not None else 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps) * w as the reference does, in one op.
        scale = self.factor()
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), scale, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin are computed once per forward for the batch's positions (sin
    with the rotation's sign folded in: -sin on the first half).

    No buffers: the inverse frequencies are recomputed per call (head_dim / 2 values), so the
    module survives meta-device construction and needs no state in checkpoints.
    """

    def __init__(self, head_dim: int, theta: float, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling_factor = head_dim, theta, scaling_factor

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim)) / self.scaling_factor
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        signed = torch.cat([-sin[:, : self.head_dim // 2], sin[:, self.head_dim // 2 :]], dim=-1)
        return emb.cos().to(dtype)[:, None, :], signed.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: roll gives [x2, x1] and
    the signed sin [-sin, sin] the sign (bit-identical, one op instead of four)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    """Self-attention's projections: `project` before the backend, `output` after it
    (DecoderLayer calls the backend between them)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.qk_scale: torch.Tensor | None = None  # the norms' 1 + w per q and k head (freeze)

    def freeze(self) -> None:
        """The q and k norms' scales stacked per head, once their weights are final: one norm
        over the q and k heads together instead of two (a decode step runs 36 of them)."""
        self.qk_scale = self._qk_scale().detach()

    def _qk_scale(self) -> torch.Tensor:
        """Each q and k head's norm factor, [Hq + Hkv, D]."""
        assert self.q_norm is not None and self.k_norm is not None
        q, k = self.q_norm.factor(), self.k_norm.factor()
        return torch.cat([q.expand(self.num_heads, -1), k.expand(self.num_kv_heads, -1)])

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed x [t, hidden] -> the attention's q [t, Hq, D], k and v [t, Hkv, D]: q and k
        normed (Gemma 3) and rotated."""
        t, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)
        # q and k heads as one [t, Hq + Hkv, D] view: normed and rotated together.
        qk = qkv[:, : self.q_size + self.kv_size].view(t, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # As RMSNorm computes it (x * rsqrt(mean(x^2) + eps), then x (1 + w)), with each
            # head's own norm weight.
            scale = self.qk_scale if self.qk_scale is not None else self._qk_scale()
            qk = F.rms_norm(qk.to(torch.float32), (self.head_dim,), None, self.q_norm.eps)
            qk = qk.mul_(scale).to(x.dtype)
        cos, sin = rope
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The attention's output [t, Hq, D] (or [t, Hq * D]) -> o_proj's [t, hidden]."""
        return self.o_proj(out.reshape(out.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend
    ) -> torch.Tensor:
        q, k, v = self.attention_inputs(x, rope)
        return self.after_attention(x, attn(self.self_attn.layer, q, k, v))

    # The layer in two halves around the attention backend (which reads and writes the KV
    # cache): pure functions of the layer's weights and their inputs, which
    # model/compiled_layers.py compiles around its own attention.

    def attention_inputs(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual stream x [t, hidden] -> the attention's q, k, v."""
        return self.self_attn.project(self.input_layernorm(x), rope)

    def after_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream x and the attention's output -> the layer's output."""
        x = x + self.post_attention_layernorm(self.self_attn.output(out))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
        self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta)


# What runs a decoder layer in place of its forward: (layer, x, rope, attn) -> the same result.
LayerStep = Callable[
    [DecoderLayer, torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionBackend],
    torch.Tensor,
]


class GemmaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's (model.layers.N...), with fused qkv/gate_up."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg)
        # Gemma ties the LM head to the embedding (None: logits read the embedding table); an
        # untied checkpoint brings its own. Deployment may give a tied model a head module
        # built from the embedding (a packed or quantized copy, model/deploy.py).
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        )
        # Compiled decoder layers for one-row forwards (a decode step of one sequence), set
        # by the engine once compiled (model/compiled_layers.py); None: every forward eager.
        self.compiled_layers: LayerStep | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flat batch: input_ids, positions [T] -> fp32 soft-capped logits [N, vocab].

        N = len(logits_indices) (the rows that sample), or T when None.
        """
        return self.compute_logits(self.hidden_states(input_ids, positions, attn, logits_indices))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [N, hidden] at `rows` (all T when None)."""
        m, cfg = self.model, self.config
        x = m.embed_tokens(input_ids)
        # The normalizer is cast to the model dtype first, as in the reference.
        x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        rope_g = m.rope_global.cos_sin(positions, x.dtype)
        rope_l = m.rope_local.cos_sin(positions, x.dtype)
        step = self.compiled_layers if x.shape[0] == 1 else None
        for i, layer in enumerate(m.layers):
            rope = rope_l if cfg.is_sliding(i) else rope_g
            x = layer(x, rope, attn) if step is None else step(layer, x, rope, attn)
        if rows is not None:
            x = x[rows]
        return m.norm(x)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 soft-capped logits [N, vocab] of final hidden states [N, hidden]."""
        m, cfg = self.model, self.config
        if self.lm_head is not None:
            logits = self.lm_head(x).float()
        else:
            logits = F.linear(x, m.embed_tokens.weight).float()
        cap = cfg.final_logit_softcapping
        if cap is not None and cap > 0:  # in place: [N, vocab] is the biggest activation
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits
