"""Without Triton, the kernel modules still import and register only their references."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import tessera.model.attention  # registers the attention references
from tessera.kernels import _triton, flash_attention, registry, rms_norm, swiglu
assert not _triton.HAS_TRITON
backends = registry.available()
for op in ("attention", "rms_norm", "add_rms_norm", "swiglu"):
    assert "triton" not in backends[op], backends
assert registry.select("attention", "cuda").backend == "sdpa"
assert registry.select("add_rms_norm", "cuda").backend == "torch"
"""


def test_kernel_modules_import_without_triton(pytestconfig):
    root = str(pytestconfig.rootpath)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
