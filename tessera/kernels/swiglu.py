"""SwiGLU activation: `silu(gate) * up`, elementwise, in the inputs' dtype.

Op "swiglu": `swiglu(gate, up) -> y`, a torch reference plus a fused Triton kernel (forward
and backward). The kernel computes in fp32 and rounds where the reference does: `silu(gate)`
to the inputs' dtype, then the product. Its backward recomputes `silu` from the saved inputs
instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton

_BLOCK = 1024  # elements per program


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / d g = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    assert t.shape == like.shape, f"{name}: shape {tuple(t.shape)}, expected {tuple(like.shape)}"
    assert t.dtype == like.dtype, f"{name}: dtype {t.dtype}, expected {like.dtype}"
    assert t.device == like.device, f"{name}: on {t.device}, expected {like.device}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the forward on contiguous `gate` and `up` of one shape and dtype."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    y = torch.empty_like(gate) if out is None else out
    _check("out", y, gate)
    numel = gate.numel()
    if numel:
        _swiglu_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](gate, up, y, numel, BLOCK=_BLOCK)
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                    dgate: torch.Tensor | None = None, dup: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns `(dgate, dup)` in the inputs' dtype."""
    for name, t in (("dy", dy), ("gate", gate), ("up", up)):
        _check(name, t, gate)
    dgate = torch.empty_like(gate) if dgate is None else dgate
    dup = torch.empty_like(up) if dup is None else dup
    _check("dgate", dgate, gate)
    _check("dup", dup, gate)
    numel = gate.numel()
    if numel:
        _swiglu_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](dy, gate, up, dgate, dup, numel,
                                                         BLOCK=_BLOCK)
    return dgate, dup


# ---------------------------------------------------------------------------- autograd


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused `silu(gate) * up` for `gate` and `up` of one shape and dtype."""
    return _SwiGLU.apply(gate, up)


registry.register("swiglu", "torch", swiglu_reference, reference=True)
if HAS_TRITON:
    registry.register("swiglu", "triton", swiglu, supports=registry.on_cuda)
