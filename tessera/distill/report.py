"""What a run leaves behind for people: scalar logs, `report.json`, a loss-curve PNG, and
the before/after table.

`ScalarLog` appends one CSV row per logged step to `metrics.csv` and per evaluation to
`eval.csv` (values written with `repr`, so floats round-trip exactly), flushed at once so a
killed run keeps every row it logged. When a run resumes from step k it first drops rows
past k, so the files read as one uninterrupted run. The same scalars go to TensorBoard when
`torch.utils.tensorboard` imports (install `tensorboard`); otherwise that is skipped with a
note. `plot_loss_curve` draws `loss_curve.png` with matplotlib when it is installed.

This module knows nothing about models or training; it formats and writes what it is given.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TRAIN_CSV = "metrics.csv"
EVAL_CSV = "eval.csv"
REPORT = "report.json"
LOSS_PNG = "loss_curve.png"


class ScalarLog:
    """CSV (and optional TensorBoard) scalars for one run directory."""

    def __init__(self, directory: str | Path, *, resume_step: int | None = None,
                 tensorboard: bool = True, note: Callable[[str], None] = print):
        """`resume_step` None starts the files afresh; k keeps the rows of steps <= k."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (TRAIN_CSV, EVAL_CSV):
            if resume_step is None:
                (self.directory / name).unlink(missing_ok=True)
            else:
                truncate_csv(self.directory / name, resume_step)
        self.writer = _tensorboard_writer(self.directory / "tensorboard", resume_step or 0,
                                          note) if tensorboard else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._append(TRAIN_CSV, step, values, "train")

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        self._append(EVAL_CSV, step, values, "eval")

    def _append(self, name: str, step: int, values: dict[str, Any], group: str) -> None:
        row = {"step": step, **values}
        append_csv_row(self.directory / name, row)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(directory: Path, resume_step: int, note: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note("TensorBoard logging is off: `pip install tensorboard` to enable it "
             "(CSV scalars are written either way)")
        return None
    return SummaryWriter(str(directory), purge_step=resume_step + 1 if resume_step else None)


def append_csv_row(path: Path, row: dict[str, Any]) -> None:
    """Append `row`; the first row fixes the header. Floats are written with `repr`."""
    is_new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if is_new:
            writer.writeheader()
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        f.flush()


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate_csv(path: Path, last_step: int) -> None:
    """Keep only the rows with step <= `last_step` (rewritten atomically)."""
    if not path.exists():
        return
    rows = read_csv(path)
    kept = [r for r in rows if int(r["step"]) <= last_step]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def plot_loss_curve(directory: str | Path, note: Callable[[str], None] = print) -> Path | None:
    """`loss_curve.png` from `metrics.csv` (and eval perplexity, if any); None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("no loss-curve PNG: `pip install matplotlib` to draw it (the numbers are in "
             f"{TRAIN_CSV})")
        return None
    directory = Path(directory)
    rows = read_csv(directory / TRAIN_CSV)
    evals = read_csv(directory / EVAL_CSV)
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4),
                             squeeze=False)
    _plot_train(axes[0][0], rows)
    if evals:
        _plot_eval(axes[0][1], evals)
    fig.tight_layout()
    out = directory / LOSS_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_train(ax, rows: Sequence[dict[str, str]]) -> None:
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "soft", "ce"):
        if rows and key in rows[0] and any(float(r[key]) for r in rows):
            ax.plot(steps, [float(r[key]) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_eval(ax, rows: Sequence[dict[str, str]]) -> None:
    steps = [int(r["step"]) for r in rows]
    ax.plot(steps, [float(r["ppl"]) for r in rows], "o-", label="student")
    if "teacher_ppl" in rows[0]:
        ax.plot(steps, [float(r["teacher_ppl"]) for r in rows], "--", label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("held-out perplexity")
    ax.legend()
    ax.grid(alpha=0.3)


def format_comparison(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """A fixed-width table of evaluation metrics, one row per (name, metrics)."""
    header = f"{'model':<26} {'ppl':>9} {'KL(teacher||model)':>19} {'top-1 agree':>12}"
    lines = [header, "-" * len(header)]
    for name, m in rows:
        kl = f"{m['kl']:.4f}" if m.get("kl") is not None else "-"
        agree = f"{100 * m['agreement']:.1f}%" if m.get("agreement") is not None else "-"
        lines.append(f"{name:<26} {m['ppl']:>9.3f} {kl:>19} {agree:>12}")
    return "\n".join(lines)
