"""`tessera.load` and `tessera.save`: one way in and out for every model source.

A source is an HF-format directory, a `.gguf` file, or a registered name (see
`registry.py`). `load` returns a `LoadedModel` with `.model` (an `nn.Module` in eval mode;
`model(input_ids)` returns logits `[B, T, V]`), `.tokenizer` and `.config`. `save` writes an
HF-format directory that transformers loads unchanged and that `load` reads back
bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.checkpoint import hf
from tessera.checkpoint.registry import resolve
from tessera.config import ModelConfig
from tessera.errors import ConfigError
from tessera.model.transformer import TesseraForCausalLM, build_model
from tessera.tokenizer import Tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class LoadedModel:
    model: TesseraForCausalLM
    tokenizer: Tokenizer | None  # None for a weights-only directory (no tokenizer.json)
    config: ModelConfig
    source: str


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None picks bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_source(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, HF-named state dict and tokenizer from a resolved path."""
    if path.is_dir():
        config, state = hf.read_hf_weights(path)
        has_tokenizer = (path / "tokenizer.json").exists()
        return config, state, Tokenizer.from_dir(path) if has_tokenizer else None
    from tessera.checkpoint.gguf import read_gguf

    ckpt = read_gguf(path)
    return ckpt.config, ckpt.state_dict, ckpt.tokenizer


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str, *,
                     device: torch.device, dtype: torch.dtype) -> TesseraForCausalLM:
    hf.check_state_dict(config, state, source)
    model = build_model(config, device=device, dtype=dtype, init=False)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    # strict=False only because tied models have no lm_head entry; check_state_dict
    # already verified that every expected tensor is present with the right shape.
    model.load_state_dict(state, strict=False)
    return model.eval()


def load(source: str | Path, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None) -> LoadedModel:
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype, device)
    path = resolve(str(source))
    if path.is_dir():
        from tessera.quant.checkpoint import is_quantized, load_quantized  # lazy: no cycle

        if is_quantized(path):
            return load_quantized(path, dtype=dtype, device=device, source=str(source))
    config, state, tokenizer = read_source(path)
    model = model_from_state(config, state, str(path), device=device, dtype=dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(source))


def save(loaded: LoadedModel, path: str | Path) -> Path:
    """Write `loaded` as an HF-format directory (weights in the model's current dtype)."""
    write_tokenizer = loaded.tokenizer.save if loaded.tokenizer is not None else None
    return hf.write_hf_dir(path, loaded.config, loaded.model, write_tokenizer)
