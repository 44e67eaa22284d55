"""SwiGLU activation: `silu(gate) * up`, elementwise, in the inputs' dtype.

Op "swiglu": `swiglu(gate, up) -> y`, a torch reference plus a fused Triton kernel (forward
and backward). The kernel computes in fp32 and rounds where the reference does: `silu(gate)`
to the inputs' dtype, then the product. Its backward recomputes `silu` from the saved inputs
instead of storing it.

The forward also reads row-strided inputs: `gate` and `up` may be column slices of one
`[..., 2F]` tensor (a fused gate/up projection), as long as each is `[rows, F]` with a
contiguous last dim and one row stride (other layouts are copied first); the output is
contiguous. Without gradients nothing is copied; with them the inputs are made contiguous
for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton, use_pdl

_BLOCK = 1024  # elements per program


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, numel, width, stride_g, stride_u, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    if USE_PDL:  # a programmatic dependent launch: every input may be the previous output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row, col = offs // width, offs % width
    g = tl.load(G + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
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


def _check_contiguous(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    _check(name, t, like)
    assert t.is_contiguous(), f"{name} must be contiguous"


def row_stride(t: torch.Tensor) -> int | None:
    """The stride between rows of `t` seen as `[rows, last dim]`, or None when its last dim
    is not contiguous or its leading dims do not collapse into one row index."""
    width = t.shape[-1] if t.dim() else 1
    if t.dim() == 0 or (width > 1 and t.stride(-1) != 1):
        return None
    if t.numel() == 0:
        return width
    try:
        return t.view(-1, width).stride(0)
    except RuntimeError:
        return None


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the forward on `gate` and `up` of one shape and dtype, read in place when
    row-strided (see the module docstring), copied to contiguous otherwise; `out` is
    contiguous."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    stride_g, stride_u = row_stride(gate), row_stride(up)
    if stride_g is None:
        gate, stride_g = gate.contiguous(), gate.shape[-1]
    if stride_u is None:
        up, stride_u = up.contiguous(), up.shape[-1]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    _check_contiguous("out", y, gate)
    numel = gate.numel()
    if numel:
        pdl = use_pdl(gate.device)
        _swiglu_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](
            gate, up, y, numel, gate.shape[-1], stride_g, stride_u, BLOCK=_BLOCK,
            USE_PDL=pdl, launch_pdl=pdl)
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                    dgate: torch.Tensor | None = None, dup: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns `(dgate, dup)` in the inputs' dtype."""
    for name, t in (("dy", dy), ("gate", gate), ("up", up)):
        _check_contiguous(name, t, gate)
    dgate = torch.empty_like(gate) if dgate is None else dgate
    dup = torch.empty_like(up) if dup is None else dup
    _check_contiguous("dgate", dgate, gate)
    _check_contiguous("dup", dup, gate)
    numel = gate.numel()
    if numel:
        _swiglu_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](dy, gate, up, dgate, dup, numel,
                                                         BLOCK=_BLOCK)
    return dgate, dup


# ---------------------------------------------------------------------------- autograd


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if any(ctx.needs_input_grad):  # the backward reads contiguous inputs
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
