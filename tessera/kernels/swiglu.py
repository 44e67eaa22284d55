"""SwiGLU activation: `silu(gate) * up`, elementwise, in the inputs' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels import registry


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


registry.register("swiglu", "torch", swiglu_reference, reference=True)
