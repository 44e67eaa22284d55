"""Kernel registry: symbolic op names mapped to implementations.

Every op has a plain-torch reference, registered with `reference=True`; fast implementations
(Triton kernels, fused torch paths) register beside it with a predicate saying where they
can run. `get(name, device)` returns the first fast implementation whose predicate accepts
the device, unless the torch path is forced, in which case it returns the reference.

The torch path is forced by the environment variable `TESSERA_KERNELS=torch` or by
`force_torch()` (a context manager). Nothing here imports Triton; kernel modules do, and
register themselves only when it imports.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

DevicePredicate = Callable[[torch.device], bool]


@dataclass(frozen=True)
class KernelImpl:
    name: str  # op name, e.g. "rms_norm"
    backend: str  # "torch", "sdpa", "triton", ...
    fn: Callable
    supports: DevicePredicate
    priority: int  # higher wins among fast implementations


_REFERENCES: dict[str, KernelImpl] = {}
_FAST: dict[str, list[KernelImpl]] = {}
_local = threading.local()


def _always(_device: torch.device) -> bool:
    return True


def on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def register(name: str, backend: str, fn: Callable, *, reference: bool = False,
             supports: DevicePredicate = _always, priority: int = 0) -> Callable:
    """Register `fn` as an implementation of op `name`; returns `fn` so it can decorate."""
    impl = KernelImpl(name, backend, fn, supports, priority)
    if reference:
        _REFERENCES[name] = impl
    else:
        impls = [i for i in _FAST.get(name, []) if i.backend != backend]
        _FAST[name] = sorted([*impls, impl], key=lambda i: -i.priority)
    return fn


def torch_forced() -> bool:
    return getattr(_local, "forced", False) or os.environ.get("TESSERA_KERNELS", "") == "torch"


@contextlib.contextmanager
def force_torch(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread only), every op resolves to its torch reference."""
    previous = getattr(_local, "forced", False)
    _local.forced = enabled
    try:
        yield
    finally:
        _local.forced = previous


def select(name: str, device: torch.device | str) -> KernelImpl:
    if name not in _REFERENCES:
        raise KeyError(f"no kernel registered under {name!r}; known: {sorted(_REFERENCES)}")
    if not torch_forced():
        device = torch.device(device)
        for impl in _FAST.get(name, []):
            if impl.supports(device):
                return impl
    return _REFERENCES[name]


def get(name: str, device: torch.device | str) -> Callable:
    return select(name, device).fn


def fallback(name: str, backend: str, device: torch.device | str) -> Callable:
    """The best implementation of `name` on `device` ranked below `backend` (for inputs
    that `backend` does not handle); the reference when none is."""
    device = torch.device(device)
    rank = next(i.priority for i in _FAST[name] if i.backend == backend)
    for impl in _FAST[name]:
        if impl.priority < rank and impl.supports(device):
            return impl.fn
    return _REFERENCES[name].fn


def reference(name: str) -> Callable:
    return _REFERENCES[name].fn


def available() -> dict[str, list[str]]:
    """Op name -> backends registered for it (reference first)."""
    return {name: [ref.backend] + [i.backend for i in _FAST.get(name, [])]
            for name, ref in sorted(_REFERENCES.items())}
