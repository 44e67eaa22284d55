"""Quantized Linear modules against the fp32 Linear they replace.

Weight-only formats have an exact bound: output n moves by at most sum_k |x_k| |dW[n, k]|,
and |dW| is bounded per format (tests/quant/test_formats.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tessera.kernels import registry
from tessera.quant import FP8Linear, Int4Linear, Int8Linear
from tessera.quant.fp8 import fp8_matmul_reference, fp8_matmul_scaled_mm, quantize_rows
from tessera.quant.linear import build_empty


def make_linear(in_features: int = 288, out_features: int = 80, bias: bool = True
                ) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def error_and_bound(module, linear, weight_bound: torch.Tensor):
    """(|module(x) - linear(x)|, sum_k |x_k| weight_bound[n, k]) on random x [3, 4, K]."""
    x = torch.randn(3, 4, linear.in_features)
    with torch.no_grad():
        error = (module(x) - linear(x)).abs()
    return error, x.abs() @ weight_bound.T, linear(x).abs().max()


def test_int8_linear_output_within_bound():
    linear = make_linear()
    module = Int8Linear.from_linear(linear)
    step = module.weight_scale[:, None].expand(80, 288)
    error, bound, scale = error_and_bound(module, linear, step / 2)
    assert (error <= bound + 1e-5).all()
    assert error.max() < 0.02 * scale  # and the bound is not vacuous


def test_int4_linear_output_within_bound():
    linear = make_linear()
    module = Int4Linear.from_linear(linear, group_size=128)
    assert module.group_size == 96  # 288 = 3 x 96
    step = module.scales.repeat_interleave(96, dim=1)
    error, bound, scale = error_and_bound(module, linear, step / 2)
    assert (error <= bound + 1e-5).all()
    assert error.max() < 0.2 * scale


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_weight_only_linear_output_within_bound(per_channel):
    linear = make_linear()
    module = FP8Linear.from_linear(linear, per_channel=per_channel, activations="none")
    w = linear.weight.detach()
    scale = module.weight_scale[:, None] if per_channel else module.weight_scale
    bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * scale.expand_as(w))
    error, bound, out_scale = error_and_bound(module, linear, bound)
    assert (error <= bound * (1 + 1e-5) + 1e-5).all()
    assert error.max() < 0.05 * out_scale


def test_fp8_dynamic_activations_stay_close():
    linear = make_linear()
    module = FP8Linear.from_linear(linear)  # per channel, activations quantized per token
    x = torch.randn(16, 288)
    with torch.no_grad():
        exact, approx = linear(x), module(x)
    relative = (approx - exact).norm() / exact.norm()
    assert 0 < relative < 0.05


def test_input_scale_divides_the_input_before_the_matmul():
    linear = make_linear()
    s = torch.rand(288) + 0.5
    scaled = Int8Linear.from_linear(linear, column_scale=s, input_scale=1 / s)
    x = torch.randn(5, 288)
    with torch.no_grad():
        expected = x @ (scaled.dequantized_weight() / s).T + linear.bias
        torch.testing.assert_close(scaled(x), expected, rtol=1e-5, atol=1e-5)


def test_dtype_conversion_moves_but_keeps_quantized_tensors():
    linear = make_linear()
    modules = [Int8Linear.from_linear(linear), Int4Linear.from_linear(linear),
               FP8Linear.from_linear(linear)]
    for module in modules:
        stored = {name: getattr(module, name).dtype for name in module.STORAGE}
        module.to(torch.bfloat16)
        assert {name: getattr(module, name).dtype for name in module.STORAGE} == stored
        assert module.bias.dtype == torch.bfloat16
        out = module(torch.randn(2, 288, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_empty_module_from_spec_loads_the_state_back():
    linear = make_linear()
    for module in (Int8Linear.from_linear(linear, input_scale=torch.rand(288)),
                   Int4Linear.from_linear(linear, group_size=32),
                   FP8Linear.from_linear(linear, per_channel=False, activations="none")):
        empty = build_empty(module.spec(), device="cpu")
        assert type(empty) is type(module)
        empty.load_state_dict(module.state_dict())
        x = torch.randn(3, 288)
        assert torch.equal(empty(x), module(x))


def test_scaled_mm_convention_matches_float64():
    """The `_scaled_mm` call (run by torch on CPU where it can) and the reference both
    compute (x_fp8 * sx) @ (W_fp8 * sw).T; check each against float64."""
    linear = make_linear(bias=False)
    module = FP8Linear.from_linear(linear)
    x = torch.randn(7, 288, dtype=torch.bfloat16)
    codes, x_scale = quantize_rows(x)
    expected = (codes.double() * x_scale.double()) @ module.dequantized_weight().double().T
    tol = 2e-2 * expected.abs().max().item()
    reference = fp8_matmul_reference(x, module.weight, module.weight_scale, True)
    torch.testing.assert_close(reference.double(), expected, atol=tol, rtol=0)
    try:
        fast = fp8_matmul_scaled_mm(x, module.weight, module.weight_scale, True)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run on CPU here ({exc})")
    torch.testing.assert_close(fast.double(), expected, atol=tol, rtol=0)


def test_registry_picks_scaled_mm_only_on_fp8_gpus():
    assert registry.select("fp8_matmul", "cpu").backend == "torch"


def test_fp8_gemv_path_passes_empty_and_many_row_calls_on():
    """No rows, or more than the few-row kernel takes: the next implementation (here the
    reference), not a launch."""
    from tessera.quant.fp8 import fp8_matmul_gemv

    module = FP8Linear.from_linear(make_linear(64, 24)).to(torch.bfloat16)
    for rows in (0, 5):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        got = fp8_matmul_gemv(x, module.weight, module.weight_scale, True)
        assert got.shape == (rows, 24)
        torch.testing.assert_close(got, fp8_matmul_reference(x, module.weight,
                                                             module.weight_scale, True))


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_fast_path_matches_reference_gpu(kind):
    linear = make_linear(4096, 1000).cuda().to(torch.bfloat16)
    module = {"int8": Int8Linear.from_linear, "int4": Int4Linear.from_linear,
              "fp8": FP8Linear.from_linear}[kind](linear)
    for rows in (1, 7, 300):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fast = module(x)
            with registry.force_torch():
                reference = module(x)
        tol = 2e-2 * reference.abs().max().item()
        torch.testing.assert_close(fast, reference, atol=tol, rtol=2e-2)
