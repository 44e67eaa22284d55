"""Shared pieces of the kernel benchmarks (`bench_<kernel>.py`, run as scripts).

- `add_speedups(rows, baselines, group)`: each row's `speedup_vs[b]`, the time of baseline
  `b` in the row's group over the row's time (> 1: faster than that baseline);
- `copy_ceiling(like, num_tensors)`: a device copy moving the same bytes, the practical
  bandwidth ceiling of a memory-bound kernel;
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
