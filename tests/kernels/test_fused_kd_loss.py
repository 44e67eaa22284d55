"""Fused LM head + distillation loss against `kd_loss_from_hidden` in float64.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small fp32 shapes on CPU, in chunks of 16 tokens so that several chunks and
a ragged last one are crossed (the kernels' vocabulary tiles are 64 wide there and their
slices 128, so an odd vocabulary leaves both ragged); `gpu` tests run them here, compiled,
in bf16 at larger shapes. Every case draws fresh inputs; the loss, its logged parts and the
gradients of the student's hidden states and LM head weight are compared with float64
autograd through the reference. The row-loss output of the logits kernels is NaN before
their launch, and the student logits they overwrite with their gradient start as logits,
so an element never written fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tessera.distill.losses import distill_loss_parts, kd_loss_from_hidden_parts
from tessera.errors import ConfigError
from tessera.kernels import fused_kd_loss as kernels
from tessera.kernels import registry

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    num_tokens: int
    vocab: int
    student_dim: int
    teacher_dim: int  # 0: the teacher is given as logits
    options: dict = field(default_factory=dict)
    with_labels: bool = False
    global_counts: bool = False  # pass num_tokens / num_label_tokens larger than local
    chunk_size: int = 16


SMALL = {
    "forward_kl-tau2": Case(37, 211, 24, 40, dict(loss="forward_kl", temperature=2.0)),
    "reverse_kl-ce": Case(19, 211, 24, 40, dict(loss="reverse_kl", temperature=0.7,
                                                 kd_weight=0.8, ce_weight=0.3), True),
    "jsd-tau2": Case(19, 211, 24, 40, dict(loss="jsd", beta=0.5, temperature=2.0)),
    "jsd-beta0.3-ce-sum": Case(19, 211, 24, 40, dict(loss="jsd", beta=0.3, temperature=1.5,
                                                     ce_weight=0.5, reduction="sum"), True),
    "forward_kl-logits-pow2": Case(16, 256, 32, 0, dict(loss="forward_kl", temperature=1.0,
                                                        ce_weight=1.0), True, True),
    "jsd-beta1-is-reverse": Case(9, 99, 16, 0, dict(loss="jsd", beta=1.0, temperature=3.0)),
}
LARGE = {
    "forward_kl-tau2": Case(1000, 32003, 256, 384, dict(loss="forward_kl", temperature=2.0),
                            chunk_size=4096),
    "jsd-ce": Case(777, 50257, 320, 0, dict(loss="jsd", beta=0.5, temperature=2.0,
                                             ce_weight=0.5), True, chunk_size=256),
    "reverse_kl-ce": Case(512, 32768, 256, 512, dict(loss="reverse_kl", temperature=0.8,
                                                      ce_weight=0.2), True, chunk_size=4096),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str = "") -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def make_inputs(case: Case, dtype: torch.dtype, device: str) -> tuple[dict, torch.Tensor]:
    """(keyword arguments of the op, the incoming gradient of the loss)."""
    n, v = case.num_tokens, case.vocab
    hidden = torch.randn(n, case.student_dim, device=device)
    weight = torch.randn(v, case.student_dim, device=device) / case.student_dim**0.5
    kwargs = dict(student_hidden=hidden.to(dtype), student_lm_head_weight=weight.to(dtype),
                  mask=torch.rand(n, device=device) < 0.8, chunk_size=case.chunk_size,
                  **case.options)
    if case.teacher_dim:
        t_weight = 2 * torch.randn(v, case.teacher_dim, device=device) / case.teacher_dim**0.5
        kwargs["teacher_hidden"] = torch.randn(n, case.teacher_dim, device=device).to(dtype)
        kwargs["teacher_lm_head_weight"] = t_weight.to(dtype)
    else:
        kwargs["teacher_logits"] = (2 * torch.randn(n, v, device=device)).to(dtype)
    if case.with_labels:
        labels = torch.randint(0, v, (n,), device=device)
        kwargs["labels"] = labels.masked_fill(torch.rand(n, device=device) < 0.2, -100)
    if case.global_counts:
        kwargs["num_tokens"] = torch.tensor(3.0 * n, device=device)
        kwargs["num_label_tokens"] = 2 * n
    return kwargs, 1 + torch.rand((), device=device)


def float64_reference(kwargs: dict, grad_loss: torch.Tensor):
    """(parts, d hidden, d weight) of the reference in float64."""
    wide = {k: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
            for k, t in kwargs.items()}
    leaves = [wide["student_hidden"].requires_grad_(),
              wide["student_lm_head_weight"].requires_grad_()]
    parts = kd_loss_from_hidden_parts(**wide)
    grads = torch.autograd.grad(parts.loss * grad_loss.double(), leaves)
    return parts, *grads


def check_fused_loss(case: Case, dtype: torch.dtype, device: str):
    kwargs, grad_loss = make_inputs(case, dtype, device)
    expected, dh_ref, dw_ref = float64_reference(kwargs, grad_loss)
    hidden = kwargs["student_hidden"].clone().requires_grad_()
    weight = kwargs["student_lm_head_weight"].clone().requires_grad_()
    parts = kernels.fused_linear_kd_loss_parts(
        **kwargs | dict(student_hidden=hidden, student_lm_head_weight=weight))
    (parts.loss * grad_loss).backward()
    for name in ("loss", "soft", "ce"):
        assert_close(getattr(parts, name), getattr(expected, name), dtype, name)
    assert torch.equal(parts.num_tokens, expected.num_tokens)
    assert torch.equal(parts.num_label_tokens, expected.num_label_tokens)
    assert_close(hidden.grad, dh_ref, dtype, "d hidden")
    assert_close(weight.grad, dw_ref, dtype, "d weight")


def check_second_backward_fails(case: Case, device: str):
    """The backward scales the saved gradients in place: a second backward through the same
    graph must fail autograd's version check instead of returning doubly scaled gradients."""
    kwargs, _ = make_inputs(case, torch.float32, device)
    leaves = [kwargs[k].clone().requires_grad_()
              for k in ("student_hidden", "student_lm_head_weight")]
    loss = kernels.fused_linear_kd_loss(*leaves, **_rest(kwargs))
    (loss * 3).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def check_logits_kernel(case: Case, device: str):
    """`kd_rows_` alone: per-token losses and d loss / d logits for arbitrary weights."""
    n, v, opts = case.num_tokens, case.vocab, case.options
    student, teacher = torch.randn(n, v, device=device), 2 * torch.randn(n, v, device=device)
    mask = torch.rand(n, device=device) < 0.7
    labels = torch.randint(0, v, (n,), device=device).masked_fill(
        torch.rand(n, device=device) < 0.3, -100) if case.with_labels else None
    coefs = torch.rand(2, device=device) + 0.5
    tau, use_ce = opts["temperature"], case.with_labels

    s64 = student.double().requires_grad_()
    sums = distill_loss_parts(s64, teacher.double(), mask, labels=labels, reduction="sum",
                              kd_weight=coefs[0].item(), ce_weight=coefs[1].item() * use_ce,
                              **opts)
    rows_ref = soft_rows_reference(s64.detach(), teacher.double(), mask, opts)
    (grad_ref,) = torch.autograd.grad(sums.loss, s64)

    row_loss = torch.full((n, 2), float("nan"), device=device)
    logits = student.clone()
    out = kernels.kd_rows_(logits, teacher, mask, labels, coefs, loss=opts["loss"],
                           temperature=tau, beta=opts.get("beta", 0.5), row_loss=row_loss)
    assert out is row_loss
    assert_close(row_loss[:, 0] * tau * tau, rows_ref, torch.float32, "soft rows")
    assert_close(row_loss[:, 1].sum(), sums.ce, torch.float32, "ce sum")
    assert_close(logits, grad_ref, torch.float32, "d logits")


def soft_rows_reference(student, teacher, mask, opts) -> torch.Tensor:
    """Per-token soft loss times τ², zero on masked tokens."""
    rows = torch.stack([distill_loss_parts(student[i:i + 1], teacher[i:i + 1], reduction="sum",
                                           **opts).soft for i in range(student.shape[0])])
    return torch.where(mask, rows, torch.zeros_like(rows))


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("name", SMALL)
def test_fused_loss_interpreted(interpreter, name):
    interpreter.run(check_fused_loss, SMALL[name], torch.float32, "cpu")


def test_second_backward_fails_interpreted(interpreter):
    interpreter.run(check_second_backward_fails, SMALL[next(iter(SMALL))], "cpu")


@pytest.mark.parametrize("case", [
    Case(9, 211, 0, 0, dict(loss="forward_kl", temperature=2.0), True),
    Case(9, 211, 0, 0, dict(loss="reverse_kl", temperature=0.5), True),
    Case(9, 130, 0, 0, dict(loss="jsd", temperature=1.5, beta=0.7), True),
], ids=["forward_kl", "reverse_kl", "jsd"])
def test_logits_kernel_interpreted(interpreter, case):
    interpreter.run(check_logits_kernel, case, "cpu")


def test_unfused_losses_and_float64_use_the_reference():
    kwargs, _ = make_inputs(Case(7, 13, 8, 0, dict(loss="tvd", temperature=2.0)),
                            torch.float32, "cpu")
    fused = kernels.fused_linear_kd_loss(**kwargs)
    torch.testing.assert_close(fused, kd_loss_from_hidden_parts(**kwargs).loss)
    wide = {k: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
            for k, t in kwargs.items()} | {"loss": "forward_kl"}
    assert kernels.fused_linear_kd_loss(**wide).dtype == torch.float64


def test_bad_options_raise_the_reference_errors():
    kwargs, _ = make_inputs(Case(7, 13, 8, 0, dict(loss="forward_kl")), torch.float32, "cpu")
    with pytest.raises(ConfigError, match="needs labels"):
        kernels.fused_linear_kd_loss(**kwargs, ce_weight=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        kernels.fused_linear_kd_loss(**kwargs | {"temperature": 0.0})


def test_chunk_rows_respects_the_logits_budget():
    rows = kernels.chunk_rows(8192, 128256, 2, 4096)
    assert rows % 64 == 0 and 2 * rows * 128256 * 2 <= kernels.LOGITS_BUDGET
    assert kernels.chunk_rows(8192, 49152, 2, 4096) == kernels.MAX_CHUNK_ROWS
    assert kernels.chunk_rows(37, 211, 4, 16) == 16


def test_registered_with_the_reference():
    assert registry.reference("fused_linear_kd_loss") is kernels.fused_linear_kd_loss_reference
    pytest.importorskip("triton")
    assert registry.select("fused_linear_kd_loss", "cuda").backend == "triton"
    assert registry.select("fused_linear_kd_loss", "cpu").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", LARGE)
def test_fused_loss_gpu(name):
    check_fused_loss(LARGE[name], torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_autocast_matches_the_reference_gpu():
    """fp32 parameters under bf16 autocast: the same matmul dtype as the reference."""
    kwargs, _ = make_inputs(LARGE["forward_kl-tau2"], torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        leaves = [kwargs[k].clone().requires_grad_()
                  for k in ("student_hidden", "student_lm_head_weight")]
        fused = kernels.fused_linear_kd_loss(*leaves, **_rest(kwargs))
        fused.backward()
        refs = [kwargs[k].clone().requires_grad_()
                for k in ("student_hidden", "student_lm_head_weight")]
        expected = kd_loss_from_hidden_parts(*refs, **_rest(kwargs)).loss
        expected.backward()
    assert_close(fused, expected.double(), torch.bfloat16, "loss")
    for leaf, ref in zip(leaves, refs, strict=True):
        assert leaf.grad.dtype == torch.float32
        assert_close(leaf.grad, ref.grad.double(), torch.bfloat16, "grad")


def _rest(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items()
            if k not in ("student_hidden", "student_lm_head_weight")}
