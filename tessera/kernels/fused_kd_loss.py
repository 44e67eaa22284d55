"""Fused LM head + distillation loss: the student's `[N, V]` logits are never whole.

The op "fused_linear_kd_loss" has the signature and result of
`tessera.distill.losses.kd_loss_from_hidden_parts`, its torch reference:

    fused_linear_kd_loss(student_hidden [..., D], student_lm_head_weight [V, D], mask [...],
                         *, teacher_logits [..., V] | teacher_hidden [..., Dt] with
                         teacher_lm_head_weight [V, Dt], loss, temperature, beta, labels,
                         kd_weight, ce_weight, chunk_size, reduction, num_tokens,
                         num_label_tokens, ...) -> LossParts

with the loss `kd_weight * τ² * soft + ce_weight * ce` (each reduced as that module says),
differentiable in the student's hidden states and LM head weight; the teacher is constant.
The kernel covers 'forward_kl', 'reverse_kl' and 'jsd' in float32, bfloat16 and float16;
other losses and float64 go to the reference.

Design: the gradient is computed during the forward pass, one chunk of C tokens at a time
(C <= chunk_size, and small enough that the chunk's student and teacher logits take at most
`LOGITS_BUDGET` bytes together, see `chunk_rows`):

1. cuBLAS: student logits `h_c @ W.T` and teacher logits `[C, V]` in the inputs' dtype
   (exactly the logits the reference sees);
2. Triton, one program per (token, slice of the vocabulary), so that a chunk makes
   thousands of programs: kernel 1 writes each slice's running max and sum of exp of
   `s / τ`, `t / τ` (and `s`, for the CE); kernel 2 combines a token's slices into its
   logsumexps, computes the slice's share of the loss and overwrites the student logits
   with `d loss / d logits` in place. JSD needs kernel 3: its gradient needs a sum over V
   of a term that itself needs both logsumexps. Masked tokens get zero gradient;
3. cuBLAS: `grad_h_c = dlogits @ W` and `grad_W += dlogits.T @ h_c`.

Only one chunk's logits are alive at a time: at N = 8192, V = 128256, D = 2048 in bf16,
768-token chunks take 2 x 188 MiB, next to grad_W (501 MiB) and grad_h (32 MiB).

The loss's scale factors (weights over the token counts, which may be device tensors) are
known before the forward pass, so the gradients come out final; the backward pass only
multiplies them by the incoming gradient. `grad_W` accumulates in W's dtype, as autograd
does over the reference's chunks.

NOTE: the reference clamps each per-token KL at 0 (against rounding), which zeroes that
token's gradient where the clamp acts; here only the loss value is clamped. The two differ
only where the divergence is at rounding level, and so is its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tessera.distill.losses import (
    IGNORE_INDEX,
    LossParts,
    check_options,
    flatten_labels,
    flatten_mask,
    kd_loss_from_hidden_parts,
    loss_spec,
    mean_denominator,
    teacher_chunks,
)
from tessera.errors import ConfigError
from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton

FUSED_LOSSES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}  # kernel's LOSS constexpr
LOGITS_BUDGET = 384 * 2**20  # bytes of student + teacher logits for one chunk
MAX_CHUNK_ROWS = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per loop step, per program's slice of a token's vocabulary, warps per program.
_BLOCK_V, _SLICE_V, _NUM_WARPS = (64, 128, 1) if interpreting() else (2048, 16384, 8)


def fused_linear_kd_loss_reference(student_hidden: torch.Tensor,
                                   student_lm_head_weight: torch.Tensor,
                                   mask: torch.Tensor | None = None,
                                   **options: Any) -> LossParts:
    """The torch path: `kd_loss_from_hidden_parts` itself."""
    return kd_loss_from_hidden_parts(student_hidden, student_lm_head_weight, mask, **options)


# ---------------------------------------------------------------------------- kernels
# Each token's vocabulary is cut into slices of `slice_len`; one program per (token, slice).
# Pass 1 writes each slice's running statistics, the next kernels combine a token's slices.

_NUM_STATS = 8  # per (token, slice): max/sum of exp for s/τ, t/τ and s; Σ e^(a-m) (a-b); s[y]
_NUM_PARTIALS = 4  # per (token, slice): KL (or JSD's KL(p||m)), JSD's KL(q||m), Σ q g, ce


@triton.jit
def _online_logsumexp(m, z, x):
    """Fold a block `x` (-inf where invalid, at least one valid) into a running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _kd_stats_kernel(S, T, MASK, LABELS, STATS, stride_s, stride_t, vocab, slice_len, inv_tau,
                     LOSS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: a slice's running max and sum of exp of a = s/τ, b = t/τ and s, and for
    reverse KL Σ exp(a - max a) (a - b). Masked tokens are skipped (never read later)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if tl.load(MASK + row) == 0:
        return
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, vocab)
    cols = tl.arange(0, BLOCK_V)
    m_a = float("-inf")
    m_b = float("-inf")
    m_s = float("-inf")
    z_a = 0.0
    z_b = 0.0
    z_s = 0.0
    w_ab = 0.0
    for start in range(lo, hi, BLOCK_V):
        valid = start + cols < hi
        s = tl.load(s_row + start + cols, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + start + cols, mask=valid, other=0.0).to(tl.float32)
        a = tl.where(valid, s * inv_tau, float("-inf"))
        b = tl.where(valid, t * inv_tau, float("-inf"))
        if LOSS == 1:
            m_new = tl.maximum(m_a, tl.max(a, axis=0))
            ratio = tl.exp(a - m_new) * ((s - t) * inv_tau)  # exp(-inf) = 0 where invalid
            w_ab = w_ab * tl.exp(m_a - m_new) + tl.sum(ratio, axis=0)
        m_a, z_a = _online_logsumexp(m_a, z_a, a)
        m_b, z_b = _online_logsumexp(m_b, z_b, b)
        if HAS_CE:
            m_s, z_s = _online_logsumexp(m_s, z_s, tl.where(valid, s, float("-inf")))
    out = STATS + (row * tl.num_programs(1) + part) * 8
    tl.store(out, m_a)
    tl.store(out + 1, z_a)
    tl.store(out + 2, m_b)
    tl.store(out + 3, z_b)
    tl.store(out + 4, m_s)
    tl.store(out + 5, z_s)
    tl.store(out + 6, w_ab)
    if HAS_CE:  # the label's logit, read before pass 2 overwrites the logits
        tl.store(out + 7, tl.load(s_row + tl.maximum(tl.load(LABELS + row), 0)).to(tl.float32))


@triton.jit
def _combine(m, z, ok):
    """Logsumexp of a token from its slices' (max, sum), and each slice's rescaling."""
    top = tl.max(tl.where(ok, m, float("-inf")), axis=0)
    scale = tl.where(ok, tl.exp(m - top), 0.0)
    return top + tl.log(tl.sum(z * scale, axis=0)), scale


@triton.jit
def _row_totals(STATS, row, num_parts, LOSS: tl.constexpr, HAS_CE: tl.constexpr,
                PARTS_P2: tl.constexpr):
    """(lse of s/τ, lse of t/τ, lse of s, KL(q || p), s[label]) of a token."""
    offs = tl.arange(0, PARTS_P2)
    ok = offs < num_parts
    base = STATS + (row * num_parts + offs) * 8
    lse_a, scale_a = _combine(tl.load(base, mask=ok, other=0.0),
                              tl.load(base + 1, mask=ok, other=0.0), ok)
    lse_b, _ = _combine(tl.load(base + 2, mask=ok, other=0.0),
                        tl.load(base + 3, mask=ok, other=0.0), ok)
    lse_s = 0.0
    kl_qp = 0.0
    s_label = 0.0
    if LOSS == 1:
        z_a = tl.sum(tl.load(base + 1, mask=ok, other=0.0) * scale_a, axis=0)
        w_ab = tl.sum(tl.load(base + 6, mask=ok, other=0.0) * scale_a, axis=0)
        kl_qp = w_ab / z_a - lse_a + lse_b
    if HAS_CE:
        lse_s, _ = _combine(tl.load(base + 4, mask=ok, other=0.0),
                            tl.load(base + 5, mask=ok, other=0.0), ok)
        s_label = tl.load(STATS + row * num_parts * 8 + 7)
    return lse_a, lse_b, lse_s, kl_qp, s_label


@triton.jit
def _label_of(LABELS, COEFS, row, HAS_CE: tl.constexpr):
    """(label, or -1 for none; the CE's gradient weight for this token)."""
    label = -1
    coef_ce = 0.0
    if HAS_CE:
        label = tl.load(LABELS + row)
        coef_ce = tl.where(label != -100, tl.load(COEFS + 1), 0.0)
        label = tl.where(label != -100, label, -1)
    return label, coef_ce


@triton.jit
def _jsd_terms(log_q, log_p, beta, log_beta, log_1mbeta):
    """log m, and g = d JSD / d q up to a constant, for m = β p + (1 - β) q."""
    x = log_p + log_beta
    y = log_q + log_1mbeta
    top = tl.maximum(x, y)
    log_m = top + tl.log(tl.exp(x - top) + tl.exp(y - top))
    weighted = (1.0 - beta) * tl.exp(log_p - log_m) + beta * tl.exp(log_q - log_m)
    return log_m, beta * (log_q - log_m) - (1.0 - beta) * weighted


@triton.jit
def _ce_grad(s, lse_s, offs, label):
    """d ce / d s: softmax(s) - onehot(label)."""
    return tl.exp(s - lse_s) - tl.where(offs == label, 1.0, 0.0)


@triton.jit
def _kd_loss_grad_kernel(S, T, MASK, LABELS, COEFS, STATS, PARTIALS, stride_s, stride_t,
                         vocab, slice_len, tau, inv_tau, beta, log_beta, log_1mbeta,
                         LOSS: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                         PARTS_P2: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2: a slice's share of the token's loss and, but for JSD, its gradient."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    num_parts = tl.num_programs(1)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, vocab)
    cols = tl.arange(0, BLOCK_V)
    out = PARTIALS + (row * num_parts + part) * 4
    if tl.load(MASK + row) == 0:
        if WRITE_GRAD:
            for start in range(lo, hi, BLOCK_V):
                zeros = tl.zeros([BLOCK_V], dtype=S.dtype.element_ty)
                tl.store(s_row + start + cols, zeros, mask=start + cols < hi)
        for i in range(4):
            tl.store(out + i, 0.0)
        return
    lse_a, lse_b, lse_s, kl_qp, s_label = _row_totals(STATS, row, num_parts, LOSS=LOSS,
                                                      HAS_CE=HAS_CE, PARTS_P2=PARTS_P2)
    label, coef_ce = _label_of(LABELS, COEFS, row, HAS_CE=HAS_CE)
    coef_soft = tl.load(COEFS) * tau  # d(τ² soft) / d s = τ d soft / d (s / τ)
    acc_1 = tl.zeros([BLOCK_V], dtype=tl.float32)  # KL, or JSD's KL(p || m)
    acc_2 = tl.zeros([BLOCK_V], dtype=tl.float32)  # JSD's KL(q || m)
    acc_g = tl.zeros([BLOCK_V], dtype=tl.float32)  # JSD's Σ q g
    for start in range(lo, hi, BLOCK_V):
        offs = start + cols
        valid = offs < hi
        s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32)
        log_q = s * inv_tau - lse_a
        log_p = t * inv_tau - lse_b
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if LOSS == 0:
            acc_1 += tl.where(valid & (p > 0), p * (log_p - log_q), 0.0)
            grad = q - p
        elif LOSS == 1:
            acc_1 += tl.where(valid & (q > 0), q * (log_q - log_p), 0.0)
            grad = q * (log_q - log_p - kl_qp)
        else:
            log_m, g = _jsd_terms(log_q, log_p, beta, log_beta, log_1mbeta)
            acc_1 += tl.where(valid & (p > 0), p * (log_p - log_m), 0.0)
            acc_2 += tl.where(valid & (q > 0), q * (log_q - log_m), 0.0)
            acc_g += tl.where(valid, q * g, 0.0)
        if WRITE_GRAD and LOSS != 2:
            grad = coef_soft * grad
            if HAS_CE:
                grad += coef_ce * _ce_grad(s, lse_s, offs, label)
            tl.store(s_row + offs, grad.to(S.dtype.element_ty), mask=valid)
    tl.store(out, tl.sum(acc_1, axis=0))
    tl.store(out + 1, tl.sum(acc_2, axis=0))
    tl.store(out + 2, tl.sum(acc_g, axis=0))
    tl.store(out + 3, tl.where((label >= 0) & (part == 0), lse_s - s_label, 0.0))


@triton.jit
def _kd_jsd_grad_kernel(S, T, MASK, LABELS, COEFS, STATS, PARTIALS, stride_s, stride_t, vocab,
                        slice_len, tau, inv_tau, beta, log_beta, log_1mbeta,
                        HAS_CE: tl.constexpr, PARTS_P2: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 3 (JSD): d JSD / d a = q (g - Σ q g), with Σ q g summed over the slices."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    num_parts = tl.num_programs(1)
    if tl.load(MASK + row) == 0:
        return  # zeroed by pass 2
    lse_a, lse_b, lse_s, _kl, _s_label = _row_totals(STATS, row, num_parts, LOSS=2,
                                                     HAS_CE=HAS_CE, PARTS_P2=PARTS_P2)
    label, coef_ce = _label_of(LABELS, COEFS, row, HAS_CE=HAS_CE)
    coef_soft = tl.load(COEFS) * tau
    offs_p = tl.arange(0, PARTS_P2)
    g_mean = tl.sum(tl.load(PARTIALS + (row * num_parts + offs_p) * 4 + 2,
                            mask=offs_p < num_parts, other=0.0), axis=0)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, vocab)
    cols = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        offs = start + cols
        valid = offs < hi
        s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32)
        log_q = s * inv_tau - lse_a
        _log_m, g = _jsd_terms(log_q, t * inv_tau - lse_b, beta, log_beta, log_1mbeta)
        grad = coef_soft * tl.exp(log_q) * (g - g_mean)
        if HAS_CE:
            grad += coef_ce * _ce_grad(s, lse_s, offs, label)
        tl.store(s_row + offs, grad.to(S.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------- launchers


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    assert t.dim() == 2 and t.shape == like.shape, f"{name}: {tuple(t.shape)}, " \
        f"expected {tuple(like.shape)}"
    assert t.stride(1) == 1 and t.device == like.device, f"{name}: layout or device"
    assert t.dtype in _DTYPES, f"{name}: dtype {t.dtype}, expected one of {_DTYPES}"


def _row_loss(partials: torch.Tensor, loss: str, beta: float, out: torch.Tensor) -> None:
    """Per-token (soft, ce) from the slices' partial sums; each KL clamped at 0 against
    rounding, as the reference does."""
    sums = partials.sum(1)  # [n, 4]
    soft = sums[:, 0].clamp_min(0.0)
    if loss == "jsd":
        soft = (1 - beta) * soft + beta * sums[:, 1].clamp_min(0.0)
    torch.stack([soft, sums[:, 3]], dim=1, out=out)


def kd_rows_(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             labels: torch.Tensor | None, coefs: torch.Tensor, *, loss: str,
             temperature: float, beta: float = 0.5, write_grad: bool = True,
             row_loss: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses of a chunk; with `write_grad`, in place, `student_logits [n, V]`
    becomes `d (coefs[0] * τ² * Σ soft + coefs[1] * Σ ce) / d logits` (zero on masked rows).
    Returns `row_loss [n, 2]` fp32: (soft, not yet times τ²; ce) per token.

    mask: bool `[n]`; labels: int64 `[n]` (IGNORE_INDEX: none) or None for no CE; coefs:
    fp32 `[2]` on the device (may depend on device-side token counts: no sync).
    """
    _check_rows("student_logits", student_logits, student_logits)
    _check_rows("teacher_logits", teacher_logits, student_logits)
    num_rows, vocab = student_logits.shape
    assert mask.shape == (num_rows,) and mask.dtype == torch.bool and mask.is_contiguous()
    assert labels is None or (labels.shape == (num_rows,) and labels.dtype == torch.int64
                              and labels.is_contiguous())
    assert coefs.shape == (2,) and coefs.dtype == torch.float32 and coefs.is_contiguous()
    assert 0.0 < beta < 1.0 or loss != "jsd", "jsd with beta 0 or 1 is a KL: pass that loss"
    device = student_logits.device
    row_loss = torch.empty(num_rows, 2, dtype=torch.float32, device=device) \
        if row_loss is None else row_loss
    assert row_loss.shape == (num_rows, 2) and row_loss.is_contiguous(), "row_loss: [n, 2]"
    if num_rows == 0:
        return row_loss
    num_parts = triton.cdiv(vocab, _SLICE_V)
    stats = torch.empty(num_rows, num_parts, _NUM_STATS, dtype=torch.float32, device=device)
    partials = torch.empty(num_rows, num_parts, _NUM_PARTIALS, dtype=torch.float32,
                           device=device)
    grid = (num_rows, num_parts)
    common = (student_logits, teacher_logits, mask, labels if labels is not None else mask)
    strides = (student_logits.stride(0), teacher_logits.stride(0), vocab, _SLICE_V)
    flags = dict(HAS_CE=labels is not None, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS)
    loss_id = FUSED_LOSSES[loss]
    _kd_stats_kernel[grid](*common, stats, *strides, 1.0 / temperature, LOSS=loss_id, **flags)
    jsd_args = (temperature, 1.0 / temperature, beta, *_log_weights(loss, beta))
    flags["PARTS_P2"] = max(2, triton.next_power_of_2(num_parts))
    _kd_loss_grad_kernel[grid](*common, coefs, stats, partials, *strides, *jsd_args,
                               LOSS=loss_id, WRITE_GRAD=write_grad, **flags)
    if write_grad and loss == "jsd":
        _kd_jsd_grad_kernel[grid](*common, coefs, stats, partials, *strides, *jsd_args,
                                  **flags)
    _row_loss(partials, loss, beta, row_loss)
    return row_loss


def _log_weights(loss: str, beta: float) -> tuple[float, float]:
    """(log β, log(1 - β)) for JSD's mixture; unused otherwise."""
    return (math.log(beta), math.log1p(-beta)) if loss == "jsd" else (0.0, 0.0)


def chunk_rows(num_tokens: int, vocab: int, itemsize: int, chunk_size: int,
               num_buffers: int = 2) -> int:
    """Tokens per chunk: at most `chunk_size` and MAX_CHUNK_ROWS, and few enough that
    `num_buffers` `[C, V]` logit buffers fit in LOGITS_BUDGET (a multiple of 64 above 64)."""
    fit = LOGITS_BUDGET // (num_buffers * vocab * itemsize)
    rows = max(64, fit // 64 * 64)
    return max(1, min(num_tokens, chunk_size, MAX_CHUNK_ROWS, rows))


# ---------------------------------------------------------------------------- autograd


def _chunked_forward(h: torch.Tensor, weight: torch.Tensor,
                     teacher: Callable[[int, int], torch.Tensor], mask: torch.Tensor,
                     labels: torch.Tensor | None, coefs: torch.Tensor, options: dict,
                     grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> torch.Tensor:
    """Row losses `[N, 2]`; fills `grad_h` and `grad_w` (when given) chunk by chunk."""
    num_tokens, vocab = h.shape[0], weight.shape[0]
    size = chunk_rows(num_tokens, vocab, h.element_size(), options["chunk_size"],
                      num_buffers=options["teacher_buffers"] + 1)
    row_loss = torch.empty(num_tokens, 2, dtype=torch.float32, device=h.device)
    write_grad = grad_h is not None or grad_w is not None
    for start in range(0, num_tokens, size):
        end = min(start + size, num_tokens)
        h_c = h[start:end]
        s = h_c @ weight.t()  # [C, V]; becomes d loss / d logits in place
        t = teacher(start, end)
        t = t if t.stride(1) == 1 else t.contiguous()
        kd_rows_(s, t, mask[start:end], None if labels is None else labels[start:end], coefs,
                 loss=options["loss"], temperature=options["temperature"],
                 beta=options["beta"], write_grad=write_grad, row_loss=row_loss[start:end])
        del t  # free the teacher's chunk before the next one is computed
        if grad_h is not None:
            torch.mm(s, weight, out=grad_h[start:end])
        if grad_w is not None:
            if start == 0:
                torch.mm(s.t(), h_c, out=grad_w)
            else:
                grad_w.addmm_(s.t(), h_c)
        del s
    return row_loss


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, teacher, mask, labels, weights, options):
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        tau = options["temperature"]
        with torch.autocast(h.device.type, enabled=False):
            row_loss = _chunked_forward(h, weight, teacher, mask, labels, weights, options,
                                        grad_h, grad_w)
        soft, ce = row_loss.sum(0).unbind()
        sums = torch.stack([soft * (tau * tau), ce])  # no host-to-device copy: no sync
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(sums)
        return (weights * sums).sum(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        # NOTE: scales the saved gradients in place (no second copy of grad_W); a second
        # backward through the same graph fails autograd's version check, as it should.
        grad_h, grad_w = ctx.saved_tensors
        grads = [None if g is None else g.mul_(grad_loss) for g in (grad_h, grad_w)]
        return *grads, None, None, None, None, None


# ---------------------------------------------------------------------------- the op


def _compute_dtype(h: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype where it is on (the reference's matmuls run in it), else None."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in autocast's dtype where autocast would cast it (floating point), else as is."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _loss_weights(mask: torch.Tensor, labels: torch.Tensor | None, use_ce: bool,
                  options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """(weights [2] fp32 so that loss = weights · sums, count, label count, denominators)."""
    count = mask.sum()
    label_count = (mask & (labels != IGNORE_INDEX)).sum() if labels is not None else count * 0
    one = torch.ones((), device=mask.device)
    denominators = (one, one)
    if options["reduction"] == "mean":
        denominators = (mean_denominator(options["num_tokens"], count),
                        mean_denominator(options["num_label_tokens"], label_count))
    ce_weight = options["ce_weight"] if use_ce else 0.0
    weights = torch.stack([options["kd_weight"] / denominators[0],
                           ce_weight / denominators[1]]).float()
    return weights, count, label_count, denominators


def fused_linear_kd_loss_parts(
    student_hidden: torch.Tensor, student_lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None, *, teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None, loss: str = "forward_kl",
    temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
    labels: torch.Tensor | None = None, kd_weight: float = 1.0, ce_weight: float = 0.0,
    chunk_size: int = 4096, reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
    num_label_tokens: int | torch.Tensor | None = None,
) -> LossParts:
    """The op (see the module docstring): `kd_loss_from_hidden_parts`, fused."""
    options = dict(teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
                   teacher_lm_head_weight=teacher_lm_head_weight, loss=loss,
                   temperature=temperature, beta=beta, alpha=alpha, labels=labels,
                   kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=chunk_size,
                   reduction=reduction, num_tokens=num_tokens,
                   num_label_tokens=num_label_tokens)
    dtype = _compute_dtype(student_hidden)
    if loss == "jsd" and beta in (0.0, 1.0):  # JSD_0 is forward KL, JSD_1 reverse KL, exactly
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    in_dtype = dtype or student_hidden.dtype
    if loss not in FUSED_LOSSES or in_dtype not in _DTYPES or student_hidden.numel() == 0:
        return kd_loss_from_hidden_parts(student_hidden, student_lm_head_weight, mask,
                                         **options)
    check_options(loss=loss, temperature=temperature, beta=beta, alpha=alpha,
                  kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=chunk_size,
                  reduction=reduction)
    return _fused_parts(student_hidden, student_lm_head_weight, mask, dtype,
                        options | {"loss": loss})


def _fused_parts(student_hidden: torch.Tensor, weight: torch.Tensor,
                 mask: torch.Tensor | None, dtype: torch.dtype | None,
                 options: dict) -> LossParts:
    dim, lead = student_hidden.shape[-1], student_hidden.shape[:-1]
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ConfigError(f"student lm_head weight {tuple(weight.shape)} does not map "
                          f"hidden size {dim} to a vocabulary ([V, {dim}])")
    teacher_hidden, teacher_weight = options["teacher_hidden"], options["teacher_lm_head_weight"]
    if teacher_hidden is not None and teacher_weight is not None:
        teacher_hidden, teacher_weight = _cast(teacher_hidden, dtype), _cast(teacher_weight, dtype)
    teacher = teacher_chunks(options["teacher_logits"], teacher_hidden, teacher_weight, lead,
                             weight.shape[0])  # also checks the teacher's shapes
    h = _cast(student_hidden, dtype).reshape(-1, dim)
    h = h if h.is_contiguous() else h.contiguous()
    m = flatten_mask(mask, lead, h.device).contiguous()
    y = flatten_labels(options["labels"], lead)
    spec = loss_spec(options["loss"], options["temperature"], options["beta"],
                     options["alpha"], y, options["ce_weight"])
    y = y.contiguous() if spec.use_ce else None
    weights, count, label_count, denominators = _loss_weights(m, y, spec.use_ce, options)
    kernel_options = {k: options[k] for k in ("loss", "temperature", "beta", "chunk_size")}
    kernel_options["teacher_buffers"] = 0 if options["teacher_logits"] is not None else 1
    weight = _cast(weight, dtype)
    if not torch.is_grad_enabled():  # the Function would compute gradients regardless
        h, weight = h.detach(), weight.detach()
    loss, sums = _FusedLinearKD.apply(h, weight, teacher, m, y, weights, kernel_options)
    return LossParts(loss=loss, soft=(sums[0] / denominators[0]).detach(),
                     ce=(sums[1] / denominators[1]).detach(), num_tokens=count,
                     num_label_tokens=label_count)


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_lm_head_weight: torch.Tensor,
                         mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """Scalar loss of `fused_linear_kd_loss_parts` (as `kd_loss_from_hidden` is to its
    parts)."""
    return fused_linear_kd_loss_parts(student_hidden, student_lm_head_weight, mask,
                                      **options).loss


registry.register("fused_linear_kd_loss", "torch", fused_linear_kd_loss_reference,
                  reference=True)
if HAS_TRITON:
    registry.register("fused_linear_kd_loss", "triton", fused_linear_kd_loss_parts,
                      supports=registry.on_cuda)
