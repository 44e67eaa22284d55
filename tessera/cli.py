"""The `tessera` command line: one entry point, one small function per subcommand.

Every subcommand parses its arguments, calls the library and prints; one that returns an int
sets the exit status (`bench serve`: 1 when a request failed), else it is 0. A `TesseraError`
(bad input: a missing file, a corrupt checkpoint, a wrong config) is printed as one line,
`tessera: error: ...`, with exit status 2 and no traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tessera.errors import TesseraError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help_text: str):
    """Register `add_args` for subcommand `name`; the decorated function runs it."""

    def decorate(run: Callable) -> Callable:
        add_args = getattr(run, "add_args", lambda parser: None)
        COMMANDS[name] = (add_args, run, help_text)
        return run

    return decorate


def arguments(add_args: Callable[[argparse.ArgumentParser], None]):
    def attach(run: Callable) -> Callable:
        run.add_args = add_args
        return run

    return attach


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: "
                        "cuda if available)")


# --------------------------------------------------------------------------------- info
@command("info", "list model presets, the device and the available kernels")
def run_info(args: argparse.Namespace) -> None:
    import torch

    import tessera.model  # noqa: F401  (registers the attention op)
    import tessera.serve.paged_attention  # noqa: F401  (registers the paged attention op)
    from tessera.config import PRESETS
    from tessera.kernels import registry

    print(f"{'preset':<22} {'type':<6} {'layers':>6} {'hidden':>6} {'heads':>9} "
          f"{'params':>10} {'non-emb':>10}")
    for name, cfg in PRESETS.items():
        heads = f"{cfg.num_heads}/{cfg.num_kv_heads}"
        print(f"{name:<22} {cfg.model_type:<6} {cfg.num_layers:>6} {cfg.hidden_size:>6} "
              f"{heads:>9} {_millions(cfg.num_parameters()):>10} "
              f"{_millions(cfg.num_parameters(include_embeddings=False)):>10}")
    print(f"\ntorch {torch.__version__}; device: {_describe_device()}")
    print(f"triton: {_triton_version()}")
    print("kernels (reference first):")
    for op, backends in registry.available().items():
        selected = registry.select(op, "cuda" if torch.cuda.is_available() else "cpu")
        print(f"  {op:<18} {', '.join(backends):<28} using: {selected.backend}")


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed (torch reference kernels only)"
    return triton.__version__


# ----------------------------------------------------------------------------- generate
def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF directory, .gguf file or registered name")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's "
                        "chat template as a user message")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    _model_args(parser)


@command("generate", "generate text from a prompt, streaming tokens to the terminal")
@arguments(_generate_args)
def run_generate(args: argparse.Namespace) -> None:
    import tessera
    from tessera.generate import GenerationConfig, generate_stream

    gen = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    loaded = tessera.load(args.model, dtype=args.dtype, device=args.device)
    tok = loaded.tokenizer
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    else:
        prompt_ids = tok.encode(args.prompt)
    stops = set(loaded.config.eos_token_ids)
    decoder = tok.decode_stream(skip_special_tokens=True)
    for token in generate_stream(loaded.model, prompt_ids, gen):
        if token in stops:
            break
        sys.stdout.write(decoder.step(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")


# ------------------------------------------------------------------------------ convert
def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="HF directory, .gguf file or registered name")
    parser.add_argument("destination", help="output HF-format directory")
    parser.add_argument("--dtype", default="float32", help="weights dtype to write")


@command("convert", "convert a GGUF file or HF directory to an HF-format directory")
@arguments(_convert_args)
def run_convert(args: argparse.Namespace) -> None:
    import tessera

    loaded = tessera.load(args.source, dtype=args.dtype, device="cpu")
    path = tessera.save(loaded, args.destination)
    print(f"wrote {path} ({loaded.config.num_parameters() / 1e6:.1f}M parameters, "
          f"{args.dtype})")


# ------------------------------------------------------------------------------ distill
def _distill_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML run config (default: the "
                        "quickstart, spelled out in configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. trainer.max_steps=20 output_dir=runs/x")


@command("distill", "distill a teacher into a smaller student (resumes an unfinished run)")
@arguments(_distill_args)
def run_distill(args: argparse.Namespace) -> None:
    from tessera.distill.run_config import load_run_config
    from tessera.distill.trainer import distill

    distill(load_run_config(args.config, args.overrides))


# --------------------------------------------------------------------------------- eval
def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF directory, .gguf file or registered name")
    parser.add_argument("--corpus", nargs="+", default=["python-stdlib"],
                        help="corpus sources (files, directories, globs, file.jsonl:field, "
                        "python-stdlib)")
    parser.add_argument("--teacher", default=None, help="also report the teacher's "
                        "perplexity, KL(teacher||model) and top-1 agreement")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-sequences", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _model_args(parser)


@command("eval", "held-out perplexity of a model, and its agreement with a teacher")
@arguments(_eval_args)
def run_eval(args: argparse.Namespace) -> None:
    import json

    from tessera.distill.evaluate import evaluate_sources

    result = evaluate_sources(args.model, args.corpus, teacher_source=args.teacher,
                              seq_len=args.seq_len, num_sequences=args.num_sequences,
                              val_fraction=args.val_fraction, split=args.split,
                              device=args.device, dtype=args.dtype)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: perplexity {result['ppl']:.3f} on {result['tokens']} tokens "
          f"({result['sequences']} sequences of the {args.split} split)")
    if args.teacher:
        print(f"{args.teacher}: perplexity {result['teacher_ppl']:.3f}")
        print(f"KL(teacher||model) {result['kl']:.4f} nats/token, top-1 agreement "
              f"{100 * result['agreement']:.1f}%")


# -------------------------------------------------------------------------------- serve
def _serve_args(parser: argparse.ArgumentParser) -> None:
    from tessera.serve.cli_args import add_serve_arguments

    add_serve_arguments(parser)


@command("serve", "serve a model over an OpenAI-compatible HTTP API until SIGTERM")
@arguments(_serve_args)
def run_serve(args: argparse.Namespace) -> None:
    from tessera.serve.api import serve_from_args

    serve_from_args(args)


# -------------------------------------------------------------------------------- bench
def _bench_args(parser: argparse.ArgumentParser) -> None:
    from tessera.serve.cli_args import add_bench_arguments

    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    help_text = "load-test an OpenAI-compatible server (exit status 1 if a request failed)"
    add_bench_arguments(targets.add_parser("serve", help=help_text, description=help_text))


@command("bench", "benchmarks: `bench serve` measures a running server's throughput and "
         "latency")
@arguments(_bench_args)
def run_bench(args: argparse.Namespace) -> int:
    from tessera.serve.bench import bench_from_args

    summary = bench_from_args(args)
    return 0 if summary["num_failed"] == 0 else 1


# ----------------------------------------------------------------------------- quantize
def _quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="HF directory, .gguf file or registered name")
    parser.add_argument("destination", help="output quantized HF-format directory")
    parser.add_argument("--method", required=True, help="int8, int4, awq or fp8")
    parser.add_argument("--group-size", type=int, default=None, help="int4 and awq: the "
                        "largest quantization group (a multiple of 16; default 128)")
    parser.add_argument("--bits", type=int, default=None, help="awq: 4 (group-wise int4, "
                        "the default) or 8 (per-channel int8)")
    parser.add_argument("--skip", nargs="+", default=None, metavar="PATTERN",
                        help="fnmatch patterns of Linear names left unquantized (default: "
                        "lm_head, which must stay in the list)")
    parser.add_argument("--calibration-source", default=None, help="awq: calibration "
                        "corpus (files, directories, globs, file.jsonl:field, python-stdlib)")
    parser.add_argument("--calibration-tokens", type=int, default=None,
                        help="awq: calibration tokens read from the corpus")
    parser.add_argument("--calibration-seq-len", type=int, default=None,
                        help="awq: tokens per calibration window")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="awq: documents held out from calibration (the eval split)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="awq: activation rows per layer input kept for the scale search")
    parser.add_argument("--num-grid", type=int, default=None, metavar="N",
                        help="awq: the scale search tries exponents 0, 1/N, ..., 1")
    parser.add_argument("--per-tensor", dest="per_channel", action="store_false",
                        default=None, help="fp8: one weight scale per tensor instead of one "
                        "per output channel")
    parser.add_argument("--activations", default=None, help="fp8: dynamic (activations "
                        "quantized per token, the default) or none (weight-only)")
    _model_args(parser)


QUANT_OPTIONS = ("group_size", "bits", "skip", "calibration_source", "calibration_tokens",
                 "calibration_seq_len", "val_fraction", "max_samples", "num_grid",
                 "per_channel", "activations")


@command("quantize", "quantize a model's Linear layers (int8, int4, awq, fp8) into a new "
         "directory")
@arguments(_quantize_args)
def run_quantize(args: argparse.Namespace) -> None:
    from tessera.checkpoint.registry import resolve
    from tessera.quant.checkpoint import quantize_checkpoint
    from tessera.quant.config import QuantConfig

    options = {name: getattr(args, name) for name in QUANT_OPTIONS
               if getattr(args, name) is not None}
    QuantConfig.build(args.method, **options)  # a bad method or option fails before loading
    path = quantize_checkpoint(args.source, args.destination, args.method, dtype=args.dtype,
                               device=args.device, **options)
    print(f"wrote {path} ({args.method}, {_megabytes(path)} MB on disk; source "
          f"{_megabytes(resolve(args.source))} MB)")


def _megabytes(path: Path) -> str:
    """Size on disk of a file or a directory's files, in MB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 1e6:.1f}"


# --------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _run, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command][1](args)
    except TesseraError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
