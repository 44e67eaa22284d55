"""glibc's allocator told to keep freed blocks, for serving on the CPU.

A CPU forward allocates and frees activations of a few to tens of MB in every layer (a
2,048-token prefill step of SmolLM2-135M: 14 MB gate/up halves, 25 MB fused gate/up
products). glibc hands blocks above its mmap threshold (128 KB at start, raised as large
blocks are freed, up to 32 MB) out as fresh mappings and unmaps them on free, and trims the
top of its heap once more than its trim threshold is free there, so such tensors keep
paying page faults and the zeroing of new pages. `keep_freed_memory()` fixes the mmap
threshold at glibc's maximum (32 MB on 64-bit) and the trim threshold at 1 GB: freed blocks
stay in the heap and the next step reuses them, as PyTorch's CUDA caching allocator does on
GPUs. Measured on a 2-core AMD EPYC host, SmolLM2-135M in float32: a 16 x 128-token prefill
step 1.87-2.07 s -> 1.62-1.77 s (docs/benchmarks.md).

The cost: the process keeps its peak activation memory after a step. It acts on the calling
process only, and only under glibc (elsewhere it does nothing); `tessera serve` calls it
for CPU models. An offline user on the CPU may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set both thresholds (see above); True where the C library has `mallopt` (glibc
    2.36 answers 1 to every call, so its answer says nothing more)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False  # no C library found, or one without mallopt (not glibc)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
