"""FSDP2 on CPU with gloo: two ranks (real `torchrun` processes) give the per-step losses
of one process at the same global batch, and their sharded (DCP) checkpoint resumes on two
ranks (bitwise the same continued losses) and on one process (the same within float
rounding)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tessera.distill import checkpointing as ckpt
from tessera.distill.report import read_csv

from .conftest import csv_losses, read_json
from .helpers import REPO, run_tessera, subprocess_env

STEPS = {"trainer__max_steps": 5, "trainer__global_batch_size": 4,
         "trainer__micro_batch_size": 2, "trainer__checkpoint_every": 3,
         "eval__num_sequences": 4, "trainer__teacher_sharding": "shard"}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "tessera.cli", "distill", "--config", "configs/tiny.yaml",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=subprocess_env())


def _distill(out, overrides, settings: dict, *, ranks: int, resumes: bool = False
             ) -> dict[int, float]:
    """One tiny run in `out` (one process, or two torchrun ranks) that must succeed, and
    resume from a checkpoint when `resumes`; the run's losses afterwards."""
    args = overrides(out, **settings)
    done = _torchrun(args) if ranks == 2 else run_tessera("distill", "--config",
                                                          "configs/tiny.yaml", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("resumed from" in done.stdout) == resumes
    losses = csv_losses(out / "metrics.csv")
    assert list(losses) == [1, 2, 3, 4, 5]
    return losses


def _assert_close(losses: dict[int, float], reference: dict[int, float], steps, tol: float):
    for step in steps:
        assert abs(losses[step] - reference[step]) <= tol, (step, reference[step],
                                                           losses[step])


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_from_a_sharded_checkpoint(overrides,
                                                                          tmp_path):
    one = _distill(tmp_path / "one", overrides, STEPS, ranks=1)
    out = tmp_path / "two"
    two = _distill(out, overrides, STEPS, ranks=2)
    _assert_close(two, one, one, 1e-5)
    report = read_json(out / "report.json")
    assert report["world_size"] == 2
    assert abs(report["metrics"]["after"]["ppl"] -
               read_json(tmp_path / "one/report.json")["metrics"]["after"]["ppl"]) < 1e-3

    # The 2-rank checkpoints are DCP directories. A copy of the run with only the step-3
    # checkpoint resumes in one process; the run itself then resumes on two ranks.
    saved = dict(ckpt.list_checkpoints(out / "checkpoints"))
    assert sorted(saved) == [3, 5]
    assert read_json(saved[3] / "state.json")["layout"] == "dcp"
    ckpt.verify_checkpoint(saved[3])
    shutil.rmtree(saved[5])
    (out / "report.json").unlink()
    solo = tmp_path / "two-resumed-on-one"
    shutil.copytree(out, solo)
    _assert_close(_distill(solo, overrides, STEPS, ranks=1, resumes=True), two, (4, 5), 1e-5)
    _assert_close(_distill(out, overrides, STEPS, ranks=2, resumes=True), two, (4, 5), 1e-7)


@pytest.mark.slow
def test_the_fused_loss_on_two_ranks_matches_one_process(overrides, tmp_path):
    """The fused LM head + KD op reads the sharded models' whole heads after their forward;
    with trained (tied) embeddings the head's gradient is reduce-scattered with the rest.
    Two micro-batches per rank: the first accumulates without communication."""
    fused = {**STEPS, "trainer__checkpoint_every": 0, "loss__fused": "true",
             "trainer__train_embeddings": "true", "trainer__global_batch_size": 8}
    one = _distill(tmp_path / "one", overrides, fused, ranks=1)
    two = _distill(tmp_path / "two", overrides, fused, ranks=2)
    report = read_json(tmp_path / "two/report.json")
    assert "fused LM head" in report["loss_path"]
    assert len(set(one.values())) == 5  # the embeddings train: losses move
    _assert_close(two, one, one, 1e-5)


@pytest.mark.slow
def test_hidden_state_projections_train_the_same_on_two_ranks(overrides, tmp_path):
    """A narrower fresh student matched to teacher hidden states through trained
    projections: the projections' gradients are averaged over ranks like the student's."""
    narrow = {**STEPS, "trainer__checkpoint_every": 0, "student__layers": "null",
              "student__model": "{hidden_size: 32, num_layers: 2, num_heads: 2, "
                                "num_kv_heads: 1, intermediate_size: 64}",
              "loss__hidden_weight": "1.0", "loss__layer_map": "{1: 2, 2: 4}",
              "trainer__teacher_sharding": "replicate"}
    one = _distill(tmp_path / "one", overrides, narrow, ranks=1)
    two = _distill(tmp_path / "two", overrides, narrow, ranks=2)
    _assert_close(two, one, one, 1e-5)
    hidden = [float(r["hidden"]) for r in read_csv(tmp_path / "two/metrics.csv")]
    assert all(h > 0 for h in hidden)
