"""FSDP2 distillation on several ranks against one process: loss parity, throughput scaling,
and a sharded checkpoint resumed on one rank and on several, all through real processes.

    python benchmarks/multi_gpu_distill.py --tokenizer DIR --nproc 2 --out results.json
    python benchmarks/multi_gpu_distill.py --device cpu --config configs/tiny.yaml \\
        --overrides teacher=DIR 'data.corpus=["CORPUS"]'      # gloo, a smoke run

Four runs of `tessera distill`, all with the same configuration and global batch:

1. `one`: one process (`CUDA_VISIBLE_DEVICES=0` on GPUs) for `--steps` steps;
2. `many`: `torchrun --nproc_per_node N` (NCCL on GPUs, gloo on CPU), FSDP2-sharded student,
   the same steps, a checkpoint every `--checkpoint-step` (`torch.distributed.checkpoint`
   directories);
3. `resume_one`: a copy of `many`'s directory cut back to its first checkpoint, continued
   by one process (DCP reshards N -> 1);
4. `resume_many`: the same copy continued by N ranks.

Reported: per-step losses of every run; the largest difference of `many` from `one`
(absolute and relative to the loss); the continued losses of both resumptions against
`many`'s own; and the median tokens/s of the steps after `--warmup` in `one` and `many`
(the scaling ratio; `many` counts the tokens of all ranks).

Without `teacher=` among the overrides, a random-weight teacher of `--teacher-preset`
(default Llama-3.2-1B) is written with `--tokenizer`, as in `bench_distill_gpu.py`; the
student is then every other teacher layer, the corpus the Python standard library, bf16
autocast, the fused linear KD loss plus hard-label CE. NVLink multicast stays off in every
child (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = ("one", "many", "resume_one", "resume_many")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default=None, help="base YAML (default: quickstart)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for the random teacher")
    parser.add_argument("--teacher-preset", default="llama-3.2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-step", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON report (logs beside it)")
    args = parser.parse_args(argv)
    if args.nproc < 2:
        parser.error("--nproc must be at least 2")
    if not 0 < args.checkpoint_step < args.steps:
        parser.error("--checkpoint-step must lie between 0 and --steps")
    if args.tokenizer is None and not any(o.startswith("teacher=") for o in args.overrides):
        parser.error("give --tokenizer (for a random teacher) or a teacher= override")
    return args


def write_random_teacher(args: argparse.Namespace, directory: Path) -> None:
    sys.path[:0] = [str(REPO), str(Path(__file__).parent)]
    from bench_distill_gpu import write_teacher

    write_teacher(args.teacher_preset, args.tokenizer, directory)


def run_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The overrides every run shares (its output_dir comes last, per run)."""
    shared = [f"data.seq_len={args.seq_len}", f"data.shard_dir={work / 'shards'}",
              f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.global_batch}",
              f"trainer.micro_batch_size={args.micro_batch}",
              f"trainer.checkpoint_every={args.checkpoint_step}", "trainer.keep_last=10",
              f"trainer.device={args.device}", "trainer.progress=false",
              "trainer.tensorboard=false", "eval.num_sequences=4",
              f"eval.micro_batch_size={args.micro_batch}"]
    if args.tokenizer is not None:
        shared += [f"teacher={work / 'teacher'}", "student.keep_every=2", "data.num_workers=8",
                   "loss.loss=forward_kl", "loss.kd_weight=1.0", "loss.ce_weight=1.0",
                   "trainer.warmup_steps=2", "trainer.train_embeddings=false"]
    return shared + list(args.overrides)


def child_env(args: argparse.Namespace, single: bool) -> dict[str, str]:
    env = dict(os.environ) | NO_MULTICAST
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # autotune once, not in every process
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # bitwise-stable CPU math between processes
    elif single:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def distill(args: argparse.Namespace, overrides: list[str], out: Path, nproc: int,
            log: Path) -> float:
    """One `tessera distill` run (torchrun when nproc > 1); returns its wall seconds."""
    command = [sys.executable, "-m", "tessera.cli", "distill"]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "tessera.cli", "distill"]
    if args.config:
        command += ["--config", args.config]
    command += [*overrides, f"output_dir={out}"]
    started = time.perf_counter()
    with open(log, "w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                              env=child_env(args, nproc == 1))
    if done.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{log.stem} failed (exit {done.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started


def read_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): {"loss": float(r["loss"]),
                                 "tokens_per_s": float(r["tokens_per_s"])}
                for r in csv.DictReader(f)}


def cut_back(source: Path, target: Path, step: int) -> None:
    """Copy a run directory keeping only checkpoints up to `step` (checkpoint files are
    hard links: a resumed run writes new checkpoints and never rewrites old files)."""
    def link_or_copy(src: str, dst: str) -> None:
        if f"{os.sep}checkpoints{os.sep}" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    for path in (target / "checkpoints").iterdir():
        name = path.name.removeprefix("step-")
        if name.isdigit() and int(name) > step:
            shutil.rmtree(path)
    (target / "report.json").unlink(missing_ok=True)


def loss_gap(run: dict[int, dict[str, float]], reference: dict[int, dict[str, float]],
             steps: range) -> dict[str, float]:
    """Largest |loss - reference loss| over `steps`, absolute and relative."""
    missing = [s for s in steps if s not in run or s not in reference]
    if missing:
        raise SystemExit(f"steps {missing} are missing from a run's metrics.csv")
    gaps = [abs(run[s]["loss"] - reference[s]["loss"]) for s in steps]
    relative = [g / abs(reference[s]["loss"]) for g, s in zip(gaps, steps, strict=True)]
    return {"max_abs": max(gaps), "max_rel": max(relative)}


def median_speed(run: dict[int, dict[str, float]], warmup: int) -> float:
    return statistics.median(v["tokens_per_s"] for s, v in run.items() if s > warmup)


def compare(args: argparse.Namespace, runs: dict[str, dict]) -> dict[str, object]:
    all_steps = range(1, args.steps + 1)
    continued = range(args.checkpoint_step + 1, args.steps + 1)
    one, many = runs["one"], runs["many"]
    return {
        "parity_many_vs_one": loss_gap(many, one, all_steps),
        "resume_one_vs_many": loss_gap(runs["resume_one"], many, continued),
        "resume_many_vs_many": loss_gap(runs["resume_many"], many, continued),
        "tokens_per_s_one": median_speed(one, args.warmup),
        "tokens_per_s_many": median_speed(many, args.warmup),
        "scaling": median_speed(many, args.warmup) / median_speed(one, args.warmup),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-multi-"))
    if any((work / name).exists() for name in RUNS):
        raise SystemExit(f"{work} holds runs of an earlier call (they would resume); "
                         "give an empty --workdir")
    logs = Path(args.out).parent if args.out else work
    logs.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is not None:
        write_random_teacher(args, work / "teacher")
    overrides = run_overrides(args, work)
    single = [*overrides, "trainer.checkpoint_every=0"]  # it is never resumed
    walls = {"one": distill(args, single, work / "one", 1, logs / "one.log"),
             "many": distill(args, overrides, work / "many", args.nproc, logs / "many.log")}
    for name, nproc in (("resume_one", 1), ("resume_many", args.nproc)):
        cut_back(work / "many", work / name, args.checkpoint_step)
        walls[name] = distill(args, overrides, work / name, nproc, logs / f"{name}.log")
        if "resumed from" not in (logs / f"{name}.log").read_text():
            raise SystemExit(f"{name} did not resume from a checkpoint; see its log")
    runs = {name: read_steps(work / name) for name in walls}
    result = {"device": args.device, "nproc": args.nproc, "arguments": vars(args),
              "overrides": overrides, "wall_s": walls, **compare(args, runs),
              "losses": {name: {s: v["loss"] for s, v in run.items()}
                         for name, run in runs.items()},
              "tokens_per_s": {name: {s: v["tokens_per_s"] for s, v in run.items()}
                               for name, run in runs.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    n = result["nproc"]
    print(f"{'check':<34}{'max |d loss|':>14}{'max rel':>10}")
    for key, label in (("parity_many_vs_one", f"{n} ranks vs 1 (all steps)"),
                       ("resume_one_vs_many", f"resumed on 1 vs {n}-rank run"),
                       ("resume_many_vs_many", f"resumed on {n} vs {n}-rank run")):
        gap = result[key]
        print(f"{label:<34}{gap['max_abs']:>14.3e}{gap['max_rel']:>10.2e}")
    print(f"tokens/s: 1 process {result['tokens_per_s_one']:,.0f}, {n} ranks "
          f"{result['tokens_per_s_many']:,.0f} -> {result['scaling']:.2f}x")


if __name__ == "__main__":
    main()
