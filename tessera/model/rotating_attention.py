"""Attention that leaves the rotary embedding to its context, applied to a loaded model for
serving on the GPU.

`use_rotating_attention(model)` makes every `Attention` of the model a `RotatingAttention`:
where the attention context has a `rotate_and_attend(layer_idx, q, k, v, cos, sin)` method
(the serving engine's paged context), the layer hands it q and k before their rotary
embedding, and the context rotates them as it writes the keys and values to its KV pool,
one "rope_kv_write" launch (`tessera/kernels/rope_kv_write.py`) instead of a "rope" and a
"kv_write": a launch a layer fewer in every step. Under any other context (training, plain
generation) the layer runs as `Attention` does.

Parameters, `state_dict` and results are unchanged (the rotation and the stored keys are
the ones "rope" and "kv_write" produce, up to the order of fp32 operations). Only layers
whose weights sit on a device where a fast "rope_kv_write" is registered (CUDA) are changed,
unless `everywhere=True` (tests). `undo_rotating_attention` restores plain `Attention`s.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from tessera.kernels import registry
from tessera.model.attention import AttentionContext
from tessera.model.transformer import Attention


class RotatingAttention(Attention):
    """`Attention` whose context rotates q and k, where the context can (see above).

    NOTE: installed by reassigning an `Attention` object's class (`use_rotating_attention`),
    so that the object keeps its submodules (fused or quantized projections included)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        rotate_and_attend = getattr(ctx, "rotate_and_attend", None)
        if rotate_and_attend is None:
            return super().forward(x, cos, sin, ctx)
        q, k, v = self.project(x)
        out = rotate_and_attend(self.layer_idx, q, k, v, cos, sin)  # [B, T, H, D]
        return self.o_proj(out.reshape(*x.shape[:2], -1))


def _device_of(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device


def use_rotating_attention(model: nn.Module, *, everywhere: bool = False) -> int:
    """Make the model's `Attention`s `RotatingAttention`s (see above), in place; returns the
    number changed."""
    changed = 0
    for module in model.modules():
        if type(module) is Attention and (
                everywhere or registry.select("rope_kv_write", _device_of(module)).backend
                != "torch"):
            module.__class__ = RotatingAttention
            changed += 1
    return changed


def undo_rotating_attention(model: nn.Module) -> int:
    """Undo `use_rotating_attention`; returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if type(module) is RotatingAttention:
            module.__class__ = Attention
            restored += 1
    return restored
