"""Hugging Face model directories: read and write `config.json` + safetensors weights.

`read_hf_weights` returns a `ModelConfig` and a state dict in HF names from a directory
holding `model.safetensors`, a sharded `model.safetensors.index.json`, or (only where no
safetensors exist) a `pytorch_model.bin` read with `torch.load(weights_only=True)`.
`write_hf_dir` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained`
loads unchanged; it is written into a temporary sibling and renamed into place, so a crash
never leaves a half-written model. Tokenizer files are the tokenizer's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tessera.config import ModelConfig
from tessera.errors import CheckpointError, ConfigError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
MANIFEST = "tessera.json"
DEFAULT_MAX_SHARD_BYTES = 4 << 30


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json; is it an HF model directory?") \
            from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    return ModelConfig.from_hf_config(data)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}); it may be truncated or corrupt"
        ) from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is malformed ({exc!r})") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SAFETENSORS).exists():
        return [directory / SAFETENSORS]
    if (directory / TORCH_BIN).exists():
        return [directory / TORCH_BIN]
    raise CheckpointError(
        f"{directory} holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})"
    )


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:  # NOTE: weights_only refuses pickled code; never unpickle arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path} could not be read as torch weights ({exc})") from None


def read_hf_weights(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = read_hf_config(directory)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        state.update(_load_weight_file(path))
    return config, state


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a model built from `config` (lm_head only if untied)."""
    from tessera.model.transformer import TesseraForCausalLM

    with torch.device("meta"):
        model = TesseraForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `CheckpointError` naming the first missing, unexpected or misshapen tensor."""
    expected = expected_shapes(config)
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) - ignorable
                        if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(
            f"{source} has {len(unexpected)} tensors the config does not describe, "
            f"e.g. {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)} but the config "
                f"implies {shape}"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(directory: Path, state: dict[str, torch.Tensor], max_bytes: int) -> None:
    shards = _shard(state, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFETENSORS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf_dir(directory: str | Path, config: ModelConfig, model: torch.nn.Module,
                 write_extra=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write config, weights and a hash manifest; `write_extra(tmp_dir)` adds more files
    (the tokenizer) before the directory is renamed into place."""
    directory = Path(directory)
    if directory.exists() and not (directory / "config.json").exists() and any(
            directory.iterdir()):
        raise ConfigError(f"{directory} exists and is not a model directory; refusing to "
                          "overwrite it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        dtype = next(iter(state.values())).dtype
        hf = config.to_hf_config() | {"torch_dtype": _dtype_name(dtype)}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config)))
        _write_weights(tmp, state, max_shard_bytes)
        if write_extra is not None:
            write_extra(tmp)
        _write_manifest(tmp, config)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _generation_config(config: ModelConfig) -> dict:
    eos = list(config.eos_token_ids)
    return {"bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config.pad_token_id}


def _write_manifest(directory: Path, config: ModelConfig) -> None:
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {"format": "tessera-hf", "model_config": config.to_dict(), "sha256": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for path in directory.iterdir():  # flush file contents before the rename publishes them
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _replace_dir(tmp: Path, directory: Path) -> None:
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
