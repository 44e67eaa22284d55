"""RMSNorm and fused residual-add + RMSNorm kernels against float64 references.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small fp32/fp16 shapes on CPU; `gpu` tests run them here, compiled, at full
size. Outputs are poisoned with NaN before each launch, so an
element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.kernels import rms_norm as kernels
from tessera.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference

EPS = 1e-6
SMALL = [(2, 32, 128), (3, 37, 100)]  # a power-of-two width, and odd row count and width
LARGE = [(4, 2048, 4096), (3, 333, 5000)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(shape, dtype, device):
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(width, device=device)).to(dtype)
    dy = torch.randn(shape, dtype=dtype, device=device)
    dtotal = torch.randn(shape, dtype=dtype, device=device)
    return x, residual, weight, dy, dtotal


def float64_reference(x, residual, weight, dy, dtotal):
    """Outputs and gradients of `add_rms_norm` (or `rms_norm` with residual None)."""
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    if residual is None:
        y = rms_norm_reference(x64, w64, EPS)
        dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
        return y.detach(), dx, dw
    r64 = residual.double().requires_grad_()
    y, total = add_rms_norm_reference(x64, r64, w64, EPS)
    dx, dr, dw = torch.autograd.grad((y, total), (x64, r64, w64),
                                     (dy.double(), dtotal.double()))
    assert torch.equal(dx, dr)
    return y.detach(), total.detach(), dx, dw


def rstd64(total: torch.Tensor) -> torch.Tensor:
    t = total.double().reshape(-1, total.shape[-1])
    return torch.rsqrt(t.pow(2).mean(-1) + EPS)


def nan_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full_like(t, float("nan"), dtype=dtype)


def check_rms_norm_launchers(shape, dtype, device):
    x, _, weight, dy, _ = make_inputs(shape, dtype, device)
    y_ref, dx_ref, dw_ref = float64_reference(x, None, weight, dy, None)
    rows = x.reshape(-1, shape[-1])
    out = nan_like(rows)
    y, total, rstd = kernels.rms_norm_forward(rows, weight, EPS, out=out)
    assert y is out and total is rows
    assert_close(y.view(shape), y_ref, dtype)
    assert_close(rstd, rstd64(x), torch.float32)
    dx = nan_like(rows)
    dx, dw = kernels.rms_norm_backward(dy.reshape(rows.shape), rows, weight, rstd, dx=dx)
    assert dw.dtype == weight.dtype
    assert_close(dx.view(shape), dx_ref, dtype)
    assert_close(dw, dw_ref, dtype)


def check_add_rms_norm_launchers(shape, dtype, device):
    x, residual, weight, dy, dtotal = make_inputs(shape, dtype, device)
    y_ref, total_ref, dx_ref, dw_ref = float64_reference(x, residual, weight, dy, dtotal)
    rows = (x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]))
    out, residual_out = nan_like(rows[0]), nan_like(rows[0])
    y, total, rstd = kernels.rms_norm_forward(rows[0], weight, EPS, residual=rows[1], out=out,
                                          residual_out=residual_out)
    assert y is out and total is residual_out
    assert_close(y.view(shape), y_ref, dtype)
    assert_close(total.view(shape), total_ref, dtype)
    assert_close(rstd, rstd64(total), torch.float32)
    dx, dw = kernels.rms_norm_backward(dy.reshape(rows[0].shape), total, weight, rstd,
                                   dresidual=dtotal.reshape(rows[0].shape), dx=nan_like(total))
    assert_close(dx.view(shape), dx_ref, dtype)
    assert_close(dw, dw_ref, dtype)


def check_autograd(shape, dtype, device, use_total: bool):
    """The differentiable wrappers, including add_rms_norm with its sum output unused."""
    x, residual, weight, dy, dtotal = make_inputs(shape, dtype, device)
    dtotal = dtotal if use_total else torch.zeros_like(dtotal)
    _, _, dx_ref, dw_ref = float64_reference(x, residual, weight, dy, dtotal)
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight)]
    y, total = kernels.add_rms_norm(*leaves, EPS)
    loss = (y * dy).sum() + ((total * dtotal).sum() if use_total else 0)
    loss.backward()
    for leaf, expected in zip(leaves, (dx_ref, dx_ref, dw_ref), strict=True):
        assert_close(leaf.grad, expected, dtype)

    x_leaf, w_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = kernels.rms_norm(x_leaf, w_leaf, EPS)
    y_ref, dx_ref, dw_ref = float64_reference(x, None, weight, dy, None)
    y.backward(dy)
    assert_close(y, y_ref, dtype)
    assert_close(x_leaf.grad, dx_ref, dtype)
    assert_close(w_leaf.grad, dw_ref, dtype)


def check_weight_dtype_promotion():
    x, weight = torch.randn(5, 64, dtype=torch.float16), torch.randn(64)
    y, _, _ = kernels.rms_norm_forward(x, weight, EPS)
    expected = rms_norm_reference(x, weight, EPS)
    assert y.dtype == expected.dtype == torch.float32, (y.dtype, expected.dtype)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SMALL)
def test_rms_norm_interpreted(interpreter, shape, dtype):
    interpreter.run(check_rms_norm_launchers, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SMALL)
def test_add_rms_norm_interpreted(interpreter, shape, dtype):
    interpreter.run(check_add_rms_norm_launchers, shape, dtype, "cpu")


@pytest.mark.parametrize("use_total", [True, False])
def test_autograd_interpreted(interpreter, use_total):
    interpreter.run(check_autograd, SMALL[1], torch.float32, "cpu", use_total)


def test_weight_dtype_promotes_like_the_reference(interpreter):
    interpreter.run(check_weight_dtype_promotion)


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    for op in ("rms_norm", "add_rms_norm"):
        assert registry.select(op, "cuda").backend == "triton"
        assert registry.select(op, "cpu").backend == "torch"
        with registry.force_torch():
            assert registry.select(op, "cuda").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", LARGE)
def test_rms_norm_gpu(shape, dtype):
    check_rms_norm_launchers(shape, dtype, "cuda")
    check_add_rms_norm_launchers(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("use_total", [True, False])
def test_autograd_gpu(use_total):
    check_autograd(LARGE[1], torch.bfloat16, "cuda", use_total)
