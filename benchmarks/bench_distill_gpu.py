"""Distillation speed on one GPU: tokens/s and MFU of `tessera distill` steps.

    python benchmarks/bench_distill_gpu.py --tokenizer DIR --out results.json
    python benchmarks/bench_distill_gpu.py --tokenizer DIR --teacher-preset smollm2-135m

A random-weight teacher of a real shape (default: Llama-3.2-1B) is written as an HF
directory with the given tokenizer (any tokenizer whose ids fit the vocabulary), then the
real trainer runs on it: the student is every other teacher layer, the corpus the Python
standard library, packed `--seq-len` sequences with document masking (variable-length
flash attention), bf16 autocast, the fused linear KD loss (forward KL) plus hard-label CE.
Speed does not depend on the weight values.

Model FLOPs per token (the convention of the PaLM paper's MFU): the teacher's forward,
`2 N_t + 2 d_t V` (the LM head applied inside the fused loss), plus the student's forward
and backward, `3 (2 N_s)` for its layers and `2 (2 d_s V)` for its frozen (tied, teacher's)
LM head, whose backward is the input gradient alone, plus attention, `2 L d T` per forward
per token for causal attention over sequences of T (counted as if documents were not
masked, x3 for the student). N counts non-embedding parameters. MFU is the achieved model
FLOP/s over the bf16 GEMM rate measured in the same run (8192^3 matmul). The median of the
steps after the first `--warmup` is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tessera
from tessera.checkpoint.loader import LoadedModel
from tessera.config import ModelConfig, get_preset
from tessera.distill.report import TRAIN_CSV, read_csv
from tessera.distill.run_config import load_run_config
from tessera.distill.trainer import distill
from tessera.model.transformer import build_model
from tessera.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--teacher-preset", default="llama-3.2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra KEY=VALUE")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def gemm_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3)


def flops_per_token(teacher: ModelConfig, student: ModelConfig, seq_len: int, *,
                    head_trains: bool) -> float:
    """Teacher forward + student forward and backward; the student's LM head backward is
    one product (the input gradient) when the head is frozen, two when it trains."""
    def body(c: ModelConfig) -> float:
        attention = 2 * c.num_layers * c.num_heads * c.head_dim * seq_len  # causal: half
        return 2 * c.num_parameters(include_embeddings=False) + attention

    def head(c: ModelConfig) -> float:
        return 2 * c.hidden_size * c.vocab_size

    student_head = (3 if head_trains else 2) * head(student)
    return body(teacher) + head(teacher) + 3 * body(student) + student_head


def write_teacher(preset: str, tokenizer_dir: str, directory: Path) -> ModelConfig:
    config = get_preset(preset)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    tessera.save(LoadedModel(model=model, tokenizer=tokenizer, config=config,
                             source=preset), directory)
    del model
    torch.cuda.empty_cache()
    return config


def main() -> None:
    args = parse_args()
    peak = gemm_peak()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-distill-bench-"))
    teacher_dir, out_dir = work / "teacher", work / "run"
    teacher_config = write_teacher(args.teacher_preset, args.tokenizer, teacher_dir)
    overrides = [
        f"teacher={teacher_dir}", f"output_dir={out_dir}", "student.keep_every=2",
        f"data.seq_len={args.seq_len}", "data.num_workers=8",
        f"data.shard_dir={work / 'shards'}",
        "loss.loss=forward_kl", "loss.kd_weight=1.0", "loss.ce_weight=1.0",
        f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.global_batch}",
        f"trainer.micro_batch_size={args.micro_batch}", "trainer.warmup_steps=2",
        "trainer.checkpoint_every=0", "trainer.progress=false", "trainer.tensorboard=false",
        "eval.num_sequences=4", f"eval.micro_batch_size={args.micro_batch}",
        "trainer.train_embeddings=false", *args.overrides,
    ]
    started = time.perf_counter()
    distill(load_run_config(None, overrides))
    wall = time.perf_counter() - started
    rows = read_csv(out_dir / TRAIN_CSV)
    steps = [float(r["tokens_per_s"]) for r in rows][args.warmup:]
    tokens_per_s = statistics.median(steps)
    student_config = teacher_config.replace(
        num_layers=len(range(0, teacher_config.num_layers, 2)))  # student.keep_every=2
    flops = flops_per_token(teacher_config, student_config, args.seq_len,
                            head_trains=False)  # trainer.train_embeddings=false
    mfu = tokens_per_s * flops / peak
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "teacher": args.teacher_preset, "student_layers": student_config.num_layers,
              "seq_len": args.seq_len, "global_batch": args.global_batch,
              "micro_batch": args.micro_batch, "steps_measured": len(steps),
              "tokens_per_s": tokens_per_s, "flops_per_token": flops,
              "gemm_peak_flops": peak, "mfu": mfu, "wall_s": wall,
              "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
              "per_step_tokens_per_s": steps}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"teacher {args.teacher_preset} ({teacher_config.num_layers} layers) -> student "
          f"{student_config.num_layers} layers; {args.global_batch} x {args.seq_len} tokens "
          f"per step")
    print(f"{'tokens/s':>10}{'TFLOP/s':>10}{'GEMM peak':>11}{'MFU':>8}{'max mem GiB':>13}")
    print(f"{tokens_per_s:>10.0f}{tokens_per_s * flops / 1e12:>10.1f}{peak / 1e12:>11.1f}"
          f"{100 * mfu:>7.1f}%{result['max_memory_gib']:>13.1f}")


if __name__ == "__main__":
    main()
