"""The trainer on a tiny random teacher: gradient accumulation is exact, an end-to-end run
writes a student that loads in Tessera and in transformers, and rerunning a finished run
does not train again."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tessera
from tessera.cli import main
from tessera.config import ModelConfig
from tessera.data import pack_rows
from tessera.distill.hidden import HiddenStateMatcher
from tessera.distill.losses import KDLossConfig
from tessera.distill.run_config import RunConfig
from tessera.distill.student import student_from_teacher
from tessera.distill.trainer import global_counts, lr_factor, micro_step
from tessera.model import build_model

from .conftest import csv_losses, read_json
from .helpers import run_tessera


def _accumulation_setup():
    config = ModelConfig(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, intermediate_size=48, initializer_range=0.2)
    torch.manual_seed(0)
    teacher = build_model(config).requires_grad_(False)
    student = student_from_teacher(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss = KDLossConfig(loss="jsd", temperature=2.0, ce_weight=0.5, hidden_weight=0.3,
                        layer_map={1: 1, 2: 3}, chunk_size=5)
    matcher = HiddenStateMatcher(32, 32, loss.layer_map)
    return SimpleNamespace(config=RunConfig(loss=loss), student=student, matcher=matcher,
                           teacher=SimpleNamespace(model=teacher),
                           device=torch.device("cpu"), env=SimpleNamespace(world_size=1))


def _grads_after(run, batches):
    run.student.zero_grad(set_to_none=True)
    counts = global_counts(batches, run.device)
    totals = sum(micro_step(run, batch, counts, step=0) for batch in batches)
    return totals, {n: p.grad.clone() for n, p in run.student.named_parameters()}


def test_k_micro_batches_equal_one_batch_with_uneven_token_counts():
    run = _accumulation_setup()
    rng = np.random.default_rng(0)
    # Rows of 13, 6 and 9 tokens: the short rows are padded, so micro-batches hold
    # different numbers of target tokens and a per-micro-batch mean would be wrong.
    rows = [rng.integers(1, 40, n) for n in (13, 6, 9)]
    rows[0][4] = 0  # an EOS inside a row: two documents that must not see each other
    whole = pack_rows(rows, 12, eos_token_id=0)
    micro = [pack_rows([row], 12, eos_token_id=0) for row in rows]
    totals_whole, grads_whole = _grads_after(run, [whole])
    totals_micro, grads_micro = _grads_after(run, micro)
    torch.testing.assert_close(totals_micro, totals_whole, rtol=1e-6, atol=1e-7)
    assert totals_whole[2] > 0 and totals_whole[3] > 0  # CE and hidden terms were on
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_micro[name], grad, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_accumulated_run_matches_one_micro_batch_per_step(run_tiny, tmp_path):
    common = {"trainer__max_steps": 4, "trainer__checkpoint_every": 0,
              "eval__num_sequences": 2}
    run_tiny(tmp_path / "one", trainer__micro_batch_size=4, **common)
    run_tiny(tmp_path / "four", trainer__micro_batch_size=1, **common)
    one, four = csv_losses(tmp_path / "one/metrics.csv"), csv_losses(tmp_path / "four/metrics.csv")
    assert list(one) == [1, 2, 3, 4]
    for step in one:
        assert four[step] == pytest.approx(one[step], rel=1e-5)


def test_learning_rate_schedule():
    tc = RunConfig().trainer.__class__(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(s, tc) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))


def test_end_to_end_cli_run_writes_a_loadable_student(overrides, tmp_path, tokenizer,
                                                      teacher_dir, corpus, monkeypatch,
                                                      capsys):
    out = tmp_path / "run"
    result = run_tessera("distill", "--config", "configs/tiny.yaml",
                         *overrides(out, trainer__max_steps=6, trainer__tensorboard="true"))
    assert result.returncode == 0, result.stderr
    assert "student at init" in result.stdout and "teacher" in result.stdout

    report = read_json(out / "report.json")
    assert report["status"] == "complete" and report["steps"] == 6
    assert report["config"]["trainer"]["max_steps"] == 6
    metrics = report["metrics"]
    assert set(metrics) >= {"before", "after", "teacher"}
    assert metrics["after"]["kl"] < metrics["before"]["kl"]  # it learned from the teacher
    assert report["timings"]["train_s"] > 0
    assert list(csv_losses(out / "metrics.csv")) == list(range(1, 7))
    assert (out / "tensorboard").is_dir() or "TensorBoard logging is off" in result.stdout
    assert (out / "loss_curve.png").is_file() or "no loss-curve PNG" in result.stdout

    loaded = tessera.load(out / "student", device="cpu")
    assert loaded.config.num_layers == 2
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    _matches_transformers(out / "student", loaded)

    # `tessera eval` on the saved student reproduces the run's own final evaluation.
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    args = ["eval", str(out / "student"), "--corpus", str(corpus), "--teacher",
            str(teacher_dir), "--val-fraction", "0.2", "--seq-len", "32",
            "--num-sequences", "4", "--json"]
    assert main(args) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("ppl", "teacher_ppl", "kl", "agreement"):
        assert evaluated[key] == pytest.approx(report["metrics"]["history"][-1][key], rel=1e-5)


def _matches_transformers(directory, loaded):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    text = "def model_1(self, value):\n    return model + 1\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == loaded.tokenizer.encode(text)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded.model(ids), rtol=1e-4, atol=1e-4)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_rerunning_a_finished_run_does_not_train_again(run_tiny, tmp_path):
    out = tmp_path / "run"
    first, _ = run_tiny(out, trainer__max_steps=2, eval__num_sequences=2)
    weights = (out / "student" / "model.safetensors").read_bytes()
    again, _ = run_tiny(out, trainer__max_steps=2, eval__num_sequences=2)
    assert again["metrics"] == first["metrics"]
    assert (out / "student" / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "run.json").read_text())["config"]["trainer"]["max_steps"] == 2


def test_activation_checkpointing_does_not_change_the_losses(run_tiny, tmp_path):
    common = {"trainer__max_steps": 3, "trainer__checkpoint_every": 0,
              "eval__num_sequences": 2}
    run_tiny(tmp_path / "plain", **common)
    run_tiny(tmp_path / "ac", trainer__activation_checkpointing="true", **common)
    plain, ac = csv_losses(tmp_path / "plain/metrics.csv"), csv_losses(tmp_path / "ac/metrics.csv")
    assert list(plain) == [1, 2, 3]
    for step in plain:
        assert ac[step] == pytest.approx(plain[step], rel=1e-6)
