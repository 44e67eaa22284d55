"""Matrix products of a few rows (decode steps), without tensor cores, optionally with the
SwiGLU activation or the RMSNorm before them applied to the input on the fly.

Ops:
- "gemv": `gemv(x, weight, bias=None) -> x @ weight.T (+ bias)` for x `[..., K]`, weight
  `[N, K]`, in fp32, fp16 or bf16 (the kernel takes up to `MAX_ROWS` rows).
- "swiglu_gemv": `swiglu_gemv(gate_up, weight, weight_scale=None, quantize_input=False)
  -> swiglu(gate, up) @ W.T`, where `gate_up [..., 2F]` holds the gate in its first F
  columns and up in its last (a fused gate/up projection's output) and W `[N, F]` is
  `weight`, or int8 / e4m3 codes times `weight_scale` (per output channel or per tensor;
  with `quantize_input` the activation rows are first rounded to e4m3, FP8 W8A8): the
  MLP's activation and its down projection in one launch.
- "norm_gemv": `norm_gemv(x, residual, norm_weight, eps, weight, bias=None,
  weight_scale=None, quantize_input=False) -> (rms_norm(x + residual) @ W.T (+ bias),
  x + residual)` (x alone for a None residual), W as for "swiglu_gemv": a pre-norm block's
  residual add, its norm and the projection after them in one launch.

Torch references: `F.linear`; the `swiglu` reference, or the `rms_norm` / `add_rms_norm`
reference, followed by `F.linear` on the dequantised weight (the activation rounded
through e4m3 with `quantize_input`).

Triton kernel: each program owns BLOCK_N output channels for every row; it streams
`[BLOCK_N, BLOCK_K]` weight tiles along their contiguous K, multiplies them elementwise by
the rows' `[BLOCK_M, BLOCK_K]` inputs in fp32 and reduces over K once, after the loop. With
the SwiGLU input it loads the gate and up halves and rounds `silu(gate)` and the product to
the input dtype where the `swiglu` kernel does, so the result equals the two-op path up to
the order of the fp32 sums. With the norm, every program sums the squares of its rows
itself (from the same load where K fits one tile; otherwise in a first pass, the rows read
again from cache) and rounds as the `rms_norm` kernel does; the first program writes the
rows' sum with the residual. At decode sizes a product is bounded by launch latency more
than by bytes (SmolLM2's are 0.7-3.5 MB); this kernel's single pass with no epilogue
kernel, and no norm kernel before it, is what it is for.
Where cuBLAS measured faster (more rows, larger weights: `prefers_gemv`) the op runs
cuBLAS. There is no backward (inference only).

On Hopper and later it is a programmatic dependent launch: it loads its first weight tile
and its scales before waiting for the kernel before it, so that the loads overlap that
kernel's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton, use_pdl
from tessera.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
from tessera.kernels.swiglu import swiglu_reference

MAX_ROWS = 8  # rows per launch; more rows go to cuBLAS (a GEMM's job)
QUANTIZED_MAX_ROWS = 4  # quantized weights: rows the int8 and FP8 ops send here
E4M3_MAX = 448.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # weights dequantised by a scale


def gemv_reference(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def round_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 scales `[M, 1]`) of x `[M, K]`: each row times the reciprocal of
    its scale `max|row| * (1 / 448)` (floored), saturated, rounded to nearest. Products by
    reciprocals, not divisions, so that the kernel rounds alike with one multiply each
    (torch's division by a number is itself such a product on CUDA, a division on CPU)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * (1.0 / E4M3_MAX)
    return (xf * (1.0 / scale)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantized(weight: torch.Tensor, weight_scale: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """W in `dtype`: `weight` itself, or its codes times their scales."""
    if weight_scale is None:
        return weight.to(dtype)
    return (weight.float() * weight_scale.float().reshape(-1, 1)).to(dtype)


def _product_reference(activation: torch.Tensor, weight: torch.Tensor,
                       weight_scale: torch.Tensor | None, quantize_input: bool,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`activation @ W.T (+ bias)` on the dequantised weight, the activation's rows rounded
    through e4m3 first with `quantize_input`."""
    if quantize_input:
        codes, scale = round_rows_e4m3(activation.reshape(-1, activation.shape[-1]))
        activation = (codes.float() * scale).to(activation.dtype).reshape(activation.shape)
    return F.linear(activation, dequantized(weight, weight_scale, activation.dtype), bias)


def swiglu_gemv_reference(gate_up: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor | None = None,
                          quantize_input: bool = False) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return _product_reference(swiglu_reference(gate, up), weight, weight_scale,
                              quantize_input)


def norm_gemv_reference(x: torch.Tensor, residual: torch.Tensor | None,
                        norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        weight_scale: torch.Tensor | None = None,
                        quantize_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        normed, stream = rms_norm_reference(x, norm_weight, eps), x
    else:
        normed, stream = add_rms_norm_reference(x, residual, norm_weight, eps)
    return _product_reference(normed, weight, weight_scale, quantize_input, bias), stream


# ---------------------------------------------------------------------------- kernel


@triton.jit
def _summed_input(x_ptrs, r_ptrs, x_mask, HAS_RESIDUAL: tl.constexpr):
    """An input tile of X, or of X + R rounded to X's dtype (the residual stream)."""
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=x_mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _stream_tile(x_ptrs, r_ptrs, ro_ptrs, x_mask, HAS_RESIDUAL: tl.constexpr):
    """`_summed_input`'s tile; with a residual the first program also stores it at
    `ro_ptrs` (the residual stream after the add)."""
    x = _summed_input(x_ptrs, r_ptrs, x_mask, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        if tl.program_id(0) == 0:
            tl.store(ro_ptrs, x, mask=x_mask)
    return x


@triton.jit
def _rstd(sum_of_squares, K, eps):
    """Each row's `1 / sqrt(mean(x^2) + eps)` from its sum of squares over K."""
    return tl.rsqrt(sum_of_squares / K + eps)


@triton.jit
def _normed(x, g_ptrs, x_mask, rstd):
    """`x * rstd` rounded to x's dtype, times the norm weight at `g_ptrs`, rounded again
    (where the `rms_norm` kernel rounds), in fp32."""
    g = tl.load(g_ptrs, mask=x_mask, other=0.0).to(tl.float32)
    normed = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
    return (normed * g).to(x.dtype).to(tl.float32)


@triton.jit
def _gemv_input(x_ptrs, x_mask, K, r_ptrs, g_ptrs, rstd, SWIGLU_INPUT: tl.constexpr,
                NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One `[BLOCK_M, BLOCK_K]` input tile in fp32: X's; the SwiGLU of its halves; or the
    RMSNorm of X (+ R) with the rows' `rstd` and the norm weight at `g_ptrs`, rounded where
    the `rms_norm` kernel rounds (the normalised row, then its product by the weight)."""
    if NORM_INPUT:
        x = _summed_input(x_ptrs, r_ptrs, x_mask, HAS_RESIDUAL)
        return _normed(x, g_ptrs, x_mask, rstd)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if SWIGLU_INPUT:
        up = tl.load(x_ptrs + K, mask=x_mask, other=0.0)
        gate = x.to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(x.dtype).to(tl.float32)
        x = (silu * up.to(tl.float32)).to(up.dtype)
    return x.to(tl.float32)


@triton.jit
def _norm_rstd(x_ptrs, r_ptrs, ro_ptrs, mask_m, K, eps, HAS_RESIDUAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each row's `1 / sqrt(mean((X + R)^2) + eps)` over all of K. The first program also
    writes the rounded sum X + R (the residual stream after the add) at `ro_ptrs`."""
    offs_k = tl.arange(0, BLOCK_K)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (k0 + offs_k < K)[None, :]
        xf = _stream_tile(x_ptrs + k0, r_ptrs + k0, ro_ptrs + k0, mask,
                          HAS_RESIDUAL).to(tl.float32)
        squares += xf * xf
    return _rstd(tl.sum(squares, axis=1), K, eps)


@triton.jit
def _whole_rows_input(x_ptrs, x_mask, K, r_ptrs, ro_ptrs, g_ptrs, eps,
                      SWIGLU_INPUT: tl.constexpr, NORM_INPUT: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The input rows whole (K fits one tile) in fp32, as `_gemv_input` makes them; with
    the norm, the rows' squares are summed from that same load (no second pass over K) and
    the first program writes X + R at `ro_ptrs`."""
    if NORM_INPUT:
        x = _stream_tile(x_ptrs, r_ptrs, ro_ptrs, x_mask, HAS_RESIDUAL)
        xf = x.to(tl.float32)
        return _normed(x, g_ptrs, x_mask, _rstd(tl.sum(xf * xf, axis=1), K, eps))
    no_rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return _gemv_input(x_ptrs, x_mask, K, r_ptrs, g_ptrs, no_rstd, SWIGLU_INPUT, False, False)


@triton.jit
def _e4m3_to_f32(codes):
    """e4m3fn codes (not NaN) as fp32, by moving their bits into an fp32's: sign to bit 31,
    exponent and mantissa to bits 20-26, then times 2^120 (the exponent biases' gap; exact,
    subnormal codes included). Integer and one multiply, not the conversion unit."""
    bits = codes.to(tl.uint8, bitcast=True).to(tl.uint32)
    bits = ((bits & 0x80) << 24) | ((bits & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120


@triton.jit
def _codes_to_f32(w, CODES: tl.constexpr):
    """A weight tile in fp32. CODES 0: float weights; 1: int8, through the float whose
    mantissa holds the code plus 128 (2^23 + 128 + code, exact) less 2^23 + 128; 2: e4m3.
    The conversion unit is a sixteenth of the integer and float units' rate, the bound of
    a decode GEMV over one-byte codes."""
    if CODES == 1:
        biased = w.to(tl.int32) + 0x4B000080  # the bits of 2^23 + 128, plus the code
        return biased.to(tl.float32, bitcast=True) - 8388736.0
    if CODES == 2:
        return _e4m3_to_f32(w)
    return w.to(tl.float32)


@triton.jit
def _e4m3_scale(amax):
    """A row's dynamic e4m3 scale from its largest magnitude, as `round_rows_e4m3`."""
    return tl.maximum(amax, 1e-12) * (1.0 / 448.0)


@triton.jit
def _through_e4m3(x, x_inverse):
    """x times its rows' inverse scales, saturated and rounded to e4m3, back in fp32."""
    return _e4m3_to_f32(tl.clamp(x * x_inverse, -448.0, 448.0).to(tl.float8e4nv))


@triton.jit
def _row_scales(x_ptrs, mask_m, K, r_ptrs, g_ptrs, rstd, SWIGLU_INPUT: tl.constexpr,
                NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Each row's dynamic e4m3 scale `max|in(x)_row| / 448` (floored), over all of K."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _gemv_input(x_ptrs + k0, mask_m[:, None] & (k0 + offs_k < K)[None, :], K,
                        r_ptrs + k0, g_ptrs + k0, rstd, SWIGLU_INPUT, NORM_INPUT,
                        HAS_RESIDUAL)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    return _e4m3_scale(amax)


@triton.jit
def _gemv_kernel(X, W, S, B, OUT, R, G, RO, M, N, K, stride_xm, stride_wn, stride_om,
                 stride_rm, stride_rom, eps, HAS_BIAS: tl.constexpr,
                 SWIGLU_INPUT: tl.constexpr, NORM_INPUT: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, SCALE: tl.constexpr, CODES: tl.constexpr,
                 QUANTIZE_X: tl.constexpr, USE_PDL: tl.constexpr, WHOLE_ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[m, n] = sum_k in(X)[m, k] W[n, k] * s_n (+ B[n]); in(X) = X; or silu(X[:, :K]) *
    X[:, K:2K] rounded as the swiglu kernel rounds; or (NORM_INPUT) the RMSNorm of X (+ R)
    with weight G, rounded as the rms_norm kernel rounds, each program normalising the rows
    itself and the first writing X + R to RO. s_n = 1 (SCALE 0), S[n] (SCALE 1, per output
    channel) or S[0] (SCALE 2, per tensor). With QUANTIZE_X each row of in(X) is first
    rounded to e4m3 with its own scale, as `quantize_rows` does (W8A8). CODES says how W's
    elements become fp32 (`_codes_to_f32`). WHOLE_ROWS (K <= BLOCK_K): a single tile, each
    input element loaded once, the norm's sum of squares included.

    The weight tile of the next step is loaded before the input of this one. With USE_PDL
    (a programmatic dependent launch) the first weight tile, the scales and the bias are
    loaded before waiting for the kernel before this one, whose output X is: weights are
    never written by a decode step, so their load overlaps that kernel's tail."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_m = offs_n < N, offs_m < M
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    r_ptrs = R + offs_m.to(tl.int64)[:, None] * stride_rm + offs_k[None, :]
    g_ptrs = G + offs_k[None, :]
    w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    if SCALE == 1:  # weights too: loaded now, not after the product (their latency hidden)
        w_scale = tl.load(S + offs_n, mask=mask_n, other=0.0)
    if SCALE == 2:
        w_scale = tl.load(S)
    if HAS_BIAS:
        bias = tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    ro_ptrs = RO + offs_m.to(tl.int64)[:, None] * stride_rom + offs_k[None, :]
    if WHOLE_ROWS:
        x = _whole_rows_input(x_ptrs, mask_m[:, None] & (offs_k < K)[None, :], K, r_ptrs,
                              ro_ptrs, g_ptrs, eps, SWIGLU_INPUT, NORM_INPUT, HAS_RESIDUAL,
                              BLOCK_M)
        if QUANTIZE_X:
            x_scale = _e4m3_scale(tl.max(tl.abs(x), axis=1))
            x = _through_e4m3(x, tl.div_rn(1.0, x_scale)[:, None])
        out = tl.sum(x[:, None, :] * _codes_to_f32(w, CODES)[None, :, :], axis=2)
    else:
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if NORM_INPUT:
            rstd = _norm_rstd(x_ptrs, r_ptrs, ro_ptrs, mask_m, K, eps, HAS_RESIDUAL, BLOCK_M,
                              BLOCK_K)
        if QUANTIZE_X:
            x_scale = _row_scales(x_ptrs, mask_m, K, r_ptrs, g_ptrs, rstd, SWIGLU_INPUT,
                                  NORM_INPUT, HAS_RESIDUAL, BLOCK_M, BLOCK_K)
            x_inverse = tl.div_rn(1.0, x_scale)[:, None]  # IEEE, as torch's 1 / scale
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _gemv_input(x_ptrs + k0, mask_m[:, None] & (k0 + offs_k < K)[None, :], K,
                            r_ptrs + k0, g_ptrs + k0, rstd, SWIGLU_INPUT, NORM_INPUT,
                            HAS_RESIDUAL)
            if QUANTIZE_X:
                x = _through_e4m3(x, x_inverse)
            w_next = tl.load(w_ptrs + k0 + BLOCK_K,
                             mask=mask_n[:, None] & (k0 + BLOCK_K + offs_k < K)[None, :],
                             other=0.0)
            acc += x[:, None, :] * _codes_to_f32(w, CODES)[None, :, :]
            w = w_next
        out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if QUANTIZE_X:
        out = out * x_scale[:, None]
    if SCALE == 1:
        out = out * w_scale[None, :]
    if SCALE == 2:
        out = out * w_scale
    if HAS_BIAS:
        out += bias[None, :]
    out_ptrs = OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------- launcher


def gemv_tile(n: int, k: int, rows: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). Measured on the H200 in CUDA graphs
    (`benchmarks/bench_gemv.py`, docs/kernels.md): few K steps win, since every step is a
    dependent load; 4 channels a program; 512 of K a step once N >= 3072 (more programs),
    1024 below. K of up to 1024 is taken in one step (each input element loaded once:
    `WHOLE_ROWS`), but for 3 rows or more against N >= 3072 (a `[rows, 4, K]` product per
    step: registers); and one row of K up to 2048 against N >= 2048 with 8 warps (H100,
    Llama-3.2-1B's gate/up 21% faster with int8 codes, 5% in bf16; q/k/v and o within 5%).
    A small fixed tile under the interpreter."""
    if interpreting():
        return 4, 32, 4
    if k <= 1024 and (n < 3072 or rows <= 2):
        return 4, max(16, triton.next_power_of_2(k)), 4
    if rows == 1 and k <= 2048 and n >= 2048:
        return 4, 2048, 8
    return 4, 512 if n >= 3072 else 1024, 4


def prefers_gemv(rows: int, n: int, k: int) -> bool:
    """Whether the GEMV beat cuBLAS at this size on the H200 (same measurement): one row
    against weights of up to 17M elements (Llama-3.2-1B's down projection is 16.8M, its
    fused gate/up 33.6M lost), and up to 4 rows against up to 1.2M (SmolLM2's qkv, o and
    down won, its 1.8M gate/up lost)."""
    return rows == 1 and n * k <= 17 << 20 or rows <= 4 and n * k <= 1_200_000


def _check_weight(x: torch.Tensor, weight: torch.Tensor,
                  weight_scale: torch.Tensor | None) -> int:
    """The kernel's SCALE mode for this weight: 0 (float, x's dtype), 1 (codes with a scale
    per output channel), 2 (codes with one scale)."""
    n = weight.shape[0]
    if weight_scale is None:
        assert weight.dtype == x.dtype, f"weight {weight.dtype}: expected x's {x.dtype}"
        return 0
    assert weight.dtype in CODE_DTYPES, f"weight {weight.dtype}: codes are {CODE_DTYPES}"
    assert weight_scale.dtype == torch.float32 and weight_scale.is_contiguous() and \
        weight_scale.numel() in (1, n), f"weight_scale: fp32 of {n} or 1 elements"
    return 1 if weight_scale.numel() == n and n > 1 else 2


@dataclass(frozen=True)
class NormInput:
    """The RMSNorm a GEMV applies to its input rows first: `norm(x + residual)` with the
    norm's `weight` and `eps` (x alone when `residual` is None), writing the sum to
    `residual_out`."""

    weight: torch.Tensor  # [K], x's dtype
    eps: float
    residual: torch.Tensor | None = None  # [M, K], x's dtype, unit stride on K
    residual_out: torch.Tensor | None = None  # [M, K], written; needed with `residual`


def _check_norm(x: torch.Tensor, norm: NormInput) -> None:
    k = x.shape[1]
    assert norm.weight.shape == (k,) and norm.weight.dtype == x.dtype and \
        norm.weight.is_contiguous(), f"norm weight: expected {x.dtype} ({k},)"
    assert (norm.residual is None) == (norm.residual_out is None), \
        "residual and residual_out go together"
    for name in ("residual", "residual_out"):
        t = getattr(norm, name)
        assert t is None or (t.shape == x.shape and t.dtype == x.dtype and t.stride(1) == 1), \
            f"{name}: expected {x.dtype} {tuple(x.shape)} with unit stride"


def gemv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *, weight_scale: torch.Tensor | None = None, quantize_input: bool = False,
                 swiglu_input: bool = False, norm: NormInput | None = None,
                 out: torch.Tensor | None = None, tile: tuple[int, int, int] | None = None,
                 pdl: bool | None = None) -> torch.Tensor:
    """Launch on 2-D x `[M, K]` (`[M, 2K]` with `swiglu_input`) with unit stride along K.

    weight: x's dtype, or int8 / float8_e4m3fn codes with `weight_scale` (fp32, per output
    channel `[N]` or per tensor `[1]`); `quantize_input` rounds each input row to e4m3
    with a dynamic scale first (FP8 W8A8). With `norm` the input is first normalised (see
    `NormInput`). `tile` = (BLOCK_N, BLOCK_K, num_warps) overrides the default; `pdl`
    (default: `use_pdl`) launches it as a programmatic dependent launch."""
    assert x.dim() == 2 and weight.dim() == 2, "x and weight must be matrices"
    m = x.shape[0]
    n, k = weight.shape
    width = 2 * k if swiglu_input else k
    assert 0 < m <= MAX_ROWS, f"x: {m} rows, expected 1..{MAX_ROWS}"
    assert x.shape[1] == width, f"x: {x.shape[1]} columns, expected {width}"
    assert x.dtype in FLOAT_DTYPES, f"x {x.dtype}: expected one of {FLOAT_DTYPES}"
    assert not (norm and swiglu_input), "one input transform: the norm or the SwiGLU"
    scale_mode = _check_weight(x, weight, weight_scale)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need unit stride on K"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), "bias: expected (N,)"
    assert weight.device == x.device, f"weight is on {weight.device}, x on {x.device}"
    if norm is not None:
        _check_norm(x, norm)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1, \
        f"out: {out.dtype} {tuple(out.shape)}, expected {x.dtype} ({m}, {n}) with unit stride"
    block_n, block_k, num_warps = tile or gemv_tile(n, k, m)
    pdl = use_pdl(x.device) if pdl is None else pdl
    residual = norm.residual if norm is not None and norm.residual is not None else x
    residual_out = norm.residual_out if norm is not None and norm.residual is not None else x
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else out,
        bias if bias is not None else out, out, residual,
        norm.weight if norm is not None else x, residual_out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), residual.stride(0), residual_out.stride(0),
        norm.eps if norm is not None else 0.0, HAS_BIAS=bias is not None,
        SWIGLU_INPUT=swiglu_input, NORM_INPUT=norm is not None,
        HAS_RESIDUAL=norm is not None and norm.residual is not None, SCALE=scale_mode,
        CODES=CODE_DTYPES.index(weight.dtype) + 1 if scale_mode else 0,
        QUANTIZE_X=quantize_input, USE_PDL=pdl, WHOLE_ROWS=k <= block_k,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, launch_pdl=pdl)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def takes_few_row_kernel(rows: int, weight: torch.Tensor, quantized: bool) -> bool:
    """Whether an op call goes to the kernel: up to `QUANTIZED_MAX_ROWS` rows for codes,
    where `prefers_gemv` for float weights, never under autograd."""
    if rows == 0 or torch.is_grad_enabled() and weight.requires_grad:
        return False
    if quantized:
        return rows <= QUANTIZED_MAX_ROWS
    return rows <= MAX_ROWS and prefers_gemv(rows, *weight.shape)


def gemv(x: torch.Tensor, weight: torch.Tensor,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op on x of any leading shape: the kernel where `takes_few_row_kernel`, `F.linear`
    otherwise."""
    if not takes_few_row_kernel(x.numel() // max(1, x.shape[-1]), weight, quantized=False):
        return F.linear(x, weight, bias)
    out = gemv_forward(_rows(x), weight.contiguous(), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def swiglu_gemv(gate_up: torch.Tensor, weight: torch.Tensor,
                weight_scale: torch.Tensor | None = None,
                quantize_input: bool = False) -> torch.Tensor:
    """The fused op on gate_up of any leading shape: the kernel where `takes_few_row_kernel`;
    otherwise the device's "swiglu" op, then `F.linear` (float) or the reference's
    dequantised product (codes: their modules' own ops are what serves more rows)."""
    rows = gate_up.numel() // max(1, gate_up.shape[-1])
    if not takes_few_row_kernel(rows, weight, quantized=weight_scale is not None):
        if weight_scale is not None:
            return swiglu_gemv_reference(gate_up, weight, weight_scale, quantize_input)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(registry.get("swiglu", gate_up.device)(gate, up), weight)
    out = gemv_forward(_rows(gate_up), weight.contiguous(), weight_scale=weight_scale,
                       quantize_input=quantize_input, swiglu_input=True)
    return out.reshape(*gate_up.shape[:-1], weight.shape[0])


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
              weight_scale: torch.Tensor | None = None,
              quantize_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(x + residual) @ W.T (+ bias), x + residual)` on x of any leading shape (x
    alone for the stream when `residual` is None): one kernel launch where
    `takes_few_row_kernel`; otherwise the device's norm op, then the product as
    `swiglu_gemv` computes it."""
    rows = x.numel() // max(1, x.shape[-1])
    if not takes_few_row_kernel(rows, weight, quantized=weight_scale is not None):
        if residual is None:
            normed, stream = registry.get("rms_norm", x.device)(x, norm_weight, eps), x
        else:
            normed, stream = registry.get("add_rms_norm", x.device)(x, residual, norm_weight,
                                                                    eps)
        if weight_scale is None:
            return F.linear(normed, weight, bias), stream
        return _product_reference(normed, weight, weight_scale, quantize_input, bias), stream
    x_rows = _rows(x)
    stream = x if residual is None else torch.empty_like(x_rows)
    norm = NormInput(norm_weight.contiguous(), eps,
                     None if residual is None else _rows(residual),
                     None if residual is None else stream)
    out = gemv_forward(x_rows, weight.contiguous(), bias, weight_scale=weight_scale,
                       quantize_input=quantize_input, norm=norm)
    return out.reshape(*x.shape[:-1], weight.shape[0]), stream.reshape(x.shape)


registry.register("gemv", "torch", gemv_reference, reference=True)
registry.register("swiglu_gemv", "torch", swiglu_gemv_reference, reference=True)
registry.register("norm_gemv", "torch", norm_gemv_reference, reference=True)
if HAS_TRITON:
    registry.register("gemv", "triton", gemv, supports=registry.on_cuda)
    registry.register("swiglu_gemv", "triton", swiglu_gemv, supports=registry.on_cuda)
    registry.register("norm_gemv", "triton", norm_gemv, supports=registry.on_cuda)
