"""The configuration of one distillation run: nested keyword-only dataclasses, YAML, overrides.

A run is described by `RunConfig`, whose sections are `StudentConfig`, `DataConfig`,
`tessera.distill.losses.KDLossConfig` (under the key `loss`), `TrainerConfig` and
`EvalConfig`. Every dataclass validates itself when built, so a bad value fails with one
`ConfigError` before any model is loaded or any token is read.

The defaults *are* the quickstart: `RunConfig()` distills the registered
`smollm2-135m-instruct` into a student made of every other teacher layer, on the Python
standard library, sized to finish in about ten minutes on a 2-core CPU.
`configs/quickstart.yaml` spells the same values out.

`load_run_config(path, overrides)` reads a YAML file (or nothing: the defaults) and applies
dotted `key=value` overrides (`trainer.max_steps=20 output_dir=runs/x`). Values are parsed
as YAML scalars and checked against the dataclass field types: an unknown key or a value of
the wrong type is a `ConfigError` naming the key (with a close match when there is one).

`run_fingerprint` identifies a run for resumption: two configs with the same fingerprint
continue each other; settings that do not change the numbers (where the run is written,
logging, checkpoint cadence) are left out of it.

This module knows nothing about models or training.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tessera.distill.losses import KDLossConfig
from tessera.errors import ConfigError

RUN_CONFIG_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
TEACHER_SHARDING = ("replicate", "shard")
# Keys that do not change what is computed; they may differ between a run and its resumption.
NON_IDENTITY_KEYS = ("output_dir", "trainer.progress", "trainer.log_every",
                     "trainer.checkpoint_every", "trainer.keep_last", "trainer.tensorboard")


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """How the student is made: from the teacher's layers, or fresh from a shape.

    From the teacher: `layers` (teacher layer indices, in order) or `keep_every` (every
    k-th layer, starting at 0); embeddings, norms and the kept layers' weights are copied.
    Fresh: `preset` (a name from `tessera info`) and/or `model` (ModelConfig keys, applied
    over the preset), randomly initialised from `trainer.seed`. With none of the four set,
    the student is every other teacher layer (`keep_every: 2`).
    """

    layers: list[int] | None = None
    keep_every: int | None = None
    preset: str | None = None
    model: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.layers, self.keep_every, self.preset, self.model) == (None,) * 4:
            object.__setattr__(self, "keep_every", 2)
        from_teacher = self.layers is not None or self.keep_every is not None
        fresh = self.preset is not None or self.model is not None
        if self.layers is not None and self.keep_every is not None:
            raise ConfigError("student: give either layers or keep_every, not both "
                              "(set the other to null, e.g. student.keep_every=null)")
        if from_teacher and fresh:
            raise ConfigError("student: layers/keep_every build the student from the teacher, "
                              "preset/model build a fresh one; set the other pair to null "
                              "(e.g. student.keep_every=null)")
        if not from_teacher and not fresh:
            raise ConfigError("student: set layers or keep_every (copy teacher layers), or "
                              "preset and/or model (a fresh student)")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"student.keep_every must be >= 1, got {self.keep_every}")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("student.layers is empty; keep at least one teacher layer")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"student.layers must be distinct non-negative teacher "
                                  f"layer indices, got {self.layers}")

    @property
    def is_from_teacher(self) -> bool:
        return self.layers is not None or self.keep_every is not None


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Corpus, split and packing. Shards are cached under `shard_dir` (default:
    `$TESSERA_CACHE/shards/<hash of corpus, split and tokenizer>`)."""

    corpus: list[str] = field(default_factory=lambda: ["python-stdlib"])
    text_field: str = "text"
    val_fraction: float = 0.02
    seq_len: int = 128
    document_masking: bool = True
    shard_dir: str | None = None
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not self.corpus or not all(isinstance(s, str) and s.strip() for s in self.corpus):
            raise ConfigError(f"data.corpus must be a non-empty list of sources, got "
                              f"{self.corpus!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check_positive("data.seq_len", self.seq_len)
        _check_positive("data.num_workers", self.num_workers)


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Optimisation, cadence and execution. One optimizer step sees `global_batch_size`
    sequences, cut into micro-batches of `micro_batch_size` per rank (gradient
    accumulation makes up the rest), whatever the number of ranks."""

    max_steps: int = 48
    global_batch_size: int = 4
    micro_batch_size: int = 4
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0
    shuffle: bool = True
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training
    checkpoint_every: int = 24  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2
    device: str = "auto"
    autocast: bool = True  # bf16 autocast on CUDA; ignored on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    teacher_sharding: str = "replicate"  # with several ranks: "replicate" or "shard"
    train_embeddings: bool = False  # embeddings (and a tied head) stay the teacher's
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is importable

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every",
                     "keep_last"):
            _check_positive(f"trainer.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            _check_non_negative(f"trainer.{name}", getattr(self, name))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"trainer.global_batch_size ({self.global_batch_size}) must be a "
                              f"multiple of trainer.micro_batch_size ({self.micro_batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"trainer.lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"trainer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ConfigError("trainer.eps must be > 0, weight_decay and grad_clip >= 0")
        _check_choice("trainer.device", self.device, DEVICES, prefix_ok="cuda:")
        _check_choice("trainer.teacher_sharding", self.teacher_sharding, TEACHER_SHARDING)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: the first `num_sequences` packed validation sequences."""

    num_sequences: int = 16
    micro_batch_size: int = 2

    def __post_init__(self) -> None:
        _check_positive("eval.num_sequences", self.num_sequences)
        _check_positive("eval.micro_batch_size", self.micro_batch_size)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One distillation run (see the module doc)."""

    version: int = RUN_CONFIG_VERSION
    teacher: str = "smollm2-135m-instruct"
    output_dir: str = "runs/quickstart"
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: KDLossConfig = field(default_factory=lambda: KDLossConfig(
        loss="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=1.0, chunk_size=1024))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.version != RUN_CONFIG_VERSION:
            raise ConfigError(f"run config version {self.version} is not supported (this "
                              f"Tessera reads version {RUN_CONFIG_VERSION})")
        if not self.teacher.strip():
            raise ConfigError("teacher must name a model (registered name, .gguf or HF dir)")
        if not self.output_dir.strip():
            raise ConfigError("output_dir must be a directory path")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "")


# --------------------------------------------------------------------------- loading
def load_run_config(path: str | Path | None = None,
                    overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The config in YAML file `path` (None: the defaults) with `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return RunConfig.from_dict(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`"trainer.lr=1e-4"` -> `("trainer.lr", 1e-4)`; the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value "
                          "(e.g. trainer.max_steps=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def run_fingerprint(config: RunConfig) -> str:
    """sha256 of the config without `NON_IDENTITY_KEYS` (see the module doc)."""
    data = config.to_dict()
    for key in NON_IDENTITY_KEYS:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(last, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- typed build
def _build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and value types."""
    where = path.rstrip(".") or "the run config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(f"{path}{key}", key, names, path))
        kwargs[key] = _coerce(value, hints[key], f"{path}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from None


def _unknown_key_message(full: str, key: str, names: list[str], path: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {path + close[0]!r}?" if close else ""
    section = path.rstrip(".") or "the run config"
    return f"unknown config key {full!r}{hint} (known keys in {section}: {', '.join(names)})"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _type_error(key, value, "a list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise _type_error(key, value, "a mapping")
        return {_coerce_key(k, key_type, key): _coerce(v, value_type, f"{key}.{k}")
                for k, v in value.items()}
    return _coerce_scalar(value, hint, key)


def _coerce_union(value: Any, options: tuple, key: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise _type_error(key, value, "a value (not null)")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(value, option, key)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def _coerce_key(raw: Any, hint: Any, key: str) -> Any:
    if hint is int and isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: key {raw!r} must be an integer") from None
    return _coerce_scalar(raw, hint, f"{key} key")


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, "a string")
    raise ConfigError(f"{key}: unsupported field type {hint!r}")  # a bug in a dataclass


def _type_error(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r} must be {expected}, got {value!r} "
                       f"({type(value).__name__})")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def _check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...], prefix_ok: str = "") -> None:
    if value in choices or (prefix_ok and value.startswith(prefix_ok)):
        return
    raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
