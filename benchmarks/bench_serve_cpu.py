"""The serving benchmark of docs/benchmarks.md: `bench serve` against a real server, with
transformers' static-batch `generate` as the same-run baseline.

    python benchmarks/bench_serve_cpu.py
    python benchmarks/bench_serve_cpu.py --num-prompts 32 --threads 1 --out /tmp/serve.json
    python benchmarks/bench_serve_cpu.py --dtype bfloat16 --baseline-dtypes float32 bfloat16

Steps, one after the other so they never share the CPU: (1) the baseline
(`benchmarks/bench_hf_generate.py`, batch 16 and batch 1, 128 prompt + 64 new tokens, in
each of `--baseline-dtypes`) in a subprocess; (2) a `python -m tessera.serve.api
smollm2-135m-instruct --dtype DTYPE` server on 127.0.0.1; (3) `run_bench` at concurrency
16 (`--num-prompts` prompts) and at concurrency 1 (4 prompts), each 128 random prompt
tokens -> exactly 64 output tokens; (4) the baseline again, so a change in the machine's
load shows as a difference between the two. It prints everything and the ratios, for
each baseline dtype: serving output tok/s over the baseline's batch-16 tok/s, and
single-stream decode tok/s (1 / mean TPOT) over the baseline's batch-1 tok/s (baseline:
the mean of the runs before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tessera.serve.bench import format_table, run_bench

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the "
                        "baseline and the server (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the server's weights")
    parser.add_argument("--baseline-dtypes", nargs="+", default=["float32"],
                        choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="write every figure here as JSON")
    return parser.parse_args()


def _threads_args(threads: int | None) -> list[str]:
    return [] if threads is None else ["--threads", str(threads)]


def baseline(threads: int | None, dtypes: list[str]) -> dict[str, dict[int, dict]]:
    """{dtype: {batch size: transformers' figures}}."""
    figures = {}
    for dtype in dtypes:
        result = subprocess.run([sys.executable, str(HERE / "bench_hf_generate.py"),
                                 "--dtype", dtype, *_threads_args(threads)],
                                capture_output=True, text=True, check=True, timeout=3600)
        rows = [json.loads(line) for line in result.stdout.splitlines()
                if line.startswith("{")]
        figures[dtype] = {row["batch_size"]: row for row in rows}
    return figures


def start_server(port: int, threads: int | None, dtype: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "tessera.serve.api", MODEL,
                                "--port", str(port), "--log-level", "warning",
                                "--dtype", dtype, *_threads_args(threads)])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become healthy within 600 s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_server(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """(concurrent bench, single-stream bench, final /metrics text) of a fresh server."""
    port = free_port()
    server = start_server(port, args.threads, args.dtype)
    url = f"http://127.0.0.1:{port}"
    try:
        batched = run_bench(url, num_prompts=args.num_prompts, concurrency=args.concurrency,
                            input_len=128, output_len=64)
        print(format_table(batched), flush=True)
        single = run_bench(url, num_prompts=4, concurrency=1, input_len=128, output_len=64)
        print(format_table(single), flush=True)
        return batched, single, httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def ratios(batched: dict, single: dict, before: dict, after: dict) -> dict:
    decode = 1e3 / single["tpot_ms"]["mean"]
    figures = {"single_stream_decode_tok_per_s": decode}
    for dtype in before:
        hf = {size: (before[dtype][size]["output_tok_per_s"]
                     + after[dtype][size]["output_tok_per_s"]) / 2 for size in before[dtype]}
        figures[f"ratio_concurrent_vs_hf_{dtype}_batch16"] = \
            batched["output_throughput"] / hf[16]
        figures[f"ratio_single_decode_vs_hf_{dtype}_batch1"] = decode / hf[1]
    return figures


def main() -> None:
    args = parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    dtypes = [] if args.skip_baseline else args.baseline_dtypes
    before = baseline(args.threads, dtypes)
    batched, single, metrics = measure_server(args)
    after = baseline(args.threads, dtypes)
    for label, figures in (("before", before), ("after", after)):
        for rows in figures.values():
            for row in rows.values():
                print(f"transformers generate ({label}): {json.dumps(row)}", flush=True)
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith(("tessera:engine_", "tessera:num_preemptions_total"))))
    summary = {**ratios(batched, single, before, after), "load_average_after": os.getloadavg()}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {**summary, "threads": args.threads, "dtype": args.dtype,
             "serve_concurrent": batched,
             "serve_single": single, "hf_generate_before": before,
             "hf_generate_after": after}, indent=2))


if __name__ == "__main__":
    main()
