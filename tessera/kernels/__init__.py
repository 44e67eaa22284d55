"""Kernels: fused ops with their torch references, looked up through `registry`.

Importing this package registers every op's torch reference and, where Triton imports,
the Triton implementations (picked automatically on CUDA).
"""

from tessera.kernels import (  # noqa: F401  (importing registers the ops)
    flash_attention,
    fused_kd_loss,
    gemv,
    int4_matmul,
    int8_matmul,
    kv_write,
    paged_decode,
    registry,
    rms_norm,
    rope,
    rope_kv_write,
    swiglu,
)

__all__ = ["registry"]
