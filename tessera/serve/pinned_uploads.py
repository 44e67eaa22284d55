"""Small host-to-device uploads through persistent pinned host mirrors.

A decode step sends a few hundred integers to the GPU (token ids, positions, slots, block
tables, context lengths). Building a fresh pinned tensor for each costs more host time than
the copy itself, so every destination buffer gets a pinned host mirror of the same shape,
allocated once: an upload writes the values into the mirror through its numpy view and
queues an asynchronous copy of the same region. The region is any numpy index (`np.s_[:n]`,
`np.s_[:rows, :cols]`) valid for both.

Tensors of other sizes go through `host_to_device`: a pinned copy from PyTorch's caching
host allocator (which reuses a buffer only once its copy is done) and an asynchronous
upload. A plain `torch.tensor(values, device="cuda")` would instead wait for every kernel
already queued, which overlapped steps cannot afford.

NOTE: a mirror must not be rewritten while a copy still reads it. Uploads happen in rounds
(`with uploads.round(): ...`); a round first waits for the previous round's copies (an
event, normally long done) and records its own at the end. On the CPU the mirrors are
plain tensors and the copies synchronous. This module knows nothing about what the buffers
mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class PinnedUploads:
    def __init__(self, destinations: Mapping[str, torch.Tensor]):
        self.destinations = dict(destinations)
        self.is_cuda = any(t.device.type == "cuda" for t in self.destinations.values())
        self.mirrors = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=self.is_cuda)
                        for name, t in self.destinations.items()}
        self._arrays = {name: m.numpy() for name, m in self.mirrors.items()}
        self._copied: torch.cuda.Event | None = None

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        if self._copied is not None:
            self._copied.synchronize()  # NOTE: waits only if last round's copies still run
        yield
        if self.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def upload(self, name: str, region: Any, values: Any) -> None:
        """Write `values` (a number, list or nested list fitting `region`) into
        `destinations[name][region]`."""
        self._arrays[name][region] = values
        self.destinations[name][region].copy_(self.mirrors[name][region], non_blocking=True)


def host_to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, without waiting for the device's queued work."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)
