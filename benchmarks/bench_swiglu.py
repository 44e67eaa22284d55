"""SwiGLU kernel (Tessera's Triton) against eager torch `F.silu(gate) * up` and a copy ceiling.

    python benchmarks/bench_swiglu.py --out swiglu.json
    python benchmarks/bench_swiglu.py --rows 4096 --width 14336 --dtype fp16

Defaults: gate and up of M=8192 tokens x F=11008, bf16, on one CUDA device. `fwd` reads
gate and up and writes y; `bwd` reads dy, gate and up and writes dgate and dup. GB/s counts
those tensors once each for every implementation (effective bandwidth); `copy` moves the
same bytes with `copy_`, the practical ceiling. Timing: CUDA events via
`triton.testing.do_bench`, median after warm-up, L2 flushed between runs. The ratio columns
divide a baseline's time by a row's time (> 1 means faster than that baseline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import kernel_bench_main, print_pass_table, time_passes  # noqa: E402

from tessera.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSORS_MOVED = {"fwd": 3, "bwd": 5}  # [M, F] tensors read plus written
BASELINES = ("torch-eager", "copy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--width", type=int, default=11008)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def cases(gate, up, dy) -> dict[str, dict[str, object]]:
    """pass -> implementation -> zero-argument callable."""
    def backward(fn):
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        y = fn(g, u)
        return lambda: torch.autograd.grad(y, (g, u), dy, retain_graph=True)

    return {
        "fwd": {"tessera-triton": lambda: swiglu(gate, up),
                "torch-eager": lambda: swiglu_reference(gate, up)},
        "bwd": {"tessera-triton": backward(swiglu), "torch-eager": backward(swiglu_reference)},
    }


def run(args: argparse.Namespace) -> list[dict]:
    dtype, shape = DTYPES[args.dtype], (args.rows, args.width)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, dy = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
                    for _ in range(3))
    with torch.no_grad():
        error = (swiglu(gate, up).float() - swiglu_reference(gate, up).float()).abs().max()
    print(f"max |tessera - eager| forward: {error.item():.2e}")
    return time_passes(cases(gate, up, dy), gate, TENSORS_MOVED, BASELINES)


def main() -> None:
    kernel_bench_main("bench_swiglu.py", parse_args(), run,
                      lambda rows: print_pass_table(rows, BASELINES))


if __name__ == "__main__":
    main()
