"""The command-line arguments of `tessera serve` and `tessera bench serve`.

`add_serve_arguments` and `add_bench_arguments` fill an `argparse` parser; `serve_from_args`
(in `api`) and `bench_from_args` (in `bench`) read the namespace. This module imports only
the standard library, so that building the `tessera` parser does not pull in FastAPI,
uvicorn, httpx or torch. Options left out stay `None`, and the code that runs them applies
its own defaults (`EngineConfig`'s, `serve`'s).
"""

from __future__ import annotations

import argparse
import os


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tessera serve` (also `python -m tessera.serve.api`)."""
    parser.add_argument("model", help="HF directory, .gguf file or registered name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $TESSERA_API_KEY, else no key)")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="queued requests beyond which new ones get HTTP 429")
    parser.add_argument("--draft", default=None, help="draft model for speculative decoding")
    parser.add_argument("--speculative-method", choices=("draft", "ngram"), default=None)
    parser.add_argument("--num-speculative-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens computed per engine step, over all sequences")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV-cache block")
    parser.add_argument("--kv-cache-tokens", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run decode steps eagerly instead of replaying CUDA graphs")
    parser.add_argument("--max-prefill-graph-len", type=int, default=None,
                        help="replay CUDA graphs for a lone fresh prompt up to this many "
                        "tokens (default 512; 0: prefill eagerly)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="overlap each step's host work with the "
                        "previous step's device work (default: on for CUDA)")
    parser.add_argument("--no-fuse-projections", dest="fuse_projections",
                        action="store_false", default=None,
                        help="keep q/k/v and gate/up as separate products")
    parser.add_argument("--no-cpu-prepack", dest="cpu_prepack", action="store_false",
                        default=None, help="on the CPU, keep the weights unpacked (saves "
                        "a copy of them in memory; decode steps run slower)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads "
                        "(default: one per core; 1 is faster on a CPU shared with other "
                        "busy processes)")
    parser.add_argument("--log-level", default="info")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tessera bench serve` (also `python -m tessera.serve.bench`)."""
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the summary here as JSON")
