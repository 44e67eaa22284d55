"""A distillation long enough to matter, on one GPU, with a teacher trained there first.

    python benchmarks/distill_quality_gpu.py --tokenizer DIR --out quality.json
    python benchmarks/distill_quality_gpu.py --tokenizer DIR --preset student-tiny \
        --teacher-steps 4 --student-steps 4 --seq-len 64 --batch 4 --device cpu   # smoke run

Where a pretrained teacher cannot be carried to the machine, it is trained there: three
`tessera distill` runs on the Python standard library, one after the other.

1. Teacher: a fresh model of `--preset` (random init, embeddings trained) on hard-label
   cross-entropy alone (`loss.kd_weight=0`: no teacher forward), `--teacher-steps` steps.
   The "teacher" of this run is only the tokenizer's carrier: a random model of the same
   preset written beside it.
2. KD student: every other layer of the trained teacher, KD (forward KL) + CE,
   `--student-steps` steps.
3. CE-only twin: the same student and steps with `loss.kd_weight=0`.

Every run evaluates before and after on the held-out split (perplexity, KL to its
teacher, top-1 agreement); the table compares the teacher, the two students at init and
after. Tokens/s are the trainer's own. Everything is written under `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import tessera
from tessera.checkpoint.loader import LoadedModel
from tessera.config import get_preset
from tessera.distill.run_config import load_run_config
from tessera.distill.trainer import distill
from tessera.model.transformer import build_model
from tessera.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--preset", default="smollm2-135m", help="the teacher's shape")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--student-lr", type=float, default=5e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def write_seed_teacher(preset: str, tokenizer_dir: str, directory: Path) -> None:
    """A random model of `preset` with the tokenizer: the tokenizer's carrier for run 1."""
    config = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(config)
    tessera.save(LoadedModel(model=model, tokenizer=Tokenizer.from_dir(tokenizer_dir),
                             config=config, source=preset), directory)


def run(name: str, work: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    micro = args.micro_batch or args.batch
    common = [
        f"output_dir={work / name}", f"data.shard_dir={work / 'shards'}",
        f"data.seq_len={args.seq_len}", "data.num_workers=8",
        f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={micro}",
        f"trainer.device={args.device}", "trainer.checkpoint_every=0",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.warmup_steps=20",
        "eval.num_sequences=64", f"eval.micro_batch_size={micro}",
    ]
    report = distill(load_run_config(None, common + overrides))
    if not report:
        report = json.loads((work / name / "report.json").read_text())
    return report


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-quality-"))
    write_seed_teacher(args.preset, args.tokenizer, work / "seed")
    teacher = run("teacher", work, args, [
        f"teacher={work / 'seed'}", "student.keep_every=null", f"student.preset={args.preset}",
        "loss.kd_weight=0", "loss.ce_weight=1", "trainer.train_embeddings=true",
        f"trainer.max_steps={args.teacher_steps}", f"trainer.lr={args.teacher_lr}"])
    students = {
        kind: run(kind, work, args, [
            f"teacher={work / 'teacher' / 'student'}", "student.keep_every=2",
            "loss.loss=forward_kl", f"loss.kd_weight={kd}", "loss.ce_weight=1",
            f"trainer.max_steps={args.student_steps}", f"trainer.lr={args.student_lr}"])
        for kind, kd in (("kd", 1.0), ("ce", 0.0))}
    # Run 1's "teacher" was the random seed: its KL and agreement mean nothing.
    trained = {**teacher["metrics"]["after"], "kl": None, "agreement": None}
    rows = [("teacher (trained here)", trained, teacher)]
    rows.append(("student at init", students["kd"]["metrics"]["before"], students["kd"]))
    rows += [(f"student, {kind.upper()}{' + CE' if kind == 'kd' else '-only'}",
              students[kind]["metrics"]["after"], students[kind]) for kind in ("kd", "ce")]
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "args": vars(args),
              "rows": [{"model": name, **metrics,
                        "train_tokens_per_s": report["timings"]["train_tokens_per_s"]}
                       for name, metrics, report in rows]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'model':<26}{'held-out ppl':>14}{'KL(t||s)':>10}{'agree':>8}{'train tok/s':>13}")
    for row in result["rows"]:
        kl = f"{row['kl']:.3f}" if row.get("kl") is not None else "-"
        agree = f"{100 * row['agreement']:.1f}%" if row.get("agreement") is not None else "-"
        print(f"{row['model']:<26}{row['ppl']:>14.3f}{kl:>10}{agree:>8}"
              f"{row['train_tokens_per_s'] or 0:>13.0f}")


if __name__ == "__main__":
    main()
