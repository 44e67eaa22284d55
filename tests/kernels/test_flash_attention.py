"""Flash attention forward and backward against the attention reference in float64.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small fp32 shapes on CPU; `gpu` tests run them here, compiled, in bf16 and
fp16 at larger shapes. Every output (out, the logsumexp, dq, dk, dv) is poisoned with NaN
before its launch, so an element never written fails the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tessera.kernels import flash_attention as kernels
from tessera.kernels import registry
from tessera.model.attention import attention_reference, causal_mask, segment_ids

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    batch: int
    num_q: int
    num_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    q_offset: int = 0
    doc_lengths: tuple[int, ...] = ()  # packed documents (cu_seqlens) when not empty


def varlen(doc_lengths, heads, kv_heads, head_dim, causal) -> Case:
    total = sum(doc_lengths)
    return Case(1, total, total, heads, kv_heads, head_dim, causal, doc_lengths=doc_lengths)


# Small enough for the interpreter; the interpreter's tiles are 16 and 32 wide, so 37 and
# the document lengths leave ragged blocks.
SMALL = {
    "causal-gqa": Case(2, 37, 37, 4, 2, 32, True),
    "noncausal-gqa": Case(2, 37, 37, 4, 2, 32, False),
    "causal-mqa": Case(1, 37, 37, 4, 1, 16, True),
    "causal-mha-pow2": Case(1, 64, 64, 2, 2, 64, True),
    "causal-d128": Case(1, 21, 21, 2, 1, 128, True),
    "noncausal-cross-lengths": Case(1, 19, 45, 2, 2, 64, False),
    "decode-like": Case(1, 3, 29, 4, 2, 32, True, q_offset=26),
    "prefix-continuation": Case(2, 7, 29, 4, 2, 32, True, q_offset=11),
    "varlen-causal": varlen((13, 5, 23), 4, 2, 32, True),
    "varlen-noncausal": varlen((13, 5, 23), 4, 2, 32, False),
}
LARGE = {
    "causal-gqa-d128": Case(2, 1024, 1024, 8, 2, 128, True),
    "noncausal-odd-d64": Case(2, 333, 333, 4, 4, 64, False),
    "causal-mqa-odd": Case(1, 777, 777, 8, 1, 64, True),
    "decode": Case(4, 1, 1000, 8, 2, 128, True, q_offset=999),
    "prefix-continuation": Case(2, 100, 612, 8, 2, 128, True, q_offset=512),
    "varlen-causal": varlen((300, 17, 555, 129), 8, 2, 128, True),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(case: Case, dtype, device):
    q = torch.randn(case.batch, case.num_q, case.heads, case.head_dim, device=device)
    k, v = (torch.randn(case.batch, case.num_k, case.kv_heads, case.head_dim, device=device)
            for _ in range(2))
    dout = torch.randn_like(q)
    cu_seqlens = None
    if case.doc_lengths:
        bounds = [0, *torch.tensor(case.doc_lengths).cumsum(0).tolist()]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    return *(t.to(dtype) for t in (q, k, v, dout)), cu_seqlens


def options(case: Case, cu_seqlens) -> dict:
    return dict(causal=case.causal, q_offset=case.q_offset, cu_seqlens=cu_seqlens)


def float64_reference(q, k, v, dout, case: Case, cu_seqlens):
    """(out, natural logsumexp [B, H, Tq], (dq, dk, dv)) in float64."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention_reference(*leaves, **options(case, cu_seqlens))
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), logsumexp_reference(*leaves[:2], case, cu_seqlens), grads


def logsumexp_reference(q, k, case: Case, cu_seqlens) -> torch.Tensor:
    group = case.heads // case.kv_heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q.detach(), k.detach().repeat_interleave(group, 2))
    mask = torch.ones(case.num_q, case.num_k, dtype=torch.bool, device=q.device)
    if case.causal:
        mask &= causal_mask(case.num_q, case.num_k, case.q_offset, q.device)
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, case.num_q)
        mask &= seg[:, None] == seg[None, :]
    scores = scores.masked_fill(~mask, float("-inf")) / math.sqrt(case.head_dim)
    return scores.logsumexp(-1)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def check_launchers(case: Case, dtype, device):
    q, k, v, dout, cu_seqlens = make_inputs(case, dtype, device)
    out_ref, lse_ref, grads_ref = float64_reference(q, k, v, dout, case, cu_seqlens)
    out, lse = nan_like(q), q.new_full((case.batch, case.heads, case.num_q), float("nan"),
                                       dtype=torch.float32)
    returned = kernels.attention_forward(q, k, v, **options(case, cu_seqlens), out=out, lse=lse)
    assert returned[0] is out and returned[1] is lse
    assert_close(out, out_ref, dtype)
    assert_close(lse / math.log2(math.e), lse_ref, torch.float32)
    grads = (nan_like(q), nan_like(k), nan_like(v))
    returned = kernels.attention_backward(dout, q, k, v, out, lse, **options(case, cu_seqlens),
                                          dq=grads[0], dk=grads[1], dv=grads[2])
    assert all(r is g for r, g in zip(returned, grads, strict=True))
    for name, grad, expected in zip("qkv", grads, grads_ref, strict=True):
        try:
            assert_close(grad, expected, dtype)
        except AssertionError as error:
            raise AssertionError(f"d{name}: {error}") from None


def check_autograd(case: Case, dtype, device):
    """The differentiable `flash_attention`, including head dims it pads."""
    q, k, v, dout, cu_seqlens = make_inputs(case, dtype, device)
    out_ref, _, grads_ref = float64_reference(q, k, v, dout, case, cu_seqlens)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attention(*leaves, **options(case, cu_seqlens))
    out.backward(dout)
    assert_close(out, out_ref, dtype)
    for leaf, expected in zip(leaves, grads_ref, strict=True):
        assert_close(leaf.grad, expected, dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("name", SMALL)
def test_flash_attention_interpreted(interpreter, name):
    interpreter.run(check_launchers, SMALL[name], torch.float32, "cpu")


@pytest.mark.parametrize("case", [Case(2, 37, 37, 4, 2, 24, True),  # padded to 32
                                  varlen((11, 20), 2, 1, 8, True)],  # padded to 16
                         ids=["gqa-d24", "varlen-d8"])
def test_autograd_interpreted(interpreter, case):
    interpreter.run(check_autograd, case, torch.float32, "cpu")


def test_head_dim_over_128_is_refused():
    q = torch.randn(1, 4, 2, 256)
    with pytest.raises(ValueError, match="head dims up to 128"):
        kernels.flash_attention(q, q, q, causal=True)


def test_registry_prefers_triton_to_sdpa_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("attention", "cuda").backend == "triton"
    assert registry.select("attention", "cpu").backend != "triton"
    with registry.force_torch():
        assert registry.select("attention", "cuda").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LARGE)
def test_flash_attention_gpu(name, dtype):
    check_launchers(LARGE[name], dtype, "cuda")


@pytest.mark.gpu
def test_autograd_gpu():
    check_autograd(Case(2, 300, 300, 8, 2, 80, True), torch.bfloat16, "cuda")  # pads 80
    assert registry.get("attention", "cuda") is kernels.flash_attention
