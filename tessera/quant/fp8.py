"""FP8 (e4m3) weights with per-channel or per-tensor scales, and the op "fp8_matmul".

`quantize_fp8(w, per_channel)` stores `w / s` as `torch.float8_e4m3fn` with
`s = max|w| / 448` per output channel (or over the whole tensor), so the largest weight
lands on e4m3's largest finite value; the relative rounding error of a normal e4m3 value
is at most 2**-4.

Op "fp8_matmul": `fp8_matmul(x, weight, weight_scale, quantize_activations) -> out`, x
`[..., K]`, weight float8_e4m3fn `[N, K]`, weight_scale fp32 `[N]` or `[1]`; out in x's dtype.
With `quantize_activations`, each row (token) of x is first rounded to e4m3 with its own
dynamic scale `max|x_row| * (1 / 448)` (W8A8); without, only the weight is quantized.

- reference (every device): dequantise weight (and activations) into x's dtype, matmul.
- `scaled_mm` (CUDA capability >= 8.9, bf16/fp16 activations, K and N multiples of 16,
  activations quantized): `torch._scaled_mm` on the FP8 tensor cores with row-wise scales
  (per token for x, per channel for W, a per-tensor scale broadcast), fp32 accumulation.
  Other calls fall back to the reference.
- `triton` (the same devices, Triton installed): calls of up to 4 rows (decode steps) run
  the few-row GEMV of `tessera/kernels/gemv.py`, which loads the e4m3 codes, rounds each
  input row to e4m3 itself when activations are quantized, and scales after the reduction;
  larger calls go to `scaled_mm`.

`FP8Linear` stores `weight` (float8) and `weight_scale` (fp32) and calls the op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON
from tessera.kernels.gemv import gemv_forward, round_rows_e4m3, takes_few_row_kernel
from tessera.quant.linear import QuantizedLinear, linear_parts

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12  # floor on an amax, so an all-zero row or tensor gets a usable scale


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 codes `[N, K]`, fp32 scales `[N]`, or `[1]` per tensor) of W `[N, K]`."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = amax.clamp(min=_TINY) / FP8_MAX
    codes = (w / _as_rows(scale, w.shape[0])).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * _as_rows(scale.float(), codes.shape[0])).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 x `[M, K]`, fp32 scales `[M, 1]`): one dynamic scale per row."""
    return round_rows_e4m3(x)


def _as_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    return scale.reshape(-1, 1).expand(rows, 1) if scale.numel() == 1 else scale[:, None]


# ---------------------------------------------------------------------------- the op


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         quantize_activations: bool) -> torch.Tensor:
    if quantize_activations:
        rows, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        x = (rows.float() * scale).to(x.dtype).reshape(x.shape)
    return x @ dequantize_fp8(weight, weight_scale, x.dtype).T


def fp8_matmul_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         quantize_activations: bool) -> torch.Tensor:
    (n, k), rows = weight.shape, x.reshape(-1, x.shape[-1])
    usable = (quantize_activations and x.dtype in (torch.bfloat16, torch.float16)
              and k % 16 == 0 and n % 16 == 0)
    if not usable:
        return fp8_matmul_reference(x, weight, weight_scale, quantize_activations)
    codes, x_scale = quantize_rows(rows)
    w_scale = weight_scale.float().reshape(1, -1).expand(1, n).contiguous()
    out = torch._scaled_mm(codes, weight.t(), scale_a=x_scale, scale_b=w_scale,
                           out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], n)


def supports_scaled_mm(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    quantize_activations: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if not takes_few_row_kernel(rows.shape[0], weight, quantized=True) or \
            x.dtype not in (torch.bfloat16, torch.float16):
        return registry.fallback("fp8_matmul", "triton", x.device)(
            x, weight, weight_scale, quantize_activations)
    out = gemv_forward(rows if rows.stride(-1) == 1 else rows.contiguous(), weight,
                       weight_scale=weight_scale, quantize_input=quantize_activations)
    return out.reshape(*x.shape[:-1], weight.shape[0])


registry.register("fp8_matmul", "torch", fp8_matmul_reference, reference=True)
registry.register("fp8_matmul", "scaled_mm", fp8_matmul_scaled_mm, supports=supports_scaled_mm)
if HAS_TRITON:
    registry.register("fp8_matmul", "triton", fp8_matmul_gemv, supports=supports_scaled_mm,
                      priority=1)


# ---------------------------------------------------------------------------- module


class FP8Linear(QuantizedLinear):
    kind = "fp8"
    STORAGE = ("weight", "weight_scale")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                 activations: str = "dynamic", bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias, input_scale=input_scale)
        assert weight.dtype == FP8 and weight_scale.numel() in (1, out_features)
        self.activations = activations
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, per_channel: bool = True,
                    activations: str = "dynamic") -> FP8Linear:
        weight, bias = linear_parts(linear)
        codes, scale = quantize_fp8(weight, per_channel)
        return cls(codes, scale, activations=activations, bias=bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, input_scale: bool,
              per_channel: bool, activations: str, **options: Any) -> FP8Linear:
        return cls(torch.empty(out_features, in_features, dtype=FP8),
                   torch.empty(out_features if per_channel else 1), activations=activations,
                   bias=torch.empty(out_features) if bias else None,
                   input_scale=torch.empty(in_features) if input_scale else None)

    def options(self) -> dict[str, Any]:
        return {"per_channel": self.weight_scale.numel() == self.out_features,
                "activations": self.activations}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return registry.get("fp8_matmul", x.device)(x, self.weight, self.weight_scale,
                                                    self.activations == "dynamic")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations={self.activations}"
