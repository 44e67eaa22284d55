"""Shared pieces of the kernel benchmarks (`bench_<kernel>.py`, run as scripts).

- `add_speedups(rows, baselines, group)`: each row's `speedup_vs[b]`, the time of baseline
  `b` in the row's group over the row's time (> 1: faster than that baseline);
- `copy_ceiling(like, num_tensors)`: a device copy moving the same bytes, the practical
  bandwidth ceiling of a memory-bound kernel;
- `time_passes(cases, like, tensors_moved, baselines)` and `print_pass_table(rows,
  baselines)`: the elementwise kernels' benchmark (each pass's implementations beside a
  copy of its bytes, timed by `do_bench`) and its table;
- `kernel_bench_main(script, args, collect, print_table)`: the scripts' `main`: refuse
  without CUDA, print the device line, collect the rows, print the table, and write the
  JSON report (device, versions, arguments, rows) to `args.out` when given;
- `graph_ms(launches)`: device ms per launch of callables replayed as one CUDA graph, the
  way the engine runs decode kernels (`do_bench` times small launches by host overhead).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Hashable
from pathlib import Path

import torch


def add_speedups(rows: list[dict], baselines: tuple[str, ...],
                 group: Callable[[dict], Hashable] = lambda row: None) -> list[dict]:
    times: dict[tuple[Hashable, str], float] = {(group(r), r["impl"]): r["ms"] for r in rows}
    for row in rows:
        row["speedup_vs"] = {b: times[group(row), b] / row["ms"] for b in baselines
                             if (group(row), b) in times}
    return rows


def copy_ceiling(like: torch.Tensor, num_tensors: int) -> Callable[[], torch.Tensor]:
    """A copy moving `num_tensors` tensors of like's size: half read, half written."""
    src = torch.empty(like.numel() * num_tensors // 2, dtype=like.dtype, device=like.device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def time_passes(cases: dict[str, dict[str, Callable]], like: torch.Tensor,
                tensors_moved: dict[str, int], baselines: tuple[str, ...]) -> list[dict]:
    """Rows of (pass, impl, ms, GB/s) for every implementation of every pass and a copy of
    the pass's bytes (`tensors_moved[pass]` tensors of like's size read plus written), the
    median of `do_bench`, with ratios to `baselines` within each pass."""
    from triton.testing import do_bench

    rows = []
    for direction, impls in cases.items():
        num_bytes = tensors_moved[direction] * like.numel() * like.element_size()
        impls = {**impls, "copy": copy_ceiling(like, tensors_moved[direction])}
        for name, fn in impls.items():
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            rows.append({"pass": direction, "impl": name, "ms": ms, "gbps": num_bytes / ms / 1e6})
    return add_speedups(rows, baselines, group=lambda row: row["pass"])


def print_pass_table(rows: list[dict], baselines: tuple[str, ...]) -> None:
    """`time_passes`' rows, one line each, columns as wide as their longest entry."""
    pass_w = max(len("pass"), *(len(r["pass"]) for r in rows))
    impl_w = max(len("impl"), *(len(r["impl"]) for r in rows)) + 2
    ratio_w = max(len("vs " + b) for b in baselines) + 2
    print(f"{'pass':{pass_w}} {'impl':{impl_w}} {'ms':>8} {'GB/s':>7}"
          + "".join(f" {'vs ' + b:>{ratio_w}}" for b in baselines))
    for r in rows:
        ratios = "".join(f" {r['speedup_vs'][b]:>{ratio_w - 1}.2f}x" for b in baselines)
        print(f"{r['pass']:{pass_w}} {r['impl']:{impl_w}} {r['ms']:8.4f} {r['gbps']:7.0f}"
              f"{ratios}")


def kernel_bench_main(script: str, args: argparse.Namespace,
                      collect: Callable[[argparse.Namespace], list[dict]],
                      print_table: Callable[[list[dict]], None]) -> None:
    import triton

    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  {vars(args)}")
    rows = collect(args)
    print_table(rows)
    if args.out:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": triton.__version__,
                  "config": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(args).items()},
                  "results": rows}
        args.out.write_text(json.dumps(report, indent=2))


def graph_ms(launches: list) -> float:
    """Device ms per launch of `launches` (callables) replayed as one CUDA graph."""
    for fn in launches:
        fn()  # compile, autotune, grow the split counters before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in launches:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(launches))
    return sorted(times)[len(times) // 2]
