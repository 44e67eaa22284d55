"""Real crashes and signals: a training subprocess killed with SIGKILL right after a
checkpoint resumes to exactly the losses of an uninterrupted run; SIGTERM and SIGINT save a
checkpoint and exit cleanly."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tessera.distill import checkpointing as ckpt

from .conftest import csv_losses, read_json
from .helpers import REPO, run_tessera, subprocess_env, tessera_command

STEPS = {"trainer__max_steps": 8, "trainer__checkpoint_every": 2, "data__seq_len": 64,
         "eval__num_sequences": 2, "trainer__keep_last": 3}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(tessera_command("distill", "--config", "configs/tiny.yaml", *args),
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (rc {process.returncode}) before the condition held:"
                        f"\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training subprocess")
        time.sleep(0.005)


def test_sigkill_then_resume_gives_exactly_the_uninterrupted_losses(overrides, tmp_path):
    straight = run_tessera("distill", "--config", "configs/tiny.yaml",
                           *overrides(tmp_path / "straight", **STEPS))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    process = _start(overrides(out, **STEPS))
    first = out / "checkpoints" / "step-00000002"
    _wait_for(first.exists, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    killed_at = max(csv_losses(out / "metrics.csv"), default=0)

    resumed = run_tessera("distill", "--config", "configs/tiny.yaml", *overrides(out, **STEPS))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    expected = csv_losses(tmp_path / "straight" / "metrics.csv")
    got = csv_losses(out / "metrics.csv")
    assert list(expected) == list(range(1, 9)) and killed_at < 8
    assert got == expected  # bitwise: floats are logged with repr
    assert (out / "student/model.safetensors").read_bytes() == \
        (tmp_path / "straight/student/model.safetensors").read_bytes()
    report = read_json(out / "report.json")
    assert report["metrics"] == read_json(tmp_path / "straight/report.json")["metrics"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(overrides, tmp_path, sig):
    out = tmp_path / "run"
    process = _start(overrides(out, trainer__max_steps=5000, trainer__checkpoint_every=0,
                               eval__num_sequences=2))
    _wait_for(lambda: len(csv_losses(out / "metrics.csv")) >= 2 if
              (out / "metrics.csv").exists() else False, process)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert f"stopped by {sig.name}" in stdout and "Run the same command again" in stdout
    last = max(csv_losses(out / "metrics.csv"))
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in saved] == [last]
    ckpt.verify_checkpoint(saved[-1][1])
    assert not (out / "report.json").exists()
    assert not any(p.name.startswith(".tmp") for p in Path(out / "checkpoints").iterdir())
