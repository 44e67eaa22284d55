"""`QuantConfig`: which method quantizes which layers, with which options.

One keyword-only dataclass for every method; options a method does not use keep their
defaults and are ignored by it. It is validated on construction and saved, as `to_dict()`,
in a quantized checkpoint's `config.json` (`quantization_config`).

Methods:
- `int8`: per-output-channel symmetric int8 weights, round to nearest.
- `int4`: group-wise asymmetric int4 weights with zero points, round to nearest (the
  baseline AWQ improves on).
- `awq`: activation-aware scaling searched on calibration text, then `int4` (bits=4) or
  `int8` (bits=8) weights.
- `fp8`: float8 e4m3 weights with per-channel or per-tensor scales; activations quantized
  per token at run time (`activations="dynamic"`) or left alone (`"none"`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tessera.errors import ConfigError

METHODS = ("int8", "int4", "awq", "fp8")
FP8_ACTIVATIONS = ("dynamic", "none")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    method: str
    skip: tuple[str, ...] = ("lm_head",)  # fnmatch patterns of Linear names left as they are
    # int4 and awq
    bits: int = 4  # awq only: 4 (group-wise int4) or 8 (per-channel int8)
    group_size: int = 128  # upper bound; each layer uses the largest valid divisor of K
    # awq calibration and search
    calibration_source: str = "python-stdlib"
    calibration_tokens: int = 4096
    calibration_seq_len: int = 512
    val_fraction: float = 0.02  # documents held out from calibration (the eval split)
    max_samples: int = 512  # activation rows per layer input kept for the scale search
    num_grid: int = 20  # alpha takes num_grid + 1 values 0, 1/num_grid, ..., 1
    # fp8
    per_channel: bool = True
    activations: str = "dynamic"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; use one of "
                              f"{', '.join(METHODS)}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.method == "awq" and self.bits not in (4, 8):
            raise ConfigError(f"awq bits must be 4 or 8, got {self.bits}")
        if self.group_size < 16 or self.group_size % 16:
            raise ConfigError(f"group_size must be a positive multiple of 16, got "
                              f"{self.group_size}")
        if self.activations not in FP8_ACTIVATIONS:
            raise ConfigError(f"fp8 activations must be one of {FP8_ACTIVATIONS}, got "
                              f"{self.activations!r}")
        for name in ("calibration_tokens", "calibration_seq_len", "max_samples", "num_grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def build(cls, method: str, **options: Any) -> QuantConfig:
        """`QuantConfig(method=method, **options)` with a ConfigError naming a bad option."""
        known = {f.name for f in fields(cls)} - {"method"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown quantization option(s) {unknown}; known: "
                              f"{sorted(known)}")
        return cls(method=method, **options)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skip"] = list(self.skip)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        return cls.build(data.pop("method"), **data)
