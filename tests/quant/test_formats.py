"""Quantize -> dequantize error bounds of each weight format, element by element."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.kernels.int4_matmul import dequantize_int4, pack_int4
from tessera.kernels.int8_matmul import dequantize_int8
from tessera.quant.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8, quantize_rows
from tessera.quant.int4 import fake_quantize_groups, group_size_for, quantize_groups
from tessera.quant.int8 import quantize_int8

E4M3_RELATIVE = 2.0**-4  # half the spacing of 3 mantissa bits, relative to the value
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # half the subnormal spacing 2**-9 (in units of scale)
E4M3_MIN_NORMAL = 2.0**-6


def weights_with_outliers(rows: int = 40, cols: int = 192) -> torch.Tensor:
    w = torch.randn(rows, cols) * 0.02
    w[3, 7] = 1.5  # one large weight in a row
    w[5] = 0.0  # an all-zero row
    w[6, :96] = 0.3  # a constant group
    return w


# ---------------------------------------------------------------------------- int8


def test_int8_error_is_at_most_half_a_step_per_row():
    w = weights_with_outliers()
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.abs().max() <= 127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    error = (dequantize_int8(codes, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_int8(codes, scale)[5], torch.zeros(192))  # zero row exact
    assert (codes.abs().amax(1)[scale > 0] == 127).all()  # each row's extreme uses the range


# ---------------------------------------------------------------------------- int4


@pytest.mark.parametrize("group", [32, 96])
def test_int4_error_is_at_most_half_a_step_per_group(group):
    w = weights_with_outliers()
    codes, scales, zeros = quantize_groups(w, group)
    assert codes.max() <= 15 and zeros.max() <= 15
    assert scales.shape == zeros.shape == (40, 192 // group)
    step = scales.repeat_interleave(group, dim=1)
    error = (dequantize_int4(pack_int4(codes), scales, zeros, group) - w).abs()
    assert (error <= step / 2 + 1e-7).all()
    assert torch.equal(fake_quantize_groups(w, group)[5], torch.zeros(192))
    assert torch.allclose(fake_quantize_groups(w, group)[6, :96], torch.full((96,), 0.3))


def test_int4_fake_quantization_equals_quantize_then_dequantize():
    w = weights_with_outliers()
    codes, scales, zeros = quantize_groups(w, 32)
    assert torch.equal(fake_quantize_groups(w, 32),
                       dequantize_int4(pack_int4(codes), scales, zeros, 32))


def test_int4_range_spans_each_group_including_zero():
    w = torch.rand(4, 64) + 1.0  # all positive: the range is widened down to 0
    codes, scales, zeros = quantize_groups(w, 32)
    assert (zeros == 0).all()
    torch.testing.assert_close(scales, w.view(4, 2, 32).amax(-1) / 15)
    assert (codes.view(4, 2, 32).amax(-1) == 15).all()


def test_int4_group_size_is_the_largest_multiple_of_16_dividing_k():
    assert group_size_for(4096) == 128
    assert group_size_for(1536) == 128
    assert group_size_for(576) == 96
    assert group_size_for(160) == 80
    assert group_size_for(576, limit=60) == 48
    with pytest.raises(ConfigError, match="100 input features"):
        group_size_for(100)


# ---------------------------------------------------------------------------- fp8


def assert_within_e4m3(approx: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
    """|error| <= 2**-4 |w| for values in e4m3's normal range, <= half the subnormal step
    below it (both in units of the per-row scale)."""
    scaled = exact / scale
    bound = torch.where(scaled.abs() >= E4M3_MIN_NORMAL, E4M3_RELATIVE * scaled.abs(),
                        torch.full_like(scaled, E4M3_SUBNORMAL_HALF_STEP))
    assert ((approx - exact).abs() / scale <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_error_is_within_e4m3_rounding(per_channel):
    w = weights_with_outliers()
    codes, scale = quantize_fp8(w, per_channel)
    assert codes.dtype == torch.float8_e4m3fn
    assert scale.shape == ((40,) if per_channel else (1,))
    rows_scale = scale[:, None] if per_channel else scale.expand(40, 1)
    assert_within_e4m3(dequantize_fp8(codes, scale), w, rows_scale)
    largest = codes.float().abs().amax(1) if per_channel else codes.float().abs().amax()
    assert (largest[largest > 0] == FP8_MAX).all()  # the extreme lands on 448


def test_fp8_per_channel_beats_per_tensor_on_small_rows():
    w = weights_with_outliers()  # row 3 holds a weight 75x the others
    error = {pc: (dequantize_fp8(*quantize_fp8(w, pc)) - w).abs() for pc in (True, False)}
    small_rows = [r for r in range(40) if r != 3]
    assert error[True][small_rows].sum() < error[False][small_rows].sum()


def test_fp8_activation_rows_get_their_own_scale():
    x = torch.randn(6, 64)
    x[2] *= 1000
    codes, scale = quantize_rows(x)
    assert scale.shape == (6, 1)
    torch.testing.assert_close(scale, x.abs().amax(1, keepdim=True) / FP8_MAX)
    assert_within_e4m3(codes.float() * scale, x, scale)
