"""Read a GGUF file into a `ModelConfig`, an fp32 state dict in Hugging Face names, and a
`Tokenizer`.

Architectures: `llama` (also Mistral and SmolLM, which llama.cpp writes as llama), `qwen2`
and `qwen3`. Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants
Q2_K..Q6_K, all dequantized to fp32 with `gguf.quants.dequantize`. Anything else raises
`UnsupportedModelError` naming what is not supported.

NOTE: llama.cpp's converter interleaves the rows of each llama attn_q / attn_k head for its
RoPE; `read_gguf` undoes that permutation so the weights use HF's rotate-half layout.

This module knows nothing about building or running the model: it returns tensors and a
config, and checks that every tensor has the shape the config implies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from tessera.checkpoint.hf import expected_shapes
from tessera.config import ModelConfig
from tessera.errors import CheckpointError, ConfigError, ModelNotFoundError, UnsupportedModelError
from tessera.tokenizer import Tokenizer

SUPPORTED_TYPES = frozenset(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
))
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture == HF model_type

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tokenizer arrays that go into the Tokenizer, not into GGUFCheckpoint.metadata.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges", "tokenizer.ggml.scores")
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # fp32, HF Llama names; lm_head only if untied
    tokenizer: Tokenizer
    metadata: dict[str, Any]  # plain GGUF key/values, without the tokenizer's big arrays


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Load config, fp32 weights and tokenizer from a GGUF file."""
    path = Path(path)
    reader, metadata = _open(path)
    _architecture(metadata, path)  # before anything else can fail on an unknown layout
    tensors = {t.name: t for t in reader.tensors}
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    config = _config(metadata, tensors, tokenizer, path)
    state_dict = _state_dict(tensors, config, path)
    plain = {k: v for k, v in metadata.items() if k not in _TOKENIZER_ARRAYS}
    return GGUFCheckpoint(config=config, state_dict=state_dict, tokenizer=tokenizer,
                          metadata=plain)


def read_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no tensor is read)."""
    _, metadata = _open(Path(path))
    return Tokenizer.from_gguf_metadata(metadata)


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name (`blk.3.attn_q.weight` -> `model.layers.3...`)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{kind}"
    return None


# ---------------------------------------------------------------------- file
class _Reader(GGUFReader):
    """GGUFReader parsing from a plain ndarray view of its memmap.

    NOTE: GGUFReader slices `self.data` a few hundred thousand times to parse a vocabulary;
    np.memmap's per-slice bookkeeping makes that ~3x slower than the same plain view.
    """

    @property
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)


def _open(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    if not path.exists():
        raise ModelNotFoundError(f"GGUF file {path} does not exist; check the path")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; pass the path of a .gguf file")
    try:
        reader = _Reader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
        size = path.stat().st_size
        for t in reader.tensors:  # never trust declared sizes over the real file
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as exc:  # GGUFReader raises ValueError, IndexError, ... on bad bytes
        raise CheckpointError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc}); it may be "
            "truncated or corrupt: download it again"
        ) from None
    return reader, metadata


# ---------------------------------------------------------------------- config
def _architecture(meta: dict[str, Any], path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; Tessera reads "
            f"{', '.join(ARCHITECTURES)}"
        )
    return arch


def _config(meta: dict[str, Any], tensors: dict[str, ReaderTensor], tokenizer: Tokenizer,
            path: Path) -> ModelConfig:
    arch = _architecture(meta, path)
    get = _metadata_getter(meta, arch, path)
    heads = _attention_shape(get, path)
    embd = tensors.get("token_embd.weight")
    theta = _f32(get("rope.freq_base", 10000.0))
    try:
        return ModelConfig(
            model_type=arch,
            vocab_size=get("vocab_size", int(embd.shape[-1]) if embd is not None else 0),
            hidden_size=get("embedding_length"), num_layers=get("block_count"),
            intermediate_size=get("feed_forward_length"), **heads,
            rope_theta=theta,
            rope_scaling=_rope_scaling(get, tensors, heads["head_dim"], theta, path),
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
            attention_out_bias=arch == "llama" and "blk.0.attn_output.bias" in tensors,
            qk_norm=arch == "qwen3",
            max_seq_len=get("context_length", 2048),
            bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the GGUF metadata describes an invalid model: {exc}") \
            from None


def _attention_shape(get: Callable[..., Any], path: Path) -> dict[str, int]:
    """num_heads, num_kv_heads and head_dim, refusing what the decoder cannot run."""
    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_heads, list) or isinstance(num_kv_heads, list):
        raise UnsupportedModelError(f"{path}: per-layer head counts are not supported")
    if not isinstance(num_heads, int) or num_heads <= 0 or not isinstance(hidden, int):
        raise CheckpointError(f"{path}: invalid attention.head_count {num_heads!r}")
    head_dim = get("attention.key_length", hidden // num_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: key and value head sizes differ")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    return {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}


_REQUIRED = object()


def _metadata_getter(meta: dict[str, Any], arch: str, path: Path) -> Callable[..., Any]:
    """`get(key, default)` for `{arch}.{key}`; a missing key without default is an error."""

    def get(key: str, default: Any = _REQUIRED) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is _REQUIRED:
            raise CheckpointError(
                f"{path} lacks the GGUF metadata key {full!r}; the file is incomplete, "
                "convert the model again with llama.cpp's convert_hf_to_gguf.py"
            )
        return default

    return get


def _f32(value: float) -> float:
    """GGUF stores float32: recover the short decimal it was written from (1e-05, not
    9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(get: Callable[..., Any], tensors: dict[str, ReaderTensor], head_dim: int,
                  theta: float, path: Path) -> dict[str, Any] | None:
    if _ROPE_FREQS in tensors:
        return _llama3_scaling(tensors[_ROPE_FREQS], head_dim, theta, path)
    kind = get("rope.scaling.type", "none")
    factor = _f32(get("rope.scaling.factor", get("rope.scale_linear", 1.0)))
    if kind == "linear" or (kind == "none" and factor != 1.0):
        return {"rope_type": "linear", "factor": factor}
    if kind == "none":
        return None
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported")


def _llama3_scaling(freqs_tensor: ReaderTensor, head_dim: int, theta: float,
                    path: Path) -> dict[str, Any]:
    """Llama 3.x files store their rope scaling as per-frequency divisors (`rope_freqs`);
    recover the `llama3` parameters they were computed from, and check them."""
    from tessera.model.rope import inverse_frequencies

    shape = tuple(int(n) for n in reversed(freqs_tensor.shape))
    if shape != (head_dim // 2,) or freqs_tensor.tensor_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{path}: {_ROPE_FREQS} has shape {shape} and type {freqs_tensor.tensor_type.name}"
            f"; expected ({head_dim // 2},) floats"
        )
    freqs = torch.from_numpy(_to_array(freqs_tensor, shape))
    scaling = {"rope_type": "llama3", "factor": _f32(float(freqs.max())),
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    implied = inverse_frequencies(head_dim, theta) / inverse_frequencies(head_dim, theta, scaling)
    if not torch.allclose(freqs, implied, rtol=1e-4, atol=1e-6):
        raise UnsupportedModelError(
            f"{path}: rope_freqs do not match Llama 3 rope scaling with factor "
            f"{scaling['factor']}; this rope scaling is not supported"
        )
    return scaling


# ---------------------------------------------------------------------- tensors
def _state_dict(tensors: dict[str, ReaderTensor], config: ModelConfig,
                path: Path) -> dict[str, torch.Tensor]:
    expected = expected_shapes(config)
    plan = {_checked_name(tensor, expected, config, path): tensor
            for name, tensor in tensors.items() if name != _ROPE_FREQS}  # rope_freqs: config
    missing = sorted(set(expected) - set(plan))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) the metadata implies, e.g. {missing[:3]}"
        )
    return {name: torch.from_numpy(_load(tensor, expected[name], config))
            for name, tensor in plan.items()}


def _checked_name(tensor: ReaderTensor, expected: dict[str, tuple[int, ...]],
                  config: ModelConfig, path: Path) -> str:
    """The tensor's HF name, once its place, shape and type are known to be right."""
    name = hf_name(tensor.name)
    if name is None or name not in expected:
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name} has no place in a {config.model_type} model "
            "as Tessera builds it"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
    if shape != expected[name]:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} ({name}) has shape {shape} but the metadata "
            f"implies {expected[name]}"
        )
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
            f"Tessera cannot dequantize; supported: {_type_names()}"
        )
    return name


def _load(tensor: ReaderTensor, shape: tuple[int, ...], config: ModelConfig) -> np.ndarray:
    array = _to_array(tensor, shape)
    if config.model_type == "llama" and tensor.name.startswith("blk."):
        kind = tensor.name.split(".")[2]
        if kind in ("attn_q", "attn_k"):
            heads = config.num_heads if kind == "attn_q" else config.num_kv_heads
            array = np.ascontiguousarray(unpermute_rope_rows(array, heads))
    return array


def _to_array(tensor: ReaderTensor, shape: tuple[int, ...]) -> np.ndarray:
    """A writable, contiguous fp32 copy of the tensor's values, in HF dim order."""
    array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    if (array.dtype != np.float32 or not array.flags.writeable
            or np.may_share_memory(array, tensor.data)):
        array = np.array(array, dtype=np.float32, order="C")  # never a view of the file
    return array


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute`: per head, rows interleaved for llama.cpp's
    RoPE (pairs 0,1 / 2,3 ...) go back to HF's halves (0..D/2-1 / D/2..D-1)."""
    shape = weight.shape
    half = shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _type_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
