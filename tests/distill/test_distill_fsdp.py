"""FSDP2 on CPU with gloo: two ranks (real `torchrun` processes) give the per-step losses
of one process at the same global batch, and their sharded (DCP) checkpoint resumes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tessera.distill import checkpointing as ckpt

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


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_from_a_sharded_checkpoint(overrides,
                                                                          tmp_path):
    single = run_tessera("distill", "--config", "configs/tiny.yaml",
                         *overrides(tmp_path / "one", **STEPS))
    assert single.returncode == 0, single.stderr
    out = tmp_path / "two"
    double = _torchrun(overrides(out, **STEPS))
    assert double.returncode == 0, double.stderr[-3000:]

    one, two = csv_losses(tmp_path / "one/metrics.csv"), csv_losses(out / "metrics.csv")
    assert list(one) == list(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5, (step, one[step], two[step])
    report = read_json(out / "report.json")
    assert report["world_size"] == 2
    assert abs(report["metrics"]["after"]["ppl"] -
               read_json(tmp_path / "one/report.json")["metrics"]["after"]["ppl"]) < 1e-3

    # The 2-rank checkpoints are DCP directories; drop the last one and resume from step 3.
    saved = dict(ckpt.list_checkpoints(out / "checkpoints"))
    assert sorted(saved) == [3, 5]
    assert read_json(saved[3] / "state.json")["layout"] == "dcp"
    ckpt.verify_checkpoint(saved[3])
    shutil.rmtree(saved[5])
    (out / "report.json").unlink()
    resumed = _torchrun(overrides(out, **STEPS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = csv_losses(out / "metrics.csv")
    assert list(again) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert abs(again[step] - two[step]) <= 1e-7, (step, two[step], again[step])
