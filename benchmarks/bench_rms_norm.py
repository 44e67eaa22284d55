"""RMSNorm kernels (Tessera's Triton) against `F.rms_norm`, eager torch and a copy ceiling.

    python benchmarks/bench_rms_norm.py --out rms_norm.json
    python benchmarks/bench_rms_norm.py --rows 32768 --width 2048

Defaults: M=8192 rows of H=4096, bf16, on one CUDA device. Three passes:

- `fwd`: y = rms_norm(x) * w;
- `add_fwd`: (y, s) = (rms_norm(x + r) * w, x + r), against the unfused add then norm;
- `bwd`: dx and dw of `fwd` from dy.

GB/s counts the bytes each pass must move at least (every [M, H] tensor read or written
once; the weight and per-row statistics are ignored), the same count for every
implementation, so it compares effective bandwidth. `copy` is `y.copy_(x)` sized to the
same bytes, the practical bandwidth ceiling. Timing: CUDA events via
`triton.testing.do_bench`, median after warm-up, L2 flushed between runs. The ratio columns
divide a baseline's time by a row's time (> 1 means faster than that baseline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import add_speedups, copy_ceiling, kernel_bench_main  # noqa: E402  (beside this script)
from triton.testing import do_bench  # noqa: E402

from tessera.kernels.rms_norm import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6
# pass -> how many [M, H] tensors it reads plus writes
TENSORS_MOVED = {"fwd": 2, "add_fwd": 4, "bwd": 3}
BASELINES = ("torch-F.rms_norm", "copy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def cases(x, r, w, dy) -> dict[str, dict[str, object]]:
    """pass -> implementation -> zero-argument callable."""
    def backward(norm):
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = norm(xg, wg)
        return lambda: torch.autograd.grad(y, (xg, wg), dy, retain_graph=True)

    f_rms_norm = lambda x_, w_: F.rms_norm(x_, (x_.shape[-1],), w_, EPS)
    return {
        "fwd": {"tessera-triton": lambda: rms_norm(x, w, EPS),
                "torch-F.rms_norm": lambda: f_rms_norm(x, w),
                "torch-eager": lambda: rms_norm_reference(x, w, EPS)},
        "add_fwd": {"tessera-triton": lambda: add_rms_norm(x, r, w, EPS),
                    "torch-F.rms_norm": lambda: (f_rms_norm(x + r, w), x + r),
                    "torch-eager": lambda: add_rms_norm_reference(x, r, w, EPS)},
        "bwd": {"tessera-triton": backward(lambda x_, w_: rms_norm(x_, w_, EPS)),
                "torch-F.rms_norm": backward(f_rms_norm),
                "torch-eager": backward(lambda x_, w_: rms_norm_reference(x_, w_, EPS))},
    }


def max_error(x, w) -> float:
    """Tessera's forward against the eager reference (same rounding points)."""
    with torch.no_grad():
        error = rms_norm(x, w, EPS).float() - rms_norm_reference(x, w, EPS).float()
    return error.abs().max().item()


def run(args: argparse.Namespace) -> list[dict]:
    dtype, shape = DTYPES[args.dtype], (args.rows, args.width)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, r, dy = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    w = (1 + 0.1 * torch.randn(args.width, device="cuda", generator=gen)).to(dtype)
    print(f"max |tessera - eager| forward: {max_error(x, w):.2e}")
    rows = []
    for direction, impls in cases(x, r, w, dy).items():
        num_bytes = TENSORS_MOVED[direction] * x.numel() * x.element_size()
        impls = {**impls, "copy": copy_ceiling(x, TENSORS_MOVED[direction])}
        for name, fn in impls.items():
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            rows.append({"pass": direction, "impl": name, "ms": ms, "gbps": num_bytes / ms / 1e6})
    return add_speedups(rows, BASELINES, group=lambda row: row["pass"])


def print_table(rows: list[dict]) -> None:
    print(f"{'pass':7} {'impl':17} {'ms':>8} {'GB/s':>7}"
          + "".join(f" {'vs ' + b:>19}" for b in BASELINES))
    for r in rows:
        ratios = "".join(f" {r['speedup_vs'][b]:>18.2f}x" for b in BASELINES)
        print(f"{r['pass']:7} {r['impl']:17} {r['ms']:8.4f} {r['gbps']:7.0f}{ratios}")


def main() -> None:
    kernel_bench_main("bench_rms_norm.py", parse_args(), run, print_table)


if __name__ == "__main__":
    main()
