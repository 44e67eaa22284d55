"""Student construction: from the teacher's layers, or fresh from a preset or a ModelConfig.

From the teacher, the student keeps a chosen subset of its decoder layers (`layers=[0, 2,
4, ...]` or `keep_every=2`) and copies the embeddings, the final norm, the LM head (when
untied) and each kept layer's weights; every other shape is the teacher's. Student layer j
is teacher layer `layers[j]`, so `default_layer_map` pairs their outputs for hidden-state
matching. A fresh student is built from a preset name and/or ModelConfig keys and
initialised with the Llama recipe from a seed.

`resolve_student_config` works from configs alone, so a vocabulary mismatch between student
and teacher is reported before any weight is built or any token is read. This module knows
nothing about data or optimisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tessera.config import ModelConfig, get_preset
from tessera.distill.run_config import StudentConfig
from tessera.errors import ConfigError
from tessera.model.transformer import TesseraForCausalLM, build_model, init_weights

# Keys a preset-less `student.model` inherits from the teacher when it does not set them.
INHERITED_KEYS = ("vocab_size", "bos_token_id", "eos_token_ids", "pad_token_id", "model_type")


def select_layers(num_teacher_layers: int, *, layers: list[int] | None = None,
                  keep_every: int | None = None) -> list[int]:
    """The teacher layer indices a student keeps, in order."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_teacher_layers]
        if bad:
            raise ConfigError(f"student.layers {bad} are outside the teacher's layers "
                              f"0..{num_teacher_layers - 1}")
        if list(layers) != sorted(layers):
            raise ConfigError(f"student.layers must be increasing, got {list(layers)}")
        return list(layers)
    if keep_every is None or keep_every < 1:
        raise ConfigError("select_layers needs layers or a keep_every >= 1")
    return list(range(0, num_teacher_layers, keep_every))


def resolve_student_config(spec: StudentConfig, teacher_config: ModelConfig
                           ) -> tuple[ModelConfig, list[int] | None]:
    """The student's ModelConfig and, for a student made from the teacher, the kept layers.
    Raises `ConfigError` if the vocabularies differ."""
    if spec.is_from_teacher:
        layers = select_layers(teacher_config.num_layers, layers=spec.layers,
                               keep_every=spec.keep_every)
        return teacher_config.replace(num_layers=len(layers)), layers
    config = _fresh_config(spec, teacher_config)
    check_vocab(config, teacher_config)
    return config, None


def _fresh_config(spec: StudentConfig, teacher_config: ModelConfig) -> ModelConfig:
    changes = dict(spec.model or {})
    if spec.preset is not None:
        base = get_preset(spec.preset).to_dict()
    else:
        base = {key: getattr(teacher_config, key) for key in INHERITED_KEYS}
    unknown = sorted(set(changes) - set(base) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"student.model has unknown ModelConfig keys: {', '.join(unknown)}")
    return ModelConfig.from_dict(base | changes)


def check_vocab(student_config: ModelConfig, teacher_config: ModelConfig) -> None:
    """Logit distillation compares distributions over one shared vocabulary."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"the student's vocabulary ({student_config.vocab_size} tokens) differs from the "
            f"teacher's ({teacher_config.vocab_size}); logit distillation needs the same "
            "tokenizer. Use a student with vocab_size "
            f"{teacher_config.vocab_size} (e.g. student.model.vocab_size="
            f"{teacher_config.vocab_size})")


def student_from_teacher(teacher: TesseraForCausalLM, layers: list[int], *,
                         device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> TesseraForCausalLM:
    """A student of `len(layers)` layers holding copies of the teacher's weights."""
    layers = select_layers(teacher.config.num_layers, layers=layers)
    config = teacher.config.replace(num_layers=len(layers))
    student = build_model(config, device=device, dtype=dtype, init=False)
    state = teacher.state_dict()
    copied = {name: state[_teacher_name(name, layers)] for name in student.state_dict()}
    with torch.no_grad():
        student.load_state_dict({k: v.detach().clone() for k, v in copied.items()})
    student.tie_weights()
    return student


def _teacher_name(student_name: str, layers: list[int]) -> str:
    """`model.layers.j.x` -> `model.layers.{layers[j]}.x`; other names are shared."""
    parts = student_name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts[2] = str(layers[int(parts[2])])
    return ".".join(parts)


def fresh_student(config: ModelConfig, *, seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> TesseraForCausalLM:
    """A randomly initialised student; the same seed gives the same weights."""
    model = build_model(config, device=device, dtype=dtype, init=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(model)
    return model


def build_student(spec: StudentConfig, teacher: TesseraForCausalLM, *, seed: int = 0,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                  ) -> tuple[TesseraForCausalLM, list[int] | None]:
    """The student described by `spec` and the teacher layers it kept (None if fresh)."""
    config, layers = resolve_student_config(spec, teacher.config)
    if layers is not None:
        return student_from_teacher(teacher, layers, device=device, dtype=dtype), layers
    return fresh_student(config, seed=seed, device=device, dtype=dtype), None


def default_layer_map(layers: list[int]) -> dict[int, int]:
    """Student block output j+1 <-> teacher block output layers[j]+1 (0 = embeddings)."""
    return {j + 1: t + 1 for j, t in enumerate(layers)}


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Total, embedding, non-embedding and trainable parameter counts (shared tensors
    counted once)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    embedding = model.get_submodule("model.embed_tokens").weight
    total = sum(p.numel() for p in seen.values())
    return {"total": total, "embedding": embedding.numel(),
            "non_embedding": total - embedding.numel()
            - _untied_head(model, embedding),
            "trainable": sum(p.numel() for p in seen.values() if p.requires_grad)}


def _untied_head(model: nn.Module, embedding: torch.Tensor) -> int:
    head = model.get_submodule("lm_head").weight
    return 0 if head is embedding else head.numel()


def describe_counts(name: str, counts: dict[str, int]) -> str:
    return (f"{name}: {_human(counts['total'])} parameters "
            f"({_human(counts['non_embedding'])} non-embedding, "
            f"{_human(counts['trainable'])} trainable)")


def _human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
