"""`benchmarks/multi_gpu_distill.py`, the multi-GPU run's driver, on CPU with gloo: its four
real runs (1 process, 2 ranks, the 2-rank checkpoint resumed on 1 and on 2) and the
comparisons it reports."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from .helpers import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "multi_gpu_distill.py"


@pytest.mark.slow
def test_the_driver_reports_parity_scaling_and_resumption(overrides, tmp_path):
    result_file = tmp_path / "out" / "result.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--nproc", "2",
               "--config", "configs/tiny.yaml", "--seq-len", "32", "--micro-batch", "2",
               "--global-batch", "4", "--steps", "5", "--checkpoint-step", "3",
               "--warmup", "1", "--workdir", str(tmp_path / "work"),
               "--out", str(result_file), "--overrides",
               *[o for o in overrides(tmp_path / "unused") if not o.startswith("output_dir")]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_file.read_text())

    losses = result["losses"]
    assert sorted(losses) == ["many", "one", "resume_many", "resume_one"]
    for run in losses.values():
        assert sorted(map(int, run)) == [1, 2, 3, 4, 5]
    assert len(set(losses["one"].values())) == 5  # training moves the loss
    # Measured against the runs' own metrics, so a wrong comparison cannot hide.
    worst = max(abs(losses["many"][s] - losses["one"][s]) for s in losses["one"])
    assert result["parity_many_vs_one"]["max_abs"] == pytest.approx(worst, abs=1e-12)
    assert worst <= 1e-5
    assert result["resume_one_vs_many"]["max_abs"] <= 1e-5
    assert result["resume_many_vs_many"]["max_abs"] <= 1e-7
    speeds = result["tokens_per_s"]
    assert result["scaling"] == pytest.approx(
        result["tokens_per_s_many"] / result["tokens_per_s_one"])
    for name in ("one", "many"):  # the median of the steps after --warmup 1
        assert result[f"tokens_per_s_{name}"] == pytest.approx(
            statistics.median(v for s, v in speeds[name].items() if int(s) > 1))
    for name in ("one", "many", "resume_one", "resume_many"):
        assert (result_file.parent / f"{name}.log").is_file()
    assert "2 ranks vs 1" in done.stdout and "->" in done.stdout


def test_the_driver_refuses_bad_arguments():
    for extra, message in ((["--nproc", "1"], "--nproc must be at least 2"),
                           (["--steps", "5", "--checkpoint-step", "5"], "--checkpoint-step"),
                           ([], "give --tokenizer")):
        done = subprocess.run([sys.executable, str(SCRIPT), *extra], capture_output=True,
                              text=True, timeout=60, cwd=REPO, env=subprocess_env())
        assert done.returncode == 2 and message in done.stderr, done.stderr
