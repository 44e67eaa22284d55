"""Triton as an optional dependency of the kernel modules.

Kernel modules import `triton` and `tl` from here. Where Triton imports, these are the real
modules and `HAS_TRITON` is True. Where it does not, `triton` is an inert stand-in whose
`jit`, `autotune` and `Config` let the module still define its (never launched) kernels,
`tl` is None, and the module registers only its torch reference. Kernel signatures annotate
`tl.constexpr` under `from __future__ import annotations`, so `tl` is never evaluated there.

`interpreting()` says whether kernels decorated now run on Triton's CPU interpreter
(`TRITON_INTERPRET=1`). NOTE: Triton reads the variable when `@triton.jit` runs, i.e. when a
kernel module is imported, not when a kernel launches.

`use_pdl(device)` says whether decode-path kernels launch as programmatic dependent launches
there (Hopper and later, compiled): such a kernel may start while the kernel before it ends,
does only what reads no earlier kernel's output (launch, loading weights) before
`tl.extra.cuda.gdc_wait()`, and lets the next one start early. `TESSERA_PDL=0` turns it off.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

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

__all__ = ["HAS_TRITON", "interpreting", "tl", "triton", "use_pdl"]


def interpreting() -> bool:
    """True when `TRITON_INTERPRET=1`: kernels decorated now run on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launches on `device` (see above)."""
    if device.type != "cuda" or interpreting() or os.environ.get("TESSERA_PDL", "1") == "0":
        return False
    return _compute_capability(device.index if device.index is not None
                               else torch.cuda.current_device()) >= 9


@functools.cache
def _compute_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]
