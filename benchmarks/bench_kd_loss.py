"""Fused LM head + KD loss (Tessera's Triton path) against two torch paths, forward + backward.

    python benchmarks/bench_kd_loss.py --out kd_loss.json
    python benchmarks/bench_kd_loss.py --loss jsd --temperature 1.0 --reps 5

Shapes (N tokens, V vocabulary, student dim, teacher dim): (8192, 128256, 2048, 4096) and
(8192, 49152, 576, 960), bf16 hidden states and LM head weights, teacher given as hidden
states and its LM head (both heads applied inside the loss), forward KL with τ = 2 by
default, a mask keeping ~90% of the tokens. Implementations:

- `naive-fp32`: the whole `[N, V]` student and teacher logits, upcast to fp32,
  `F.kl_div` of the log-softmaxes, masked mean (times τ²);
- `torch-chunked`: `tessera.distill.losses.kd_loss_from_hidden` (the op's reference:
  chunks of 4096 tokens under activation checkpointing);
- `tessera-fused`: `tessera.kernels.fused_kd_loss.fused_linear_kd_loss`.

Each row times `loss = f(...); loss.backward()` (gradients of the student's hidden states
and LM head weight) with CUDA events: median of `--reps` runs after two warm-up runs.
Peak extra memory is `torch.cuda.max_memory_allocated()` during one such run minus the
memory allocated before it (the inputs), so it counts the gradients too. The ratio
columns divide a baseline's time by a row's time (> 1: faster than that baseline). Each
implementation's loss and gradients are compared with `torch-chunked`'s first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import add_speedups, kernel_bench_main  # noqa: E402  (beside this script)

from tessera.distill.losses import kd_loss_from_hidden  # noqa: E402
from tessera.kernels.fused_kd_loss import fused_linear_kd_loss  # noqa: E402

SHAPES = ((8192, 128256, 2048, 4096), (8192, 49152, 576, 960))
BASELINES = ("naive-fp32", "torch-chunked")
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=("forward_kl", "reverse_kl", "jsd"),
                        default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-naive", action="store_true", help="(it needs ~30 GB)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def make_inputs(shape: tuple[int, int, int, int]) -> dict:
    num_tokens, vocab, dim, teacher_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *size, scale=1.0: (scale * torch.randn(*size, device="cuda",
                                                          generator=gen)).bfloat16()
    return dict(student_hidden=randn(num_tokens, dim).requires_grad_(),
                student_lm_head_weight=randn(vocab, dim, scale=dim**-0.5).requires_grad_(),
                teacher_hidden=randn(num_tokens, teacher_dim),
                teacher_lm_head_weight=randn(vocab, teacher_dim, scale=2 * teacher_dim**-0.5),
                mask=torch.rand(num_tokens, device="cuda", generator=gen) < 0.9)


def naive_fp32(args: argparse.Namespace, student_hidden, student_lm_head_weight,
               teacher_hidden, teacher_lm_head_weight, mask) -> torch.Tensor:
    tau = args.temperature
    student = (student_hidden @ student_lm_head_weight.t()).float()
    with torch.no_grad():
        teacher = (teacher_hidden @ teacher_lm_head_weight.t()).float()
    log_q = F.log_softmax(student / tau, dim=-1)
    log_p = F.log_softmax(teacher / tau, dim=-1)
    rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (rows * mask).sum() / mask.sum().clamp_min(1) * tau * tau


def implementations(args: argparse.Namespace) -> dict:
    options = dict(loss=args.loss, temperature=args.temperature)
    impls = {"naive-fp32": lambda **kw: naive_fp32(args, **kw),
             "torch-chunked": lambda **kw: kd_loss_from_hidden(**kw, **options),
             "tessera-fused": lambda **kw: fused_linear_kd_loss(**kw, **options)}
    if args.skip_naive or args.loss != "forward_kl":  # the naive path is forward KL only
        del impls["naive-fp32"]
    return impls


def run_once(fn, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [inputs["student_hidden"], inputs["student_lm_head_weight"]]
    for leaf in leaves:
        leaf.grad = None
    loss = fn(**inputs)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def time_ms(fn, inputs: dict, reps: int) -> float:
    for _ in range(2):
        run_once(fn, inputs)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(fn, inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_gib(fn, inputs: dict) -> float:
    for leaf in (inputs["student_hidden"], inputs["student_lm_head_weight"]):
        leaf.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-30)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def bench_shape(args: argparse.Namespace, shape: tuple[int, int, int, int]) -> list[dict]:
    inputs = make_inputs(shape)
    impls = implementations(args)
    ref_loss, ref_grads = run_once(impls["torch-chunked"], inputs)
    ref_grads = [g.clone() for g in ref_grads]
    rows = []
    for name, fn in impls.items():
        loss, grads = run_once(fn, inputs)
        errors = [max_rel_error(loss, ref_loss)] + [max_rel_error(g, r)
                                                     for g, r in zip(grads, ref_grads,
                                                                     strict=True)]
        del loss, grads
        memory = peak_extra_gib(fn, inputs)
        ms = time_ms(fn, inputs, args.reps)
        rows.append({"tokens": shape[0], "vocab": shape[1], "dim": shape[2],
                     "teacher_dim": shape[3], "impl": name, "ms": ms, "peak_extra_gib": memory,
                     "rel_err_loss": errors[0], "rel_err_dhidden": errors[1],
                     "rel_err_dweight": errors[2]})
        torch.cuda.empty_cache()
    return add_speedups(rows, BASELINES)


def print_table(rows: list[dict]) -> None:
    print(f"{'V':>6} {'d/dt':>9} {'impl':14} {'ms':>8} {'GiB':>6} {'err loss/dh/dW':>24}"
          + "".join(f" {'vs ' + b:>16}" for b in BASELINES))
    for r in rows:
        errs = f"{r['rel_err_loss']:.0e}/{r['rel_err_dhidden']:.0e}/{r['rel_err_dweight']:.0e}"
        ratios = "".join(f" {r['speedup_vs'].get(b, float('nan')):>15.2f}x" for b in BASELINES)
        print(f"{r['vocab']:6d} {r['dim']:4d}/{r['teacher_dim']:<4d} {r['impl']:14} "
              f"{r['ms']:8.2f} {r['peak_extra_gib']:6.2f} {errs:>24}{ratios}")


def run(args: argparse.Namespace) -> list[dict]:
    return [row for shape in SHAPES for row in bench_shape(args, shape)]


def main() -> None:
    kernel_bench_main("bench_kd_loss.py", parse_args(), run, print_table)


if __name__ == "__main__":
    main()
