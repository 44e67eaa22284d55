"""Int8 weight-only matmul kernel against a float64 reference.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small shapes on CPU, covering the decode path (M <= 16, with and without
split-K; M = 1 takes the GEMV kernel) and the tiled path (M > 16), with K a multiple of 96
that is not a multiple of the K tile and N = 80, not a multiple of the N tile. `gpu` tests
run them compiled at full size.
Outputs are poisoned with NaN before each launch, so an element never written fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tessera.kernels import int8_matmul as kernels
from tessera.kernels import registry
from tessera.kernels.int8_matmul import int8_matmul_reference

SMALL = [(3, 288, 80), (1, 96, 80), (1, 288, 37), (16, 192, 48), (37, 288, 80)]  # (M, K, N)
LARGE = [(1, 4096, 4096), (1, 14336, 4096), (1, 576, 1728), (4, 4096, 14336),
         (16, 14336, 4096), (333, 4096, 4096), (2048, 4096, 1000)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(m: int, k: int, n: int, dtype: torch.dtype, device: str):
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scale = (0.5 + torch.rand(n, device=device)) / (127 * k**0.5)  # outputs of order 1
    return x, weight, scale


def float64_reference(x, weight, scale) -> torch.Tensor:
    return x.double() @ (weight.double() * scale.double()[:, None]).T


def check_launcher(shape, dtype, device, split_k=None):
    x, weight, scale = make_inputs(*shape, dtype, device)
    out = torch.full((shape[0], shape[2]), float("nan"), dtype=dtype, device=device)
    assert kernels.int8_matmul_forward(x, weight, scale, out=out, split_k=split_k) is out
    assert_close(out, float64_reference(x, weight, scale), dtype)


def check_op_leading_dims(dtype, device):
    """The registered function on x `[B, T, K]` (reshaped inside) matches the reference."""
    x, weight, scale = make_inputs(2 * 7, 192, 80, dtype, device)
    x = x.view(2, 7, 192)
    out = kernels.int8_matmul(x, weight, scale)
    assert out.shape == (2, 7, 80) and out.dtype == dtype
    assert_close(out, float64_reference(x, weight, scale), dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("split_k", [None, 1, 4])
@pytest.mark.parametrize("shape", SMALL)
def test_int8_matmul_interpreted(interpreter, shape, split_k):
    interpreter.run(check_launcher, shape, torch.float32, "cpu", split_k)


def test_int8_matmul_fp16_interpreted(interpreter):
    interpreter.run(check_launcher, SMALL[0], torch.float16, "cpu", 2)


def test_int8_matmul_leading_dims_interpreted(interpreter):
    interpreter.run(check_op_leading_dims, torch.float32, "cpu")


def test_reference_matches_float64():
    x, weight, scale = make_inputs(5, 288, 80, torch.float32, "cpu")
    assert_close(int8_matmul_reference(x, weight, scale), float64_reference(x, weight, scale),
                 torch.float32)


def test_skinny_tiling_splits_k_only_when_tiles_are_few():
    cpu = torch.device("cpu")  # 4 "SMs" off CUDA
    assert kernels.skinny_tiling(80, 4096, cpu) == (32, 2)  # 3 tiles, 8 // 3 splits
    assert kernels.skinny_tiling(80, 600, cpu) == (32, 1)  # too little K to split
    assert kernels.skinny_tiling(4096, 4096, cpu) == (64, 1)  # plenty of tiles


def test_launcher_rejects_bad_operands():
    x, weight, scale = make_inputs(3, 96, 80, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="int8"):
        kernels.int8_matmul_forward(x, weight.float(), scale)
    with pytest.raises(AssertionError, match="scale"):
        kernels.int8_matmul_forward(x, weight, scale.double())
    with pytest.raises(AssertionError, match="weight"):
        kernels.int8_matmul_forward(x, weight[:, :64].contiguous(), scale)


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("int8_matmul", "cuda").backend == "triton"
    assert registry.select("int8_matmul", "cpu").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", LARGE)
def test_int8_matmul_gpu(shape, dtype):
    check_launcher(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 5])
def test_int8_matmul_forced_split_gpu(split_k):
    check_launcher((7, 4096, 1000), torch.bfloat16, "cuda", split_k)
    check_launcher((1, 4096, 1000), torch.bfloat16, "cuda", split_k)


@pytest.mark.gpu
def test_int8_matmul_leading_dims_gpu():
    check_op_leading_dims(torch.bfloat16, "cuda")


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
from tessera.kernels import _triton, int4_matmul, int8_matmul, registry
assert not _triton.HAS_TRITON
for op in ("int8_matmul", "int4_matmul"):
    assert registry.available()[op] == ["torch"], registry.available()
    assert registry.select(op, "cuda").backend == "torch"
x, w, s = torch.randn(3, 64), torch.randint(-127, 128, (5, 64), dtype=torch.int8), torch.rand(5)
assert registry.get("int8_matmul", "cpu")(x, w, s).shape == (3, 5)
"""


def test_kernel_modules_import_without_triton(pytestconfig):
    root = str(pytestconfig.rootpath)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
