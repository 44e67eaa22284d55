"""Knowledge-distillation losses on logits, computed chunk by chunk over tokens.

Inputs are student logits and teacher logits `[..., V]` over a shared vocabulary and a mask
`[...]` (bool, or 0/1: tokens where it is zero contribute nothing). Leading dims are
flattened to `N` tokens. With temperature `τ` the soft losses compare

    p = softmax(teacher / τ)   (the target)       q = softmax(student / τ)   (the model)

and are multiplied by `τ²` so that gradient magnitudes do not shrink as `τ` grows. The soft
losses, per token:

- `forward_kl`: KL(p || q) = Σ p (log p - log q)
- `reverse_kl`: KL(q || p)
- `jsd` (generalized Jensen-Shannon, parameter β in [0, 1]):

      m_β   = β p + (1 - β) q
      JSD_β = (1 - β) KL(p || m_β) + β KL(q || m_β)

  At β = 0, m = q and JSD_0 = KL(p || q) (forward KL) exactly; at β = 1, m = p and
  JSD_1 = KL(q || p) (reverse KL) exactly; at β = 1/2 it is the usual symmetric JSD. For
  0 < β < 1 it is zero only where p = q. (The convention with the weights the other way
  round, β KL(p || m) + (1 - β) KL(q || m), degenerates to 0 at both endpoints.)
- `tvd`: total variation distance ½ Σ |p - q|
- `skew_kl` (parameter α in [0, 1)): KL(p || α p + (1 - α) q); α = 0 is forward KL.

An optional hard-label cross-entropy on the student's raw logits (no temperature) is mixed
in: `total = kd_weight * soft + ce_weight * ce`. Labels equal to -100, and masked tokens,
are ignored.

Reduction `'mean'` divides the soft sum by the number of masked tokens and the CE sum by the
number of masked tokens with a label; `num_tokens` / `num_label_tokens` override those
denominators with global counts, so that micro-batches (or ranks) whose losses are summed
reproduce the loss of the whole batch exactly. `'sum'` returns plain sums.

Precision: float16/bfloat16 inputs are upcast to float32; float32 and float64 are kept.
Memory: the `[N, V]` work (the upcast, log-softmax, the divergence) is done on chunks
of `chunk_size` tokens, each under activation checkpointing, so no full `[N, V]` float32
tensor is ever alive, in the forward or the backward pass. `kd_loss_from_hidden` goes one
step further and applies the student's LM head chunk by chunk, so the student's `[N, V]`
logits are never materialised at all; it is the torch reference for a fused kernel.

The teacher is a constant: its logits and hidden states are detached. This module knows
nothing about models, data or optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tessera.errors import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")
REDUCTIONS = ("mean", "sum")
SCHEDULES = ("constant", "linear", "cosine")
HIDDEN_KINDS = ("mse", "cosine")
IGNORE_INDEX = -100
FUSED_AUTO = "auto"  # KDLossConfig.fused: the trainer decides


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class LossSpec:
    """The validated options one chunk needs (built by `loss_spec`); `use_ce` says whether
    the hard-label cross-entropy is computed at all."""

    loss: str
    temperature: float
    beta: float
    alpha: float
    use_ce: bool


def check_options(*, loss: str, temperature: float, beta: float, alpha: float,
                  kd_weight: float, ce_weight: float, chunk_size: int,
                  reduction: str) -> None:
    """Raise `ConfigError` naming the first option of a loss call that is out of range.

    Every entry point of this module (and the fused kernel op) checks its options with it,
    so that all of them refuse the same values with the same message.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown distillation loss {loss!r}; expected one of {LOSSES}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature!r}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"skew_kl alpha must be in [0, 1), got {alpha}")
    for name, weight in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if not (isinstance(weight, (int, float)) and 0 <= weight < math.inf):
            raise ConfigError(f"{name} must be a non-negative number, got {weight!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")


@dataclass(frozen=True, kw_only=True)
class KDLossConfig:
    """Everything that decides the distillation loss of a run; saved with its report.

    `temperature` is the starting temperature; `final_temperature` (default: the same) is
    reached at the last step along `temperature_schedule`. `hidden_weight` > 0 adds
    hidden-state matching (see `tessera.distill.hidden`) over `layer_map`
    (student layer -> teacher layer; 0 = embeddings, i = output of block i).

    `fused` chooses how a trainer computes the logit loss, not what it is: True applies the
    LM heads inside the loss (the kernel op "fused_linear_kd_loss"), False computes it on
    whole logits (`distill_loss`), "auto" lets the trainer pick (see
    `tessera.distill.trainer.uses_fused_loss`). The two differ only by rounding.
    """

    loss: str = "forward_kl"
    temperature: float = 1.0
    final_temperature: float | None = None
    temperature_schedule: str = "constant"
    beta: float = 0.5
    alpha: float = 0.1
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int = 4096
    reduction: str = "mean"
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"
    layer_map: dict[int, int] = field(default_factory=dict)
    fused: bool | str = FUSED_AUTO

    def __post_init__(self) -> None:
        check_options(loss=self.loss, temperature=self.temperature, beta=self.beta,
                      alpha=self.alpha, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                      chunk_size=self.chunk_size, reduction=self.reduction)
        if self.final_temperature is not None:
            check_options(loss=self.loss, temperature=self.final_temperature, beta=0.0,
                          alpha=0.0, kd_weight=0.0, ce_weight=0.0, chunk_size=1,
                          reduction="mean")
        if self.temperature_schedule not in SCHEDULES:
            raise ConfigError(f"unknown temperature_schedule {self.temperature_schedule!r}; "
                              f"expected one of {SCHEDULES}")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ConfigError("kd_weight, ce_weight and hidden_weight are all 0: no loss left")
        if not 0 <= self.hidden_weight < math.inf:
            raise ConfigError(f"hidden_weight must be non-negative, got {self.hidden_weight}")
        if self.hidden_kind not in HIDDEN_KINDS:
            raise ConfigError(f"unknown hidden_kind {self.hidden_kind!r}; "
                              f"expected one of {HIDDEN_KINDS}")
        layer_map = {int(s): int(t) for s, t in self.layer_map.items()}
        if any(s < 0 or t < 0 for s, t in layer_map.items()):
            raise ConfigError(f"layer_map indices must be non-negative, got {self.layer_map}")
        if self.hidden_weight > 0 and not layer_map:
            raise ConfigError("hidden_weight > 0 needs a non-empty layer_map")
        object.__setattr__(self, "layer_map", layer_map)
        if not (isinstance(self.fused, bool) or self.fused == FUSED_AUTO):
            raise ConfigError(f"fused must be true, false or {FUSED_AUTO!r}, got {self.fused!r}")

    def temperature_at(self, step: int, total_steps: int) -> float:
        end = self.temperature if self.final_temperature is None else self.final_temperature
        return temperature_schedule(step, total_steps, start=self.temperature, end=end,
                                    kind=self.temperature_schedule)

    def loss_kwargs(self, step: int = 0, total_steps: int = 1) -> dict[str, Any]:
        """Keyword arguments for `distill_loss` / `kd_loss_from_hidden` at `step`."""
        return {"loss": self.loss, "temperature": self.temperature_at(step, total_steps),
                "beta": self.beta, "alpha": self.alpha, "kd_weight": self.kd_weight,
                "ce_weight": self.ce_weight, "chunk_size": self.chunk_size,
                "reduction": self.reduction}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KDLossConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown KDLossConfig keys: {', '.join(unknown)}")
        return cls(**data)


def temperature_schedule(step: int, total_steps: int, *, start: float, end: float,
                         kind: str = "constant") -> float:
    """Temperature at `step` of `total_steps`: `start` at step 0, `end` from the last step on.

    `constant` ignores `end`; `linear` interpolates; `cosine` follows half a cosine.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown temperature schedule {kind!r}; expected one of {SCHEDULES}")
    if kind == "constant":
        return float(start)
    frac = min(max(step, 0) / max(total_steps - 1, 1), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------- divergences
def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(a || b) from log-probabilities `[n, V]`; terms with a = 0 count 0.

    NOTE: `where` selects the log-ratio, not the product, so that a = 0 next to
    log b = -inf gives 0 and a zero (not NaN) gradient.
    """
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * log_ratio).sum(-1).clamp_min(0.0)  # clamp: rounding can dip below 0


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 - w) q), in log space.

    NOTE: logaddexp(-inf, -inf) has a NaN gradient; entries where both terms are -inf are
    swapped for zeros before it and set back to -inf after it (the "double where").
    """
    log_w = math.log(weight_p) if weight_p > 0 else -math.inf
    log_1mw = math.log1p(-weight_p) if weight_p < 1 else -math.inf
    a, b = log_p + log_w, log_q + log_1mw
    empty = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros_like(a)
    mixed = torch.logaddexp(torch.where(empty, zero, a), torch.where(empty, zero, b))
    return torch.where(empty, torch.full_like(a, -math.inf), mixed)


def soft_loss_rows(log_q: torch.Tensor, log_p: torch.Tensor, loss: str, *,
                   beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-token soft loss `[n]` from student and teacher log-probabilities `[n, V]`."""
    if loss == "forward_kl":
        return _kl_rows(log_p, log_q)
    if loss == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if loss == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return (1 - beta) * _kl_rows(log_p, log_m) + beta * _kl_rows(log_q, log_m)
    if loss == "skew_kl":
        return _kl_rows(log_p, _log_mix(log_p, log_q, alpha))
    if loss == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ConfigError(f"unknown distillation loss {loss!r}; expected one of {LOSSES}")


# --------------------------------------------------------------------------- chunks
def _chunk_sums(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """`[2]`: (soft-loss sum, CE sum) over the masked tokens of one chunk, in float32 (or
    float64 for float64 inputs)."""
    s = _upcast(student)
    t = _upcast(teacher.detach())
    tau = spec.temperature
    log_q = F.log_softmax(s / tau, dim=-1)
    log_p = F.log_softmax(t / tau, dim=-1)
    rows = soft_loss_rows(log_q, log_p, spec.loss, beta=spec.beta, alpha=spec.alpha)
    soft = torch.where(mask, rows, torch.zeros_like(rows)).sum() * (tau * tau)
    if not spec.use_ce or labels is None:
        return torch.stack([soft, soft.new_zeros(())])
    valid = mask & (labels != IGNORE_INDEX)
    ce_rows = F.cross_entropy(s, torch.where(valid, labels, 0), reduction="none")
    ce = torch.where(valid, ce_rows, torch.zeros_like(ce_rows)).sum()
    return torch.stack([soft, ce])


def _run_chunks(num_tokens: int, chunk_size: int,
                chunk_fn: Callable[[int, int], torch.Tensor], needs_grad: bool) -> torch.Tensor:
    """Sum `chunk_fn(start, end)` over token chunks, each checkpointed when grads flow.

    Checkpointing keeps only the chunk's inputs (views, no copies) for the backward pass
    and recomputes the `[chunk, V]` float32 work there, one chunk at a time.
    """
    total = None
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        if needs_grad:
            part = checkpoint(chunk_fn, start, end, use_reentrant=False,
                              preserve_rng_state=False)
        else:
            part = chunk_fn(start, end)
        total = part if total is None else total + part
    return total


@dataclass
class LossParts:
    """The total loss and its parts (the parts are detached, for logging)."""

    loss: torch.Tensor  # scalar, carries the gradient
    soft: torch.Tensor  # reduced soft loss (times τ²), before kd_weight
    ce: torch.Tensor  # reduced hard-label CE, before ce_weight
    num_tokens: torch.Tensor  # masked tokens in this call
    num_label_tokens: torch.Tensor  # masked tokens with a label in this call


def flatten_mask(mask: torch.Tensor | None, lead: torch.Size,
                 device: torch.device) -> torch.Tensor:
    """The mask as bool `[N]` over the `N = lead.numel()` tokens (all True when None);
    `ConfigError` if its shape is not the inputs' token dims `lead`."""
    if mask is None:
        return torch.ones(lead.numel(), dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(lead):
        raise ConfigError(f"mask shape {tuple(mask.shape)} does not match the logits' "
                          f"token dims {tuple(lead)}")
    return mask.reshape(-1) != 0


def flatten_labels(labels: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    """The labels as int64 `[N]` (None stays None); `ConfigError` if their shape is not the
    inputs' token dims `lead`."""
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(lead):
        raise ConfigError(f"labels shape {tuple(labels.shape)} does not match the logits' "
                          f"token dims {tuple(lead)}")
    return labels.reshape(-1).long()


def _reduce(sums: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, *,
            reduction: str, kd_weight: float, ce_weight: float,
            num_tokens: int | torch.Tensor | None,
            num_label_tokens: int | torch.Tensor | None) -> LossParts:
    count = mask.sum()
    label_count = (mask & (labels != IGNORE_INDEX)).sum() if labels is not None else count * 0
    soft, ce = sums[0], sums[1]
    if reduction == "mean":
        # Tensors, not Python ints: no device->host sync. Empty counts divide by 1 (loss 0).
        soft = soft / mean_denominator(num_tokens, count)
        ce = ce / mean_denominator(num_label_tokens, label_count)
    loss = kd_weight * soft + ce_weight * ce
    return LossParts(loss=loss, soft=soft.detach(), ce=ce.detach(), num_tokens=count,
                     num_label_tokens=label_count)


def mean_denominator(given: int | torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    """float32 scalar that reduction 'mean' divides a sum by: the global count `given`
    (`num_tokens` / `num_label_tokens`) if there is one, else the call's own count `local`;
    at least 1, so that no tokens give a loss of 0. Stays on the device (no sync)."""
    value = local if given is None else torch.as_tensor(given, device=local.device)
    return value.to(torch.float32).clamp_min(1.0)


# --------------------------------------------------------------------------- entry points
def distill_loss_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None, *, loss: str = "forward_kl", temperature: float = 1.0,
    beta: float = 0.5, alpha: float = 0.1, labels: torch.Tensor | None = None,
    kd_weight: float = 1.0, ce_weight: float = 0.0, chunk_size: int = 4096,
    reduction: str = "mean", num_tokens: int | torch.Tensor | None = None,
    num_label_tokens: int | torch.Tensor | None = None,
) -> LossParts:
    """`distill_loss`, returning the parts and token counts as well."""
    check_options(loss=loss, temperature=temperature, beta=beta, alpha=alpha,
                  kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=chunk_size,
                  reduction=reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; logit distillation needs the same tokens "
            "and a shared vocabulary")
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    m = flatten_mask(mask, lead, s.device)
    y = flatten_labels(labels, lead)
    spec = loss_spec(loss, temperature, beta, alpha, y, ce_weight)

    def chunk_fn(start: int, end: int) -> torch.Tensor:
        y_chunk = None if y is None else y[start:end]
        return _chunk_sums(s[start:end], t[start:end], m[start:end], y_chunk, spec)

    sums = _sum_or_zero(_run_chunks(s.shape[0], chunk_size, chunk_fn, _grad_on(s)), s)
    return _reduce(sums, m, y, reduction=reduction, kd_weight=kd_weight, ce_weight=ce_weight,
                   num_tokens=num_tokens, num_label_tokens=num_label_tokens)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """Scalar distillation loss `kd_weight * soft + ce_weight * ce` (see the module doc).

    student_logits, teacher_logits: `[..., V]`; mask, labels: `[...]`. Options:
    loss ('forward_kl' | 'reverse_kl' | 'jsd' | 'tvd' | 'skew_kl'), temperature, beta (jsd),
    alpha (skew_kl), labels, kd_weight, ce_weight, chunk_size, reduction ('mean' | 'sum'),
    num_tokens / num_label_tokens (global denominators for 'mean').
    """
    return distill_loss_parts(student_logits, teacher_logits, mask, **options).loss


def kd_loss_from_hidden_parts(
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
    """`kd_loss_from_hidden`, returning the parts and token counts as well."""
    check_options(loss=loss, temperature=temperature, beta=beta, alpha=alpha,
                  kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=chunk_size,
                  reduction=reduction)
    dim = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    if student_lm_head_weight.dim() != 2 or student_lm_head_weight.shape[1] != dim:
        raise ConfigError(f"student lm_head weight {tuple(student_lm_head_weight.shape)} "
                          f"does not map hidden size {dim} to a vocabulary ([V, {dim}])")
    h = student_hidden.reshape(-1, dim)
    teacher_chunk = teacher_chunks(teacher_logits, teacher_hidden, teacher_lm_head_weight,
                                    lead, student_lm_head_weight.shape[0])
    m = flatten_mask(mask, lead, h.device)
    y = flatten_labels(labels, lead)
    spec = loss_spec(loss, temperature, beta, alpha, y, ce_weight)

    def chunk_fn(start: int, end: int) -> torch.Tensor:
        student = h[start:end] @ student_lm_head_weight.t()  # [chunk, V]
        y_chunk = None if y is None else y[start:end]
        return _chunk_sums(student, teacher_chunk(start, end), m[start:end], y_chunk, spec)

    needs_grad = _grad_on(h) or _grad_on(student_lm_head_weight)
    sums = _sum_or_zero(_run_chunks(h.shape[0], chunk_size, chunk_fn, needs_grad), h)
    return _reduce(sums, m, y, reduction=reduction, kd_weight=kd_weight, ce_weight=ce_weight,
                   num_tokens=num_tokens, num_label_tokens=num_label_tokens)


def kd_loss_from_hidden(student_hidden: torch.Tensor, student_lm_head_weight: torch.Tensor,
                        mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """Distillation loss from the student's final hidden states `[..., D]` and its LM head
    weight `[V, D]`, applying the head chunk by chunk (the student's `[N, V]` logits are
    never whole). The teacher is given as `teacher_logits=[..., V]`, or as
    `teacher_hidden=[..., Dt]` with `teacher_lm_head_weight=[V, Dt]` (also applied chunk
    by chunk). Other options as in `distill_loss`; the result equals
    `distill_loss(student_hidden @ W.T, teacher_logits, mask, ...)`.

    NOTE: each chunk's matmul runs in the inputs' dtype and its logits are upcast after,
    exactly as `distill_loss` sees logits produced by a bf16 model.
    """
    return kd_loss_from_hidden_parts(student_hidden, student_lm_head_weight, mask,
                                     **options).loss


def teacher_chunks(teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                   teacher_weight: torch.Tensor | None, lead: torch.Size,
                   vocab: int) -> Callable[[int, int], torch.Tensor]:
    """A function returning the teacher's (detached) logits `[end - start, V]` for the
    flattened tokens [start, end): slices of `teacher_logits`, or `teacher_hidden` times the
    teacher's LM head, computed per call. Checks the teacher's shapes against the student's
    token dims `lead` and vocabulary (`ConfigError`)."""
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ConfigError("give the teacher as exactly one of teacher_logits or teacher_hidden")
    if teacher_logits is not None:
        if tuple(teacher_logits.shape) != (*lead, vocab):
            raise ConfigError(f"teacher logits {tuple(teacher_logits.shape)} do not match "
                              f"the student's tokens and vocabulary {(*lead, vocab)}")
        flat = teacher_logits.detach().reshape(-1, vocab)
        return lambda start, end: flat[start:end]
    if teacher_weight is None or teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
        raise ConfigError(f"teacher_hidden needs teacher_lm_head_weight of shape [{vocab}, Dt]")
    if tuple(teacher_hidden.shape[:-1]) != tuple(lead) or \
            teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ConfigError(f"teacher hidden states {tuple(teacher_hidden.shape)} do not match "
                          f"the student's tokens {tuple(lead)} and the teacher's LM head")
    flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    weight = teacher_weight.detach()
    return lambda start, end: flat[start:end] @ weight.t()


def loss_spec(loss: str, temperature: float, beta: float, alpha: float,
              labels: torch.Tensor | None, ce_weight: float) -> LossSpec:
    """The `LossSpec` of a call (options already checked by `check_options`); the CE is on
    when `ce_weight > 0`, which then needs labels (`ConfigError` otherwise)."""
    if ce_weight > 0 and labels is None:
        raise ConfigError("ce_weight > 0 needs labels for the hard-label cross-entropy")
    return LossSpec(loss, float(temperature), beta, alpha, labels is not None and ce_weight > 0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (per chunk); float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _grad_on(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _sum_or_zero(sums: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Zero tokens give zero sums (still connected to `like` so backward works)."""
    if sums is not None:
        return sums
    return like.float().sum() * 0 + torch.zeros(2, device=like.device)
