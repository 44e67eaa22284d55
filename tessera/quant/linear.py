"""`QuantizedLinear`: the base of the modules that replace `nn.Linear` in a quantized model.

A quantized Linear computes `matmul(x * input_scale) + bias`, where `matmul` is its
method's registered op applied to its stored (quantized) weight, `input_scale` `[K]` is
optional (AWQ's activation scale where it cannot be folded into a preceding layer) and
`bias` `[N]` is optional. Everything it holds is a buffer, so `state_dict()` carries it.

Subclasses name their quantized tensors in `STORAGE`; those keep their dtype (int8, uint8,
float8, fp32 scales) under `.to(dtype)`, `.half()` and the like, which still move them
between devices. Bias and input scale follow the activation dtype like any float tensor.

`KINDS` maps each subclass's `kind` (the name written into a checkpoint) to the class, so
a loader can rebuild empty modules from a checkpoint's spec and fill them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn

KINDS: dict[str, type[QuantizedLinear]] = {}


class QuantizedLinear(nn.Module):
    kind: ClassVar[str]
    STORAGE: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls

    def __init__(self, in_features: int, out_features: int, *,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_scale",
                             None if input_scale is None else input_scale.detach().clone())

    # -------------------------------------------------------------------- subclass API
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` for the stored W, in x's dtype."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight W `[N, K]` this module multiplies by (input scale not included)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Constructor options beyond the shapes, written into the checkpoint spec."""
        return {}

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, input_scale: bool,
              **options: Any) -> QuantizedLinear:
        """A module with uninitialised tensors of the right shapes, to be loaded into."""
        raise NotImplementedError

    # -------------------------------------------------------------------- common
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def spec(self) -> dict[str, Any]:
        """What a loader needs to rebuild this module empty (see `build_empty`)."""
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "input_scale": self.input_scale is not None, **self.options()}

    def extra_repr(self) -> str:
        extra = ", input_scale" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{extra}")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # NOTE: `Module.to(dtype)` converts every floating tensor, float8 weights and fp32
        # scales included; take the stored tensors out, then move them without converting.
        order = list(self._buffers)
        stored = {name: self._buffers.pop(name) for name in self.STORAGE}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in stored.items():
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else \
                    tensor.to(moved.device)
            self._buffers = {name: self._buffers[name] for name in order}
        return self


def build_empty(spec: dict[str, Any], device: torch.device | str = "meta") -> QuantizedLinear:
    """An empty module of `spec` (from `QuantizedLinear.spec()`) on `device`."""
    spec = dict(spec)
    cls = KINDS[spec.pop("kind")]
    with torch.device(device):
        return cls.empty(spec.pop("in_features"), spec.pop("out_features"),
                         bias=spec.pop("bias"), input_scale=spec.pop("input_scale"), **spec)


def linear_parts(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight in fp32, bias or None) of a Linear, detached."""
    bias = None if linear.bias is None else linear.bias.detach()
    return linear.weight.detach().float(), bias
