"""The Llama-family decoder, readable top to bottom: norm, MLP, attention, block, model.

Single-device code with no parallelism, quantization or kernel choice inside: norms, the
rotary embedding and the SwiGLU activation call registered ops, attention calls `ctx.attend`
(see `attention.py`), and `tessera.parallel` / `tessera.quant` act on the module from
outside.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
transformers state dict loads unchanged and a saved one loads in transformers.

Shapes: B batch, T tokens, H query heads, KVH key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tessera.config import ModelConfig
from tessera.kernels import registry
from tessera.model.attention import AttentionContext, CausalContext
from tessera.model.rope import inverse_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return registry.get("rms_norm", x.device)(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(x + residual), x + residual)` in one fused op; the sum keeps the
        residual's dtype, the stream's (under autocast the stream stays fp32 while bf16
        outputs join it)."""
        add_rms_norm = registry.get("add_rms_norm", x.device)
        return add_rms_norm(x.to(residual.dtype), residual, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swiglu = registry.get("swiglu", x.device)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and per-head QK norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        d, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = registry.get("rope", q.device)(q, k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v)  # [B, T, H, D]
        return self.o_proj(out.reshape(*x.shape[:2], -1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `[B, T, H, D]`, k and v `[B, T, KVH, D]` of x: the projections (and the QK
        norm), before the rotary embedding."""
        batch, num_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream is carried in two parts so that every residual add fuses with the
    norm after it: the layer takes `(x, residual)`, where the stream is `x + residual`
    (`residual` None for the first layer, whose stream is `x` alone), and returns the
    MLP's output with the stream before it; the next layer (or the final norm) adds them.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, ctx: AttentionContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm.add_and_norm(x, residual)
        attn_out = self.self_attn(normed, cos, sin, ctx)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(normed), residual


class Decoder(nn.Module):
    """Embeddings, the stack of layers and the final norm (HF's `LlamaModel`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # NOTE: a plain attribute, not a buffer, so `model.to(bfloat16)` cannot round the
        # frequencies; copies per device are cached by `inv_freq`.
        c = config
        self._inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        return self._inv_freq_on[device]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext, hidden_layers: Sequence[int] = ()
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        x = self.embed_tokens(input_ids)  # [B, T, d]
        cos, sin = rope_cos_sin(positions, self.inv_freq(x.device), x.dtype)
        kept = {0: x} if 0 in hidden_layers else {}
        residual = None
        for i, layer in enumerate(self.layers, start=1):
            x, residual = layer(x, residual, cos, sin, ctx)
            if i in hidden_layers:
                kept[i] = residual + x.to(residual.dtype)  # block i's output (the stream)
        return self.norm.add_and_norm(x, residual)[0], kept  # config: at least one layer


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when the head was skipped
    last_hidden: torch.Tensor  # [B, T, d] after the final norm
    hidden_states: dict[int, torch.Tensor]  # layer index -> [B, T, d] (0 = embeddings)


class TesseraForCausalLM(nn.Module):
    """Decoder plus LM head; `model(input_ids)` returns logits `[B, T, V]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                ctx: AttentionContext | None = None) -> torch.Tensor:
        return self.run(input_ids, positions, ctx).logits

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
            ctx: AttentionContext | None = None, *, hidden_layers: Sequence[int] = (),
            compute_logits: bool = True) -> ModelOutput:
        """Full forward with options: hidden states of chosen layers (0 = embeddings,
        i = output of block i, before the final norm), and skipping the LM head (the fused
        KD loss applies it chunk by chunk itself).

        `positions` defaults to 0..T-1 for every row.
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last, kept = self.model(input_ids, positions, ctx or CausalContext(), hidden_layers)
        logits = self.lm_head(last) if compute_logits else None
        return ModelOutput(logits=logits, last_hidden=last, hidden_states=kept)


def init_weights(model: TesseraForCausalLM) -> None:
    """Normal(0, initializer_range) for matrices and embeddings, zeros for biases, ones for
    norms (the Llama recipe)."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, init: bool = True) -> TesseraForCausalLM:
    """Build on `device` in `dtype`. With `init=False` the weights are left uninitialised
    (allocated via the meta device) for a loader that fills them next."""
    with torch.device("meta"):
        model = TesseraForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    if init:
        init_weights(model)
    return model
