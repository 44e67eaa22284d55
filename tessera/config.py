"""`ModelConfig`: the one source of truth for a decoder's shapes.

A keyword-only dataclass, validated when built, versioned, and saved with every checkpoint
and run report. It converts to and from Hugging Face `config.json` dictionaries for the
Llama family (Llama, Mistral without sliding window, Qwen2, Qwen3, SmolLM) and carries the
named presets that `tessera info` lists. It knows nothing about weights or devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import ConfigError, UnsupportedModelError

CONFIG_VERSION = 1

# HF `model_type` -> (architecture class name, whether q/k/v carry a bias by default).
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder."""

    version: int = CONFIG_VERSION
    model_type: str = "llama"  # the HF family this config round-trips to
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads, filled in when built
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q, k, v projections
    attention_out_bias: bool = False  # bias on the output projection (Llama with bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_seq_len: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys carried through unchanged

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"ModelConfig version {self.version} is not supported (this Tessera reads "
                f"version {CONFIG_VERSION})"
            )
        if self.model_type not in HF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; "
                f"expected one of {sorted(HF_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            _check_positive_int("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim explicitly"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if not (0 < self.rms_norm_eps < 1):
            raise ConfigError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        _check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None:  # own a copy: callers may mutate theirs
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name, token in (("bos_token_id", self.bos_token_id),
                            ("pad_token_id", self.pad_token_id),
                            *(("eos_token_ids", t) for t in self.eos_token_ids)):
            if token is not None and not 0 <= token < self.vocab_size:
                raise ConfigError(
                    f"{name} {token} is outside the vocabulary (0..{self.vocab_size - 1})"
                )

    # ----------------------------------------------------------------- derived shapes
    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameter count of the model this config builds (tied weights counted once)."""
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.attention_bias + d * self.attention_out_bias
        attn += 2 * hd * self.qk_norm
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        total = self.num_layers * per_layer + d  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- JSON round trip
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        data = dict(data)
        if "eos_token_ids" in data:
            data["eos_token_ids"] = tuple(data["eos_token_ids"])
        try:
            return cls(**data)
        except TypeError as exc:  # a missing required key
            raise ConfigError(f"invalid ModelConfig: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"ModelConfig JSON is malformed: {exc}") from None

    # ----------------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dictionary (Llama family only)."""
        return _from_hf(hf)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dictionary transformers loads for this model."""
        return _to_hf(self)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; expected one of {ROPE_TYPES}"
        )
    if rope_type != "default" and not scaling.get("factor", 0) > 0:
        raise ConfigError(f"rope scaling {rope_type!r} needs a positive 'factor', got {scaling}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"llama3 rope scaling needs {key!r}, got {scaling}")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


def _hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read rope theta and scaling from either the legacy keys or `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params or None)
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.pop("type", None) or scaling.get("rope_type", "default")
        scaling["rope_type"] = rope_type
        scaling.pop("rope_theta", None)
        if rope_type == "default":
            scaling = None
    return theta, scaling


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"HF model_type {model_type!r} is not supported; Tessera runs "
            f"{', '.join(sorted(HF_ARCHITECTURES))}"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("MLP biases (mlp_bias=true) are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {hf['hidden_act']!r} is not supported (only silu)")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError(
            f"sliding-window attention (window {window}) is not supported"
        )
    theta, scaling = _hf_rope(hf)
    bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias,
            attention_out_bias=bias and model_type in ("llama", "mistral"),
            qk_norm=model_type == "qwen3",
            max_seq_len=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    except KeyError as exc:
        raise ConfigError(f"HF config.json lacks the key {exc.args[0]!r}") from None


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    eos: Any = list(cfg.eos_token_ids)
    if len(eos) == 1:
        eos = eos[0]
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,  # a copy:
        # transformers edits the dict it is given
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos if eos != [] else None,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": "float32",
    }
    if cfg.model_type in ("llama", "mistral"):
        if cfg.attention_bias != cfg.attention_out_bias:
            raise UnsupportedModelError(
                f"{cfg.model_type} has one attention_bias flag for q/k/v/o; this config "
                "sets them differently"
            )
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = False
    elif cfg.model_type == "qwen2" and (not cfg.attention_bias or cfg.attention_out_bias):
        raise UnsupportedModelError("qwen2 always has q/k/v biases and no output bias")
    elif cfg.model_type == "qwen3":
        if not cfg.qk_norm or cfg.attention_out_bias:
            raise UnsupportedModelError("qwen3 needs qk_norm=True and no output bias")
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type != "qwen3" and cfg.qk_norm:
        raise UnsupportedModelError(f"{cfg.model_type} has no per-head QK norm (use qwen3)")
    if cfg.model_type == "mistral":
        out["sliding_window"] = None
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    out.update(cfg.extra)
    return out


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_seq_len=8192, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        intermediate_size=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, max_seq_len=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
        max_seq_len=40960, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # Students: shapes sized to distill the SmolLM2 teacher on one CPU or GPU.
    "smollm2-student-15l": ModelConfig(
        vocab_size=49152, hidden_size=576, num_layers=15, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_seq_len=8192, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2,
    ),
    "student-48m": ModelConfig(
        vocab_size=49152, hidden_size=384, num_layers=12, num_heads=6, num_kv_heads=2,
        intermediate_size=1024, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_seq_len=8192, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2,
    ),
    "student-tiny": ModelConfig(
        vocab_size=49152, hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=512, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_seq_len=2048, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def load_config_file(path: str | Path) -> ModelConfig:
    """Read a Tessera `ModelConfig` JSON file, or an HF `config.json`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if "num_hidden_layers" in data:
        return ModelConfig.from_hf_config(data)
    return ModelConfig.from_dict(data)
