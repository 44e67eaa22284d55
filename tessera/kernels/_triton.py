"""Triton as an optional dependency of the kernel modules.

Kernel modules import `triton` and `tl` from here. Where Triton imports, these are the real
modules and `HAS_TRITON` is True. Where it does not, `triton` is an inert stand-in whose
`jit`, `autotune` and `Config` let the module still define its (never launched) kernels,
`tl` is None, and the module registers only its torch reference. Kernel signatures annotate
`tl.constexpr` under `from __future__ import annotations`, so `tl` is never evaluated there.

`interpreting()` says whether kernels decorated now run on Triton's CPU interpreter
(`TRITON_INTERPRET=1`). NOTE: Triton reads the variable when `@triton.jit` runs, i.e. when a
kernel module is imported, not when a kernel launches.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    tl = None
    triton = SimpleNamespace(
        jit=lambda fn=None, **_kwargs: fn if fn is not None else (lambda f: f),
        autotune=lambda *_args, **_kwargs: (lambda f: f),
        Config=lambda *args, **kwargs: (args, kwargs),
    )

__all__ = ["HAS_TRITON", "interpreting", "tl", "triton"]


def interpreting() -> bool:
    """True when `TRITON_INTERPRET=1`: kernels decorated now run on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
