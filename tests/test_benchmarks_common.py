"""The shared benchmark helpers: ratio columns per group, and the copy ceiling's bytes."""

from __future__ import annotations

import torch

from benchmarks._common import add_speedups, copy_ceiling


def test_speedups_are_baseline_time_over_row_time_within_each_group():
    rows = [{"pass": "fwd", "impl": "eager", "ms": 4.0},
            {"pass": "fwd", "impl": "triton", "ms": 1.0},
            {"pass": "bwd", "impl": "eager", "ms": 9.0},
            {"pass": "bwd", "impl": "triton", "ms": 3.0},
            {"pass": "bwd", "impl": "copy", "ms": 1.5}]
    add_speedups(rows, ("eager", "copy"), group=lambda row: row["pass"])
    assert rows[1]["speedup_vs"] == {"eager": 4.0}  # no copy row in the fwd group
    assert rows[3]["speedup_vs"] == {"eager": 3.0, "copy": 0.5}
    assert rows[2]["speedup_vs"] == {"eager": 1.0, "copy": 1.5 / 9.0}


def test_one_group_by_default():
    rows = [{"impl": "naive", "ms": 2.0}, {"impl": "fused", "ms": 0.5}]
    add_speedups(rows, ("naive",))
    assert [r["speedup_vs"]["naive"] for r in rows] == [1.0, 4.0]


def test_copy_ceiling_moves_the_given_number_of_tensors():
    like = torch.randn(6, 10)
    copy = copy_ceiling(like, 3)
    out = copy()
    assert out.numel() * 2 == 3 * like.numel()  # read once, written once: 3 tensors' bytes
