"""RMSNorm: `y = x / sqrt(mean(x^2) + eps) * weight`, computed in fp32, returned in x's dtype.

Two ops, each a torch reference plus a fused Triton kernel (forward and backward):

- "rms_norm": `rms_norm(x, weight, eps) -> y`;
- "add_rms_norm": `add_rms_norm(x, residual, weight, eps) -> (y, x + residual)`, the residual
  add of a pre-norm block fused with the norm that follows it. The sum is rounded to x's
  dtype before it is normalised, exactly as `rms_norm(x + residual)` does.

The references match Hugging Face's LlamaRMSNorm exactly (normalise in fp32, cast back to
x's dtype, then scale), so checkpoints reproduce transformers' logits; the kernels round at
the same places. `y` has the dtype of `weight * x` under torch's type promotion.

The Triton kernels normalise one row of the last dim per program; rows up to 65,536 elements
wide. The backward returns dx and dweight; dweight is reduced from fp32 partial sums, one
per program, each over a contiguous range of rows.
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton, use_pdl

MAX_WIDTH = 65536  # widest row one program holds in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, width,
                         eps, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
                         BLOCK: tl.constexpr):
    """With USE_PDL (a programmatic dependent launch), the weight, which no kernel of a
    forward writes, loads before waiting for the kernel before this one."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # issued early: overlaps x
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)
    tl.store(RSTD + row, rstd)
    # Round the normalised row to x's dtype before scaling, as the reference does.
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, DS, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x,
                         stride_dx, num_rows, width, rows_per_program,
                         HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / width))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * width + cols, dw, mask=mask)


# ---------------------------------------------------------------------------- launchers


def _settings(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows `width` elements wide."""
    block = triton.next_power_of_2(width)
    if block > MAX_WIDTH:
        raise ValueError(f"rms_norm kernel handles rows up to {MAX_WIDTH} wide, got {width}")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    assert t.dim() == 2 and t.shape == like.shape, f"{name}: shape {tuple(t.shape)}"
    assert t.stride(1) == 1, f"{name}: last dim must be contiguous, strides {t.stride()}"
    assert t.device == like.device, f"{name}: on {t.device}, expected {like.device}"


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     residual_out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on rows `x [M, N]`; returns `(y, normalised input, rstd [M] fp32)`.

    With `residual`, the normalised input is `x + residual`, written to `residual_out`;
    without, it is `x` itself. `out`/`residual_out` are optional preallocated outputs.
    """
    _check_rows("x", x, x)
    assert weight.shape == (x.shape[1],) and weight.is_contiguous(), "weight must be [N]"
    num_rows, width = x.shape
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device) if out is None else out
    _check_rows("out", y, x)
    assert y.dtype == y_dtype, f"out: dtype {y.dtype}, expected {y_dtype}"
    total = x
    if residual is not None:
        _check_rows("residual", residual, x)
        assert residual.dtype == x.dtype, "residual and x must share a dtype"
        total = torch.empty_like(x) if residual_out is None else residual_out
        _check_rows("residual_out", total, x)
        assert total.dtype == x.dtype, "residual_out must have x's dtype"
    rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return y, total, rstd
    block, num_warps = _settings(width)
    r = x if residual is None else residual
    pdl = use_pdl(x.device)
    _rms_norm_fwd_kernel[(num_rows,)](
        x, r, weight, y, total, rstd, x.stride(0), r.stride(0), y.stride(0), total.stride(0),
        width, eps, HAS_RESIDUAL=residual is not None, USE_PDL=pdl, BLOCK=block,
        num_warps=num_warps, launch_pdl=pdl)
    return y, total, rstd


def _num_programs(device: torch.device, num_rows: int) -> int:
    """Two programs per SM on CUDA (a wide row leaves room for about two per SM); a few
    elsewhere (the interpreter), so that several partial sums are reduced there too."""
    if device.type == "cuda":
        count = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        count = 4
    return max(1, min(num_rows, count))


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, *, dresidual: torch.Tensor | None = None,
                      dx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns `(dx [M, N] in x's dtype, dweight in weight's dtype)`.

    `x` is the normalised input saved by the forward; `dresidual`, the gradient reaching
    the residual output of "add_rms_norm", is added to dx.
    """
    _check_rows("dy", dy, x)
    _check_rows("x", x, x)
    assert rstd.shape == (x.shape[0],) and rstd.dtype == torch.float32, "rstd must be [M] fp32"
    num_rows, width = x.shape
    dx = torch.empty_like(x) if dx is None else dx
    _check_rows("dx", dx, x)
    assert dx.dtype == x.dtype, f"dx: dtype {dx.dtype}, expected {x.dtype}"
    if dresidual is not None:
        _check_rows("dresidual", dresidual, x)
    num_programs = _num_programs(x.device, num_rows)
    partial = torch.empty(num_programs, width, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return dx, torch.zeros_like(weight)
    block, num_warps = _settings(width)
    ds = x if dresidual is None else dresidual
    _rms_norm_bwd_kernel[(num_programs,)](
        dy, ds, x, weight, rstd, dx, partial, dy.stride(0), ds.stride(0), x.stride(0),
        dx.stride(0), num_rows, width, triton.cdiv(num_rows, num_programs),
        HAS_DS=dresidual is not None, BLOCK=block, num_warps=num_warps)
    return dx, partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------- autograd


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t [..., N]` as rows `[M, N]` with a contiguous last dim (a view where possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = rms_norm_forward(_rows(x), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(_rows(dy), _rows(x), weight, rstd)
        return dx.view(x.shape), dweight, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, total, rstd = rms_norm_forward(_rows(x), weight, eps, residual=_rows(residual))
        ctx.save_for_backward(total, weight, rstd)
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return y.view(x.shape), total.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dtotal):
        total, weight, rstd = ctx.saved_tensors
        dy = torch.zeros_like(total) if dy is None else _rows(dy)
        dtotal = None if dtotal is None else _rows(dtotal)
        dx, dweight = rms_norm_backward(dy, total, weight, rstd, dresidual=dtotal)
        dx = dx.view(ctx.shape)
        return dx, dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim of `x [..., N]` with `weight [N]`."""
    return _RMSNorm.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `(rms_norm(x + residual), x + residual)` over the last dim."""
    assert x.shape == residual.shape, f"x {tuple(x.shape)} vs residual {tuple(residual.shape)}"
    return _AddRMSNorm.apply(x, residual, weight, eps)


registry.register("rms_norm", "torch", rms_norm_reference, reference=True)
registry.register("add_rms_norm", "torch", add_rms_norm_reference, reference=True)
if HAS_TRITON:
    registry.register("rms_norm", "triton", rms_norm, supports=registry.on_cuda)
    registry.register("add_rms_norm", "triton", add_rms_norm, supports=registry.on_cuda)
