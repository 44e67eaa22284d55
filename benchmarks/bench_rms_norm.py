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
from _common import kernel_bench_main, print_pass_table, time_passes  # noqa: E402

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
    return time_passes(cases(x, r, w, dy), x, TENSORS_MOVED, BASELINES)


def main() -> None:
    kernel_bench_main("bench_rms_norm.py", parse_args(), run,
                      lambda rows: print_pass_table(rows, BASELINES))


if __name__ == "__main__":
    main()
