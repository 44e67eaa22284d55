"""RMSNorm: `y = x / sqrt(mean(x^2) + eps) * weight`, computed in fp32, returned in x's dtype.

The torch reference matches Hugging Face's LlamaRMSNorm exactly (normalise in fp32, cast
back, then scale), so checkpoints reproduce transformers' logits.
"""

from __future__ import annotations

import torch

from tessera.kernels import registry


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


registry.register("rms_norm", "torch", rms_norm_reference, reference=True)
