"""`bench serve`: an async load generator for an OpenAI-compatible completions server.

    python -m tessera.serve.bench --url http://127.0.0.1:8000 --num-prompts 64 --concurrency 16

It keeps `concurrency` streaming requests in flight against `/v1/completions` until
`num_prompts` have finished. Each prompt is `input_len` random token ids (drawn below
10,000, inside every real LLM vocabulary, from `seed`), and each request asks for exactly
`output_len` tokens (`max_tokens` with `ignore_eos`, temperature 0). One short warm-up
request runs first and is not counted. It reports request throughput, output tokens per
second, time to first token (TTFT), time per output token after the first (TPOT, per
request) and inter-token latency (ITL, the gaps between streamed chunks; a chunk can carry
more than one token when the server falls behind), each as mean, p50 and p99, and
returns them as a dict. Token counts come from the server's `usage` chunk. It knows
nothing about the server's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from tessera.errors import ConfigError, TesseraError
from tessera.serve.cli_args import add_bench_arguments

PROMPT_TOKEN_LIMIT = 10_000
REQUEST_TIMEOUT_S = 600.0


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(PROMPT_TOKEN_LIMIT) for _ in range(input_len)]
            for _ in range(num_prompts)]


async def _model_name(client: httpx.AsyncClient, url: str) -> str:
    response = await client.get(f"{url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _one_request(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    try:
        return await _timed_stream(client, url, payload)
    except httpx.HTTPError as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")


async def _timed_stream(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    """One streaming completion, timed chunk by chunk."""
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return RequestResult(ok=False, error=chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk["choices"]):
                arrivals.append(time.perf_counter())
    if not arrivals or usage is None:
        return RequestResult(ok=False, error="the stream ended without text or usage")
    return RequestResult(ok=True, prompt_tokens=usage["prompt_tokens"],
                         output_tokens=usage["completion_tokens"],
                         ttft=arrivals[0] - start, latency=time.perf_counter() - start,
                         itl=[b - a for a, b in zip(arrivals, arrivals[1:], strict=False)])


async def _run(url: str, prompts: list[list[int]], *, concurrency: int, output_len: int,
               model: str | None) -> tuple[list[RequestResult], float, str]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        try:
            model = model or await _model_name(client, url)
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot list the models of {url}: {exc}") from None

        def payload(prompt: list[int], max_tokens: int) -> dict:
            return {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}

        warmup = await _one_request(client, url, payload(prompts[0][:8], 2))
        if not warmup.ok:
            raise ConfigError(f"the warm-up request to {url} failed: {warmup.error}")
        semaphore = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int]) -> RequestResult:
            async with semaphore:
                return await _one_request(client, url, payload(prompt, output_len))

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return list(results), time.perf_counter() - start, model


def _summary(values: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """mean / p50 / p99 in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"mean": statistics.fmean(ordered) * scale, "p50": rank(0.5) * scale,
            "p99": rank(0.99) * scale}


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    num_output = sum(r.output_tokens for r in done)
    num_input = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "num_completed": len(done), "num_failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(done) / duration,
        "output_throughput": num_output / duration,
        "total_token_throughput": (num_input + num_output) / duration,
        "ttft_ms": _summary([r.ttft for r in done]), "tpot_ms": _summary(tpot),
        "itl_ms": _summary([x for r in done for x in r.itl]),
        "e2e_latency_ms": _summary([r.latency for r in done]),
    }


def run_bench(url: str, *, num_prompts: int, concurrency: int, input_len: int,
              output_len: int, model: str | None = None, seed: int = 0) -> dict:
    """Run the benchmark against `url` (e.g. "http://127.0.0.1:8000"); the summary dict."""
    for name, value in (("num_prompts", num_prompts), ("concurrency", concurrency),
                        ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    prompts = random_prompts(num_prompts, input_len, seed)
    results, duration, model = asyncio.run(_run(url.rstrip("/"), prompts,
                                                concurrency=concurrency,
                                                output_len=output_len, model=model))
    summary = summarize(results, duration)
    summary.update(url=url, model=model, num_prompts=num_prompts, concurrency=concurrency,
                   input_len=input_len, output_len=output_len, seed=seed)
    return summary


def format_table(summary: dict) -> str:
    lines = [
        f"model {summary['model']} at {summary['url']}: {summary['num_prompts']} prompts x "
        f"{summary['input_len']} tokens -> {summary['output_len']} tokens, concurrency "
        f"{summary['concurrency']}",
        f"{'completed / failed':<28}{summary['num_completed']:>10} / {summary['num_failed']}",
        f"{'duration (s)':<28}{summary['duration_s']:>10.2f}",
        f"{'request throughput (req/s)':<28}{summary['request_throughput']:>10.3f}",
        f"{'output throughput (tok/s)':<28}{summary['output_throughput']:>10.1f}",
        f"{'total throughput (tok/s)':<28}{summary['total_token_throughput']:>10.1f}",
        f"{'(ms)':<16}{'mean':>10}{'p50':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2e_latency_ms", "E2E latency")):
        s = summary[key]
        lines.append(f"{label:<16}{s['mean']:>10.1f}{s['p50']:>10.1f}{s['p99']:>10.1f}")
    lines += [f"error: {e}" for e in summary["errors"]]
    return "\n".join(lines)


def bench_from_args(args: argparse.Namespace) -> dict:
    summary = run_bench(args.url, num_prompts=args.num_prompts, concurrency=args.concurrency,
                        input_len=args.input_len, output_len=args.output_len,
                        model=args.model, seed=args.seed)
    print(format_table(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.serve.bench",
                                     description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    try:
        summary = bench_from_args(parser.parse_args(argv))
    except TesseraError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["num_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
