"""Int8 weight-only quantization, symmetric, one scale per output channel.

`quantize_int8(w)` maps each row n of W `[N, K]` to int8 codes `round(w / s_n)` in
[-127, 127] with `s_n = max|W[n]| / 127`, so every weight is recovered within `s_n / 2`.
`Int8Linear` stores the codes (`weight`, int8) and scales (`weight_scale`, fp32) and
multiplies through the registered op "int8_matmul" (a Triton kernel on CUDA, dequantise +
matmul elsewhere). Activations stay in their dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tessera.kernels import int8_matmul as _int8_matmul  # noqa: F401  (registers the op)
from tessera.kernels import registry
from tessera.kernels.int8_matmul import dequantize_int8
from tessera.quant.linear import QuantizedLinear, linear_parts

QMAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes `[N, K]`, fp32 scales `[N]`) of W `[N, K]`; an all-zero row gets scale 0."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


class Int8Linear(QuantizedLinear):
    kind = "int8"
    STORAGE = ("weight", "weight_scale")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias, input_scale=input_scale)
        assert weight.dtype == torch.int8 and weight_scale.shape == (out_features,)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, column_scale: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None) -> Int8Linear:
        """Quantize `linear.weight * column_scale` (AWQ's scaled weight when given)."""
        weight, bias = linear_parts(linear)
        if column_scale is not None:
            weight = weight * column_scale.float()[None, :]
        codes, scale = quantize_int8(weight)
        return cls(codes, scale, bias=bias, input_scale=input_scale)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, input_scale: bool,
              **options: Any) -> Int8Linear:
        return cls(torch.empty(out_features, in_features, dtype=torch.int8),
                   torch.empty(out_features),
                   bias=torch.empty(out_features) if bias else None,
                   input_scale=torch.empty(in_features) if input_scale else None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return registry.get("int8_matmul", x.device)(x, self.weight, self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype)
