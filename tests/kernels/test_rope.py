"""Rotary-embedding kernel against a float64 reference (values and gradients).

Interpreter tests run the checks in the Triton-interpreter child process (see conftest.py)
at small shapes on CPU; `gpu` tests run them compiled at model sizes. Outputs are poisoned
with NaN before each launch, so an element never written fails.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.kernels import rope as kernels
from tessera.kernels.rope import rope_reference
from tessera.model.rope import inverse_frequencies, rope_cos_sin

# (batch, tokens, q heads, kv heads, head dim, cos/sin layout)
SMALL = [(2, 5, 4, 2, 16, "bt"), (1, 7, 3, 1, 10, "t"), (3, 4, 9, 3, 64, "1t")]
LARGE = [(4, 2048, 32, 8, 128, "t"), (1, 301, 9, 3, 64, "1t"), (2, 333, 16, 8, 128, "bt")]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(shape, dtype, device):
    batch, seq, hq, hk, d, layout = shape
    q = torch.randn(batch, seq, hq, d, device=device).to(dtype)
    # k as a strided view (every other head of a wider tensor), as a fused QKV would give
    k = torch.randn(batch, seq, 2 * hk, d, device=device).to(dtype)[:, :, ::2]
    positions = torch.randint(0, 4096, (batch, seq), device=device)
    if layout != "bt":
        positions = positions[:1]
    cos, sin = rope_cos_sin(positions, inverse_frequencies(d, 10000.0), dtype)
    if layout == "t":
        cos, sin = cos[0], sin[0]
    return q, k, cos, sin


def float64_reference(q, k, cos, sin, dq, dk):
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    qo, ko = rope_reference(q64, k64, cos.double(), sin.double())
    gq, gk = torch.autograd.grad((qo, ko), (q64, k64), (dq.double(), dk.double()))
    return qo.detach(), ko.detach(), gq, gk


def assert_close(actual, expected, dtype):
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def check_forward(shape, dtype, device):
    q, k, cos, sin = make_inputs(shape, dtype, device)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qo_ref, ko_ref, _, _ = float64_reference(q, k, cos, sin, dq, dk)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full(k.shape, float("nan"),
                                                                 dtype=dtype, device=device)
    got = kernels.rope_forward(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert got[0] is q_out and got[1] is k_out
    assert_close(q_out, qo_ref, dtype)
    assert_close(k_out, ko_ref, dtype)


def check_autograd(shape, dtype, device):
    q, k, cos, sin = make_inputs(shape, dtype, device)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qo_ref, ko_ref, gq_ref, gk_ref = float64_reference(q, k, cos, sin, dq, dk)
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = kernels.rope(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    for actual, expected in ((qo, qo_ref), (ko, ko_ref), (q.grad, gq_ref), (k.grad, gk_ref)):
        assert_close(actual, expected, dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("shape", SMALL)
def test_rope_interpreted(interpreter, shape):
    interpreter.run(check_forward, shape, torch.float32, "cpu")


def test_rope_autograd_interpreted(interpreter):
    interpreter.run(check_autograd, SMALL[1], torch.float32, "cpu")


def test_reference_matches_the_model_rotation():
    """The op's reference is the model's own rotation, so swapping backends changes nothing."""
    q, k, cos, sin = make_inputs(SMALL[0], torch.float32, "cpu")
    qo, ko = rope_reference(q, k, cos, sin)
    half = q.shape[-1] // 2
    c, s = cos[..., None, :half], sin[..., None, :half]
    expected = torch.cat((q[..., :half] * c - q[..., half:] * s,
                          q[..., half:] * c + q[..., :half] * s), dim=-1)
    torch.testing.assert_close(qo, expected)
    assert ko.shape == k.shape


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("rope", "cuda").backend == "triton"
    assert registry.select("rope", "cpu").backend == "torch"


# ---------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", LARGE)
def test_rope_gpu(shape, dtype):
    check_forward(shape, dtype, "cuda")
    check_autograd(shape, dtype, "cuda")
