"""Kernels: fused ops with their torch references, looked up through `registry`.

Importing this package registers every op's torch reference and, where Triton imports,
the Triton implementations (picked automatically on CUDA).
"""

from tessera.kernels import registry, rms_norm, swiglu  # noqa: F401  (register the ops)

__all__ = ["registry"]
