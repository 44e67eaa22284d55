"""Group-wise asymmetric int4 weight quantization with zero points.

Each row of W `[N, K]` is cut into groups of `group_size` consecutive input channels; a
group with extremes lo <= 0 <= hi (the range is widened to include 0, so zero is exact and
a constant group is harmless) gets scale `s = (hi - lo) / 15` and zero point
`z = round(-lo / s)` in 0..15, and each weight the code `clamp(round(w / s) + z, 0, 15)`.
Every weight is recovered within `s / 2`.

`group_size_for(K, limit)` picks the largest multiple of 16 that divides K and is at most
`limit` (128 by default): 128 for K = 1536, 96 for K = 576. `Int4Linear` stores packed
codes, scales and zeros in the layout of `tessera.kernels.int4_matmul` and multiplies
through the registered op "int4_matmul".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tessera.errors import ConfigError
from tessera.kernels import int4_matmul as _int4_matmul  # noqa: F401  (registers the op)
from tessera.kernels import registry
from tessera.kernels.int4_matmul import MIN_GROUP, dequantize_int4, pack_int4
from tessera.quant.linear import QuantizedLinear, linear_parts

QMAX = 15


def group_size_for(in_features: int, limit: int = 128) -> int:
    """Largest multiple of 16 dividing `in_features` and <= limit; ConfigError if none."""
    for size in range(limit - limit % MIN_GROUP, 0, -MIN_GROUP):
        if in_features % size == 0:
            return size
    raise ConfigError(f"no int4 group size (a multiple of {MIN_GROUP} up to {limit}) divides "
                      f"{in_features} input features; skip this layer or use int8")


def quantize_groups(weight: torch.Tensor, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 `[N, K]`, scales fp32 `[N, G]`, zeros uint8 `[N, G]`) of W `[N, K]`."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scales = (hi - lo) / QMAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / safe).clamp_(0, QMAX)
    codes = torch.round(w / safe[..., None]) + zeros[..., None]
    codes = codes.clamp_(0, QMAX).to(torch.uint8).reshape(n, k)
    return codes, scales, zeros.to(torch.uint8)


def fake_quantize_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W quantized and dequantized again, in fp32: the same numbers as `quantize_groups`
    followed by dequantization, in fewer passes (the AWQ search calls it for every alpha)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = torch.aminmax(w, dim=-1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scales = (hi - lo) / QMAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    zeros = torch.round(-lo.unsqueeze(-1) / safe)
    codes = torch.round(w / safe).add_(zeros).clamp_(0, QMAX)
    return codes.sub_(zeros).mul_(safe).reshape(n, k)


class Int4Linear(QuantizedLinear):
    kind = "int4"
    STORAGE = ("qweight", "scales", "zeros")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, *, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
        super().__init__(in_features, out_features, bias=bias, input_scale=input_scale)
        groups = (out_features, in_features // group_size)
        assert qweight.dtype == torch.uint8 and scales.shape == zeros.shape == groups
        self.group_size = group_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros.to(torch.uint8).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 128,
                    column_scale: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None) -> Int4Linear:
        """Quantize `linear.weight * column_scale` with groups of at most `group_size`."""
        weight, bias = linear_parts(linear)
        if column_scale is not None:
            weight = weight * column_scale.float()[None, :]
        size = group_size_for(weight.shape[1], group_size)
        codes, scales, zeros = quantize_groups(weight, size)
        return cls(pack_int4(codes), scales, zeros, size, bias=bias, input_scale=input_scale)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, input_scale: bool,
              group_size: int, **options: Any) -> Int4Linear:
        groups = (out_features, in_features // group_size)
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                   torch.empty(groups), torch.empty(groups, dtype=torch.uint8), group_size,
                   bias=torch.empty(out_features) if bias else None,
                   input_scale=torch.empty(in_features) if input_scale else None)

    def options(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return registry.get("int4_matmul", x.device)(x, self.qweight, self.scales, self.zeros,
                                                     self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
