"""Flash attention (Tessera's Triton kernel) against PyTorch SDPA's flash and cuDNN backends.

    python benchmarks/bench_attention.py --out attention.json
    python benchmarks/bench_attention.py --no-causal --seq-len 8192 --batch 2 --head-dim 64

Defaults: causal, B=4, H=16 (KVH=H), T=4096, D=128, bf16, on one CUDA device. Forward and
backward are timed separately with CUDA events (`triton.testing.do_bench`, median after
warm-up; the first Triton call autotunes outside the timing). FLOPs count the two matmuls,
4·B·H·T²·D for a full score matrix, halved when causal; the backward counts 2.5x the forward.
The ratio columns divide each baseline's time by a row's time (> 1 means faster than that
baseline). Every implementation's output is compared with SDPA-flash's before timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import add_speedups, kernel_bench_main  # noqa: E402  (beside this script)
from triton.testing import do_bench  # noqa: E402

from tessera.kernels.flash_attention import flash_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BASELINES = ("sdpa-flash", "sdpa-cudnn")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def implementations(args: argparse.Namespace) -> dict:
    """name -> f(q, k, v) on `[B, T, H, D]` tensors, returning `[B, T, H, D]`."""
    gqa = (args.kv_heads or args.heads) != args.heads

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    is_causal=args.causal, enable_gqa=gqa)
            return out.transpose(1, 2)
        return run

    return {"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "tessera-triton": lambda q, k, v: flash_attention(q, k, v, causal=args.causal)}


def make_inputs(args: argparse.Namespace, layout_for: str):
    """q, k, v, dout. SDPA gets tensors that are contiguous in its own `[B, H, T, D]`
    layout (passed as transposed views); Tessera gets contiguous `[B, T, H, D]`."""
    dtype, kv_heads = DTYPES[args.dtype], args.kv_heads or args.heads
    shapes = [(args.batch, args.seq_len, h, args.head_dim)
              for h in (args.heads, kv_heads, kv_heads, args.heads)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = []
    for shape in shapes:
        t = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        if layout_for.startswith("sdpa"):
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        tensors.append(t)
    return tensors


def forward_flops(args: argparse.Namespace) -> float:
    flops = 4.0 * args.batch * args.heads * args.seq_len**2 * args.head_dim
    return flops / 2 if args.causal else flops


def time_impl(fn, args: argparse.Namespace, name: str) -> dict[str, float]:
    q, k, v, dout = make_inputs(args, name)
    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(q, k, v), warmup=100, rep=500, return_mode="median")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    bwd_ms = do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
                      warmup=100, rep=500, return_mode="median")
    return {"fwd": fwd_ms, "bwd": bwd_ms}


def max_error_vs_sdpa_flash(fn, args: argparse.Namespace, name: str) -> float:
    reference = implementations(args)["sdpa-flash"]
    with torch.no_grad():
        expected = reference(*make_inputs(args, "sdpa")[:3])
        actual = fn(*make_inputs(args, name)[:3])  # same values, another layout
    return (actual.float() - expected.float()).abs().max().item()


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, fn in implementations(args).items():
        try:
            error = max_error_vs_sdpa_flash(fn, args, name)
            times = time_impl(fn, args, name)
        except RuntimeError as exc:  # e.g. a backend this build or GPU does not have
            print(f"{name}: unavailable ({str(exc).splitlines()[0]})", file=sys.stderr)
            continue
        for direction, ms in times.items():
            flops = forward_flops(args) * (2.5 if direction == "bwd" else 1.0)
            rows.append({"pass": direction, "impl": name, "ms": ms,
                         "tflops": flops / ms / 1e9, "max_abs_err_vs_sdpa_flash": error})
    return add_speedups(rows, BASELINES, group=lambda row: row["pass"])


def print_table(rows: list[dict]) -> None:
    header = f"{'pass':4} {'impl':15} {'ms':>9} {'TFLOP/s':>8} {'max err':>8}"
    print(header + "".join(f" {'vs ' + b:>14}" for b in BASELINES))
    for r in rows:
        ratios = "".join(f" {r['speedup_vs'].get(b, float('nan')):>13.2f}x" for b in BASELINES)
        print(f"{r['pass']:4} {r['impl']:15} {r['ms']:9.3f} {r['tflops']:8.1f} "
              f"{r['max_abs_err_vs_sdpa_flash']:8.1e}{ratios}")


def main() -> None:
    kernel_bench_main("bench_attention.py", parse_args(), run, print_table)


if __name__ == "__main__":
    main()
