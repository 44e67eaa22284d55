"""The shared benchmark helpers: ratio columns per group, the copy ceiling's bytes, and the
elementwise kernels' table."""

from __future__ import annotations

import torch

from benchmarks._common import add_speedups, copy_ceiling, print_pass_table


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


def test_the_pass_table_has_a_line_per_row_with_every_ratio(capsys):
    rows = [{"pass": "fwd", "impl": "torch-eager", "ms": 2.0, "gbps": 100.0},
            {"pass": "add_fwd", "impl": "triton", "ms": 0.5, "gbps": 400.0}]
    for row in rows:
        row["speedup_vs"] = {"torch-eager": 2.0 / row["ms"], "copy": 0.25}
    print_pass_table(rows, ("torch-eager", "copy"))
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["pass", "impl", "ms", "GB/s", "vs", "torch-eager", "vs", "copy"]
    assert [line.split() for line in lines] == [
        ["fwd", "torch-eager", "2.0000", "100", "1.00x", "0.25x"],
        ["add_fwd", "triton", "0.5000", "400", "4.00x", "0.25x"]]
    assert len({len(line) for line in [header, *lines]}) == 1  # aligned columns
