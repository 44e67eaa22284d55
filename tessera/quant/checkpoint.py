"""Quantized checkpoints: HF-format directories whose Linears hold quantized tensors.

Layout (written by `save_quantized` through `tessera.checkpoint.hf.write_hf_dir`, so it is
atomic and has the usual `tessera.json` manifest with hashes):

- `model.safetensors` (or shards): every tensor of the quantized model's state dict under
  its HF name. A quantized Linear `P` stores, instead of `P.weight` in float,
  - int8: `P.weight` int8 `[N, K]`, `P.weight_scale` fp32 `[N]`;
  - int4: `P.qweight` uint8 `[N, K/2]`, `P.scales` fp32 `[N, K/g]`, `P.zeros` uint8 `[N, K/g]`;
  - fp8: `P.weight` float8_e4m3fn `[N, K]`, `P.weight_scale` fp32 `[N]` or `[1]`;
  plus `P.input_scale` `[K]` where AWQ could not fold its scale, and `P.bias` if any.
  Norms and embeddings are in the model's activation dtype (`torch_dtype`).
- `config.json`: the HF config plus `quantization_config = {"quant_method": "tessera",
  "format_version": 1, "config": QuantConfig.to_dict(), "modules": {name: spec}}`, where a
  spec (see `QuantizedLinear.spec`) lets the loader rebuild each module empty.
- tokenizer files, `generation_config.json`, `tessera.json`.

transformers does not know `quant_method: "tessera"` and refuses the directory loudly.
`load_quantized` rebuilds the model on the meta device, swaps in empty quantized modules,
allocates them on the target device and loads the tensors; `is_quantized` tells the
loader which path to take.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tessera.checkpoint import hf
from tessera.checkpoint.loader import LoadedModel, default_device, load, parse_dtype
from tessera.errors import CheckpointError, ConfigError, UnsupportedModelError
from tessera.model.transformer import TesseraForCausalLM
from tessera.quant.config import QuantConfig
from tessera.quant.linear import KINDS, build_empty
from tessera.quant.model import quantize_model, quantized_modules, replace_module
from tessera.tokenizer import Tokenizer

QUANT_METHOD = "tessera"
FORMAT_VERSION = 1


def quantization_spec(model: torch.nn.Module) -> dict[str, Any]:
    """The `quantization_config` of a model quantized by `quantize_model`."""
    config = getattr(model, "quantization", None)
    modules = quantized_modules(model)
    if config is None or not modules:
        raise CheckpointError("the model is not quantized; call tessera.quant.quantize_model "
                              "first")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "modules": {name: m.spec() for name, m in modules.items()}}


def save_quantized(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write `loaded` (its model quantized in place) as a quantized HF-format directory."""
    spec = quantization_spec(loaded.model)

    def add_extra(tmp: Path) -> None:
        if loaded.tokenizer is not None:
            loaded.tokenizer.save(tmp)
        path = tmp / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {
            "quantization_config": spec}, indent=2))

    return hf.write_hf_dir(directory, loaded.config, loaded.model, add_extra)


def read_spec(directory: str | Path) -> dict[str, Any] | None:
    """The directory's `quantization_config`, or None for an unquantized directory."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not ours to diagnose: the HF reader says what is wrong
    spec = data.get("quantization_config")
    if spec is None:
        return None
    if spec.get("quant_method") != QUANT_METHOD:
        raise UnsupportedModelError(f"{directory} is quantized with "
                                    f"{spec.get('quant_method')!r}, which Tessera does not "
                                    f"load (it reads {QUANT_METHOD!r} directories)")
    if spec.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has quantization format version "
                              f"{spec.get('format_version')}; this Tessera reads "
                              f"{FORMAT_VERSION}")
    return spec


def is_quantized(directory: str | Path) -> bool:
    """True when `directory` is a Tessera-quantized model directory."""
    return Path(directory).is_dir() and read_spec(directory) is not None


def load_quantized(directory: str | Path, dtype: torch.dtype | str | None = None,
                   device: torch.device | str | None = None, *,
                   source: str | None = None) -> LoadedModel:
    """Load a directory written by `save_quantized` (dtype, device and the default
    `source`, the directory, as in `tessera.load`)."""
    directory = Path(directory)
    spec = read_spec(directory)
    if spec is None:
        raise CheckpointError(f"{directory} is not a quantized model directory (its "
                              "config.json has no quantization_config)")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype, device)
    config, state = hf.read_hf_weights(directory)
    model = _empty_model(config, spec, device, dtype)
    _load_state(model, state, directory)
    model.quantization = QuantConfig.from_dict(spec["config"])
    tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").exists() \
        else None
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, config=config,
                       source=source or str(directory))


def _empty_model(config, spec: dict[str, Any], device: torch.device,
                 dtype: torch.dtype) -> TesseraForCausalLM:
    with torch.device("meta"):
        model = TesseraForCausalLM(config)
    for name, module_spec in spec["modules"].items():
        if module_spec.get("kind") not in KINDS:
            raise CheckpointError(f"module {name} has unknown quantized kind "
                                  f"{module_spec.get('kind')!r}; known: {sorted(KINDS)}")
        replace_module(model, name, build_empty(module_spec))
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    return model


def _load_state(model: TesseraForCausalLM, state: dict[str, torch.Tensor],
                directory: Path) -> None:
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: tensors missing {missing[:3]} / unexpected "
                              f"{unexpected[:3]} for its quantization_config")
    stored = {f"{prefix}.{buffer}" for prefix, module in quantized_modules(model).items()
              for buffer in module.STORAGE}
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or (name in stored and tensor.dtype != want.dtype):
            raise CheckpointError(f"{directory}: tensor {name} is {tensor.dtype} "
                                  f"{tuple(tensor.shape)}, expected {want.dtype} "
                                  f"{tuple(want.shape)}")
    model.load_state_dict(state, strict=False)  # tied lm_head only; checked above


def quantize_checkpoint(source: str | Path, destination: str | Path, method: str, *,
                        dtype: str | None = None, device: str | None = None,
                        **options: Any) -> Path:
    """Load `source`, quantize it with `method` (AWQ calibrates with its own tokenizer),
    write the quantized directory to `destination` (what `tessera quantize` runs)."""
    loaded = load(source, dtype=dtype, device=device)
    if method == "awq" and loaded.tokenizer is None:
        raise ConfigError(f"{source} has no tokenizer; AWQ reads its calibration text with "
                          "the model's tokenizer (add tokenizer.json to the directory)")
    quantize_model(loaded.model, method, tokenizer=loaded.tokenizer, **options)
    return save_quantized(loaded, destination)


