"""Decode-sized products through the few-row GEMV kernel, applied to a loaded model for
serving on the GPU.

`use_gemv_products(model)` routes the products of every decoder layer through the ops of
`tessera/kernels/gemv.py`, whose CUDA implementation runs a Triton GEMV for inputs of a few
rows (a decode step) where it beats cuBLAS and cuBLAS otherwise:
- each fused projection (`fused_projections.py`) gets the "gemv" op as its product;
- each plain `nn.Linear` of a layer (o_proj, down_proj, and the unfused q/k/v and gate/up
  projections) becomes a `GemvLinear` with the same parameters;
- each MLP whose gate and up are fused and whose down projection is a plain bias-free
  `nn.Linear` (or, in a quantized model, an int8 or FP8 module) becomes a
  `SwiGLUDownMLP`: the SwiGLU activation and the down projection in one "swiglu_gemv"
  launch, reading the fused gate/up product directly. Quantized q/k/v and gate/up products
  need nothing here: their own ops take the GEMV for a few rows;
- each decoder layer whose q/k/v and gate/up groups both go through the GEMV (float groups
  with the "gemv" product, int8 or FP8 groups) becomes a `NormGemvLayer`: its two residual
  adds and RMSNorms run inside the GEMVs of the groups after them ("norm_gemv"), two
  launches a layer fewer.

Parameters, `state_dict` and the module tree's names are unchanged, and results equal the
plain path's up to the order of fp32 sums. Only modules whose weights sit on a device where
a fast "gemv" is registered are changed (CUDA), unless `everywhere=True` (tests). The LM
head is left to cuBLAS. `undo_gemv_products` restores plain modules; the quantizer calls it
first. Training never sees these modules: the serving engine applies them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessera.kernels import registry
from tessera.kernels.gemv import QUANTIZED_MAX_ROWS, takes_few_row_kernel
from tessera.model.attention import AttentionContext
from tessera.model.fused_projections import (
    SharedInputProjection,
    SharedInputQuantized,
    restore_linears,
)
from tessera.model.transformer import MLP, DecoderLayer, RMSNorm
from tessera.quant.fp8 import FP8Linear
from tessera.quant.int8 import Int8Linear

GEMV_CODES = (Int8Linear, FP8Linear)  # quantized modules whose codes the GEMV reads


def gemv_product(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` through the "gemv" op of x's device."""
    return registry.get("gemv", x.device)(x, weight, bias)


class GemvLinear(nn.Module):
    """Stands where an `nn.Linear` stood, with the same weight and bias parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv_product(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, few-row GEMV"


class SwiGLUDownMLP(MLP):
    """The MLP of a fused gate/up projection: `swiglu_gemv(gate_up(x), W_down)`, with the
    down projection's int8 or FP8 codes and scales where it is quantized (up to
    `QUANTIZED_MAX_ROWS` rows; more go through the module itself).

    NOTE: installed by reassigning an `MLP` object's class (`use_gemv_products`), so that the
    object keeps its submodules and the fused projection's state-dict hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.whole(x)  # [..., 2F]
        down = self.down_proj
        swiglu_gemv = registry.get("swiglu_gemv", x.device)
        if not isinstance(down, GEMV_CODES):
            return swiglu_gemv(gate_up, down.weight)
        if gate_up.numel() > QUANTIZED_MAX_ROWS * gate_up.shape[-1]:
            gate, up = gate_up.chunk(2, dim=-1)
            return down(registry.get("swiglu", x.device)(gate, up))
        quantize_input = isinstance(down, FP8Linear) and down.activations == "dynamic"
        return swiglu_gemv(gate_up, down.weight, down.weight_scale, quantize_input)


def _gemv_operands(group: SharedInputProjection
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    """(weight or codes, bias, weight_scale, quantize_input) of a group's product."""
    if isinstance(group, SharedInputQuantized):
        fused = group.fused
        quantize_input = isinstance(fused, FP8Linear) and fused.activations == "dynamic"
        return fused.weight, fused.bias, fused.weight_scale, quantize_input
    return group.weight, group.bias, None, False


class NormGemvLayer(DecoderLayer):
    """A decoder layer whose residual adds and RMSNorms run inside the products after them:
    "norm_gemv" computes a group's whole product from the layer's input and stream, and the
    group is primed with it (`SharedInputProjection.prime`), so that the attention and the
    MLP, called with the un-normalised input, read it. Inputs of more rows than the GEMV
    takes run as in `DecoderLayer`.

    NOTE: installed by reassigning a `DecoderLayer` object's class (`use_gemv_products`);
    the attention and the MLP receive the input before its norm, which is right only
    because their first products read the primed output."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        attn_in, residual = _normed(self.input_layernorm, x, residual,
                                    self.self_attn.qkv_proj)
        attn_out = self.self_attn(attn_in, cos, sin, ctx)
        mlp_in, residual = _normed(self.post_attention_layernorm, attn_out, residual,
                                   self.mlp.gate_up_proj)
        return self.mlp(mlp_in), residual


def _normed(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
            group: SharedInputProjection) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the group's members are called with, the stream): the primed input x where the
    GEMV takes these rows, else the norm's output."""
    if residual is not None:
        x = x.to(residual.dtype)
    weight, bias, weight_scale, quantize_input = _gemv_operands(group)
    rows = x.numel() // max(1, x.shape[-1])
    if not takes_few_row_kernel(rows, weight, quantized=weight_scale is not None):
        return (norm(x), x) if residual is None else norm.add_and_norm(x, residual)
    out, stream = registry.get("norm_gemv", x.device)(x, residual, norm.weight, norm.eps,
                                                      weight, bias, weight_scale,
                                                      quantize_input)
    group.prime(x, out)
    return x, stream


def _norm_fusable(layer: nn.Module) -> bool:
    """A plain layer with plain norms whose two groups both take the GEMV."""
    groups = (getattr(layer.self_attn, "qkv_proj", None), getattr(layer.mlp, "gate_up_proj",
                                                                  None))
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return type(layer) is DecoderLayer and all(type(n) is RMSNorm for n in norms) and \
        all(_takes_gemv(group) for group in groups)


def _takes_gemv(group: nn.Module | None) -> bool:
    if type(group) is SharedInputProjection:
        return group.product is gemv_product
    return isinstance(group, SharedInputQuantized) and isinstance(group.fused, GEMV_CODES)


def _fast_on(weight: torch.Tensor, everywhere: bool) -> bool:
    return everywhere or registry.select("gemv", weight.device).backend != "torch"


def _fusable_mlp(mlp: nn.Module) -> bool:
    group, down = getattr(mlp, "gate_up_proj", None), mlp.down_proj
    if type(mlp) is not MLP or not isinstance(group, SharedInputProjection) or \
            down.bias is not None:
        return False
    if isinstance(group, SharedInputQuantized):
        return isinstance(down, GEMV_CODES) and down.input_scale is None
    return group.bias is None and type(down) in (nn.Linear, GemvLinear)


def use_gemv_products(model: nn.Module, *, everywhere: bool = False) -> int:
    """Route the decoder layers' products through the GEMV ops (see above), in place;
    returns the number of modules changed."""
    changed = 0
    for layer in model.model.layers:
        for parent in layer.modules():
            if type(parent) is SharedInputProjection and _fast_on(parent.weight,
                                                                      everywhere):
                parent.product = gemv_product
                changed += 1
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and _fast_on(child.weight, everywhere):
                    setattr(parent, name, GemvLinear(child))
                    changed += 1
        mlp = layer.mlp
        if _fusable_mlp(mlp) and _fast_on(mlp.down_proj.weight, everywhere):
            mlp.__class__ = SwiGLUDownMLP
            changed += 1
        if _norm_fusable(layer) and _fast_on(layer.input_layernorm.weight, everywhere):
            layer.__class__ = NormGemvLayer
            changed += 1
    return changed


def undo_gemv_products(model: nn.Module) -> int:
    """Undo `use_gemv_products`; returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if type(module) in (SwiGLUDownMLP, NormGemvLayer):
            module.__class__ = MLP if type(module) is SwiGLUDownMLP else DecoderLayer
            restored += 1
    return restored + restore_linears(model, GemvLinear,
                                      lambda product: product is gemv_product)
