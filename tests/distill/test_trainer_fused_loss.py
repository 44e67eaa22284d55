"""The trainer's two ways to the KD loss agree: through the fused LM head + KD kernel op
(`loss.fused: true`; on CPU the op's torch reference) and on whole logits (`false`).

The op itself is checked against `tessera.distill.losses` in tests/kernels/
test_fused_kd_loss.py; here: whole tiny runs give the same per-step losses and student
weights, and the trainer's adapter (one micro-step at a time) gives the loss of the whole
global batch, with its temperature, weights and global token counts, computed from first
principles, on either path.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tessera.config import ModelConfig
from tessera.data import pack_rows
from tessera.distill.evaluate import flat_view, run_batch
from tessera.distill.losses import KDLossConfig
from tessera.distill.run_config import RunConfig, load_run_config
from tessera.distill.student import student_from_teacher
from tessera.distill.trainer import (
    describe_loss_path,
    global_counts,
    micro_step,
    uses_fused_loss,
)
from tessera.errors import ConfigError
from tessera.model import build_model

from .conftest import csv_losses, read_json

KD_OPTIONS = dict(loss__temperature=2.0, loss__ce_weight=0.5, loss__hidden_weight=0.2,
                  loss__layer_map="{1: 1, 2: 4}", loss__chunk_size=24)


def _fused_and_plain_runs(run_tiny, tmp_path, weight_tol: float, **options) -> list[dict]:
    """Run the same tiny config with `loss.fused` true and false; check that per-step
    losses agree within 1e-5 and the final student weights within `weight_tol`; return the
    two reports."""
    common = dict(KD_OPTIONS, trainer__max_steps=3, trainer__checkpoint_every=0,
                  eval__num_sequences=2) | options
    reports = [run_tiny(tmp_path / name, loss__fused=fused, **common)[0]
               for name, fused in (("fused", "true"), ("plain", "false"))]
    fused_losses = csv_losses(tmp_path / "fused/metrics.csv")
    plain_losses = csv_losses(tmp_path / "plain/metrics.csv")
    assert list(fused_losses) == list(plain_losses) == [1, 2, 3]
    for step, value in plain_losses.items():
        assert fused_losses[step] == pytest.approx(value, rel=1e-5)
    fused_weights = load_file(tmp_path / "fused/student/model.safetensors")
    plain_weights = load_file(tmp_path / "plain/student/model.safetensors")
    assert fused_weights.keys() == plain_weights.keys()
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, rtol=weight_tol,
                                   atol=weight_tol, msg=name)
    return reports


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_fused_and_unfused_runs_match_on_cpu(run_tiny, tmp_path, loss):
    fused, plain = _fused_and_plain_runs(run_tiny, tmp_path, 1e-5, loss__loss=loss,
                                         trainer__device="cpu")
    assert "fused_linear_kd_loss, torch backend" in fused["loss_path"]
    assert "whole logits" in plain["loss_path"]


# --------------------------------------------------------------------------- the adapter
def _adapter_setup(fused: bool) -> SimpleNamespace:
    """A trainer `Run` stand-in: a random teacher and a 2-layer student with a trainable,
    untied LM head (so the op's gradient w.r.t. the head weight is checked too)."""
    config = ModelConfig(vocab_size=37, hidden_size=24, num_layers=3, num_heads=4,
                         num_kv_heads=2, intermediate_size=40, initializer_range=0.2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = build_model(config).requires_grad_(False)
    student = student_from_teacher(teacher, [0, 2]).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss = KDLossConfig(loss="forward_kl", temperature=2.5, kd_weight=0.7, ce_weight=0.4,
                        chunk_size=5, fused=fused)
    return SimpleNamespace(config=RunConfig(loss=loss), student=student, matcher=None,
                           teacher=SimpleNamespace(model=teacher),
                           device=torch.device("cpu"), env=SimpleNamespace(world_size=1))


def _micro_batches():
    """Three micro-batches of 17, 5 and 15 target tokens (short rows are padded, one row
    holds two documents), 37 in all, 34 of them with a label."""
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, 37, n) for n in (18, 6, 16)]
    rows[0][7] = 0  # an EOS: two documents
    batches = [pack_rows([row], 17, eos_token_id=0) for row in rows]
    batches[0].labels[0, [2, 11]] = -100  # targets that only the soft loss sees
    batches[2].labels[0, 4] = -100
    return batches


def _expected_loss(run: SimpleNamespace, batches: list) -> torch.Tensor:
    """The global batch's loss from scratch: τ² KL(p_teacher || q_student) over all masked
    tokens divided by their number, plus the CE over all labelled ones divided by theirs."""
    cfg = run.config.loss
    tau = cfg.temperature
    kl_sum = ce_sum = 0.0
    tokens = labelled = 0
    for batch in batches:
        _ids, _pos, labels, mask = flat_view(batch)
        s = run_batch(run.student, batch).logits.flatten(0, -2).double()
        with torch.no_grad():
            t = run_batch(run.teacher.model, batch).logits.flatten(0, -2).double()
        m, y = mask.reshape(-1), labels.reshape(-1)
        valid = m & (y != -100)
        kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1),
                      log_target=True, reduction="none").sum(-1)
        kl_sum = kl_sum + (kl * m).sum() * tau * tau
        ce_sum = ce_sum + F.cross_entropy(s[valid], y[valid], reduction="sum")
        tokens, labelled = tokens + int(m.sum()), labelled + int(valid.sum())
    return cfg.kd_weight * kl_sum / tokens + cfg.ce_weight * ce_sum / labelled


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_micro_steps_give_the_global_batch_loss_and_gradients(fused):
    run = _adapter_setup(fused)
    assert uses_fused_loss(run) is fused
    batches = _micro_batches()
    counts = global_counts(batches, run.device)
    assert counts.tolist() == [37, 34]  # the soft and the CE denominators differ

    run.student.zero_grad(set_to_none=True)
    totals = sum(micro_step(run, batch, counts, step=0) for batch in batches)
    got = {n: p.grad.clone() for n, p in run.student.named_parameters()}
    assert got["lm_head.weight"].abs().sum() > 0

    run.student.zero_grad(set_to_none=True)
    expected = _expected_loss(run, batches)
    expected.backward()
    torch.testing.assert_close(totals[0].double(), expected.detach(), rtol=1e-5, atol=0)
    for name, param in run.student.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the choice
def _choice_run(fused, device: str = "cpu", loss: str = "forward_kl") -> SimpleNamespace:
    config = load_run_config(None, [f"loss.fused={fused}", f"loss.loss={loss}"])
    return SimpleNamespace(config=config, device=torch.device(device),
                           student=torch.nn.Linear(2, 2),
                           teacher=SimpleNamespace(model=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("fused, device, expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("true", "cpu", True),
    ("false", "cuda", False),
])
def test_loss_fused_chooses_the_path(fused, device, expected):
    run = _choice_run(fused, device)
    assert uses_fused_loss(run) is expected
    assert ("fused LM head" in describe_loss_path(run)) is expected


def test_the_default_is_auto_and_bad_values_are_refused():
    assert RunConfig().loss.fused == "auto"
    with pytest.raises(ConfigError, match="fused must be true, false or 'auto'"):
        load_run_config(None, ["loss.fused=sometimes"])


def test_the_path_line_names_losses_the_kernel_leaves_to_its_reference():
    pytest.importorskip("triton")
    line = describe_loss_path(_choice_run("auto", "cuda", loss="tvd"))
    assert "triton backend" in line and "no tvd" in line
    assert "reference" not in describe_loss_path(_choice_run("auto", "cuda", loss="jsd"))


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_fused_and_unfused_runs_match_on_cuda(run_tiny, tmp_path, loss):
    """The Triton kernel in the trainer, in float32: the run of the logits path. (AdamW
    turns float32 rounding in near-zero gradients into differences of up to ~3e-4 in a
    weight after 3 steps of lr 1e-3; the CPU runs agree within 1e-5.)"""
    fused, _plain = _fused_and_plain_runs(run_tiny, tmp_path, 1e-3, loss__loss=loss,
                                          trainer__device="cuda", trainer__autocast="false")
    assert "fused_linear_kd_loss, triton backend" in fused["loss_path"]
    assert read_json(tmp_path / "fused/run.json")["config"]["loss"]["fused"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_runs_on_both_paths_on_cuda(run_tiny, tmp_path):
    """The default CUDA setting: bf16 autocast over fp32 master weights, through the Triton
    kernels (attention, RoPE, norms, the fused loss). Both loss paths train, and their
    per-step losses agree within bf16 rounding."""
    common = dict(KD_OPTIONS, trainer__max_steps=3, trainer__checkpoint_every=0,
                  eval__num_sequences=2, trainer__device="cuda", trainer__autocast="true")
    for name, fused in (("fused", "true"), ("plain", "false")):
        run_tiny(tmp_path / name, loss__fused=fused, **common)
    fused_losses = csv_losses(tmp_path / "fused/metrics.csv")
    plain_losses = csv_losses(tmp_path / "plain/metrics.csv")
    assert list(fused_losses) == list(plain_losses) == [1, 2, 3]
    for step, value in plain_losses.items():
        assert math.isfinite(value) and value > 0
        assert fused_losses[step] == pytest.approx(value, rel=3e-2)
