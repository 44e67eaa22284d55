"""SwiGLU kernel against a float64 reference.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small shapes on CPU; `gpu` tests run them here, compiled, at full size.
Outputs are poisoned with NaN before each launch, so an element never written fails.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.kernels import swiglu as kernels
from tessera.kernels.swiglu import swiglu_reference

SMALL = [(4, 256), (3, 7, 333)]  # a multiple of the block, and an odd size spanning blocks
LARGE = [(8, 2048, 5632), (3, 1001, 1376)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(shape, dtype, device):
    gate, up, dy = (3 * torch.randn(shape, device=device) for _ in range(3))
    return gate.to(dtype), up.to(dtype), dy.to(dtype)


def float64_reference(gate, up, dy):
    gate64, up64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y = swiglu_reference(gate64, up64)
    dgate, dup = torch.autograd.grad(y, (gate64, up64), dy.double())
    return y.detach(), dgate, dup


def check_launchers(shape, dtype, device):
    gate, up, dy = make_inputs(shape, dtype, device)
    y_ref, dgate_ref, dup_ref = float64_reference(gate, up, dy)
    nan = float("nan")
    out = torch.full_like(gate, nan)
    assert kernels.swiglu_forward(gate, up, out=out) is out
    assert_close(out, y_ref, dtype)
    dgate, dup = kernels.swiglu_backward(dy, gate, up, dgate=torch.full_like(gate, nan),
                                         dup=torch.full_like(up, nan))
    assert_close(dgate, dgate_ref, dtype)
    assert_close(dup, dup_ref, dtype)


def check_strided_halves(shape, dtype, device):
    """gate and up as the two column halves of one `[..., 2F]` tensor (a fused gate/up
    projection), and an `up` with padded rows: read in place, output contiguous."""
    both = (3 * torch.randn(*shape[:-1], 2 * shape[-1], device=device)).to(dtype)
    gate, up = both.split(shape[-1], dim=-1)
    if gate.numel() > shape[-1]:  # one row is contiguous whatever its stride
        assert not gate.is_contiguous() and kernels.row_stride(gate) == 2 * shape[-1]
    expected = swiglu_reference(gate.double(), up.double())
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    assert kernels.swiglu_forward(gate, up, out=out) is out
    assert_close(out, expected, dtype)
    padded = torch.randn(*shape[:-1], shape[-1] + 5, device=device).to(dtype)[..., :shape[-1]]
    y = kernels.swiglu(gate, padded)  # no grad: in place
    assert y.is_contiguous()
    assert_close(y, swiglu_reference(gate.double(), padded.double()), dtype)


def check_autograd(shape, dtype, device):
    gate, up, dy = make_inputs(shape, dtype, device)
    y_ref, dgate_ref, dup_ref = float64_reference(gate, up, dy)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    y = kernels.swiglu(gate, up)
    y.backward(dy)
    assert_close(y, y_ref, dtype)
    assert_close(gate.grad, dgate_ref, dtype)
    assert_close(up.grad, dup_ref, dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SMALL)
def test_swiglu_interpreted(interpreter, shape, dtype):
    interpreter.run(check_launchers, shape, dtype, "cpu")


@pytest.mark.parametrize("shape", SMALL)
def test_strided_halves_interpreted(interpreter, shape):
    interpreter.run(check_strided_halves, shape, torch.float32, "cpu")


def test_row_stride_sees_which_views_collapse():
    base = torch.zeros(3, 5, 16)
    assert kernels.row_stride(base) == 16
    assert kernels.row_stride(base[..., :8]) == 16
    assert kernels.row_stride(base[:, :, 8:]) == 16
    assert kernels.row_stride(base[:, :4, :8]) is None  # rows of two different strides
    assert kernels.row_stride(base.transpose(1, 2)) is None  # last dim not contiguous
    assert kernels.row_stride(base[:1, :1, :8]) is not None


def test_autograd_interpreted(interpreter):
    interpreter.run(check_autograd, SMALL[1], torch.float32, "cpu")


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("swiglu", "cuda").backend == "triton"
    assert registry.select("swiglu", "cpu").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", LARGE)
def test_swiglu_gpu(shape, dtype):
    check_launchers(shape, dtype, "cuda")


@pytest.mark.gpu
def test_autograd_gpu():
    check_autograd(LARGE[1], torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 5632), (16, 1, 1536), (3, 1001, 1376)])
def test_strided_halves_gpu(shape):
    check_strided_halves(shape, torch.bfloat16, "cuda")
