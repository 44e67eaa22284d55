"""Group-wise int4 matmul kernel against a float64 reference.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small shapes on CPU: the decode path (with and without split-K, including
splits left without a K tile) and the tiled path, group sizes 96 (K tiles of 32 inside a
group), 32 and 16, K a multiple of 96 and N = 80. `gpu` tests run them compiled at full
size. Outputs are poisoned with NaN before each launch.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import int4_matmul as kernels
from tessera.kernels import registry
from tessera.kernels.int4_matmul import (
    dequantize_int4,
    int4_matmul_reference,
    pack_int4,
    unpack_int4,
)

SMALL = [(3, 288, 80, 96), (1, 192, 80, 32), (16, 96, 48, 16), (37, 288, 80, 96)]
LARGE = [(1, 4096, 4096, 128), (4, 4096, 14336, 128), (16, 14336, 4096, 128),
         (333, 4096, 4096, 128), (2048, 576, 1536, 96)]  # (M, K, N, group)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(m: int, k: int, n: int, group: int, dtype: torch.dtype, device: str):
    x = torch.randn(m, k, device=device).to(dtype)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = (0.5 + torch.rand(n, k // group, device=device)) / (8 * k**0.5)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device=device)
    return x, codes, scales, zeros


def float64_weight(codes, scales, zeros, group) -> torch.Tensor:
    """W[n, k] = (q - z[n, k // group]) * s[n, k // group], straight from the definition."""
    g = torch.arange(codes.shape[1], device=codes.device) // group
    return (codes.double() - zeros.double()[:, g]) * scales.double()[:, g]


def check_launcher(shape, dtype, device, split_k=None):
    m, k, n, group = shape
    x, codes, scales, zeros = make_inputs(m, k, n, group, dtype, device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    result = kernels.int4_matmul_forward(x, pack_int4(codes), scales, zeros, group, out=out,
                                         split_k=split_k)
    assert result is out
    assert_close(out, x.double() @ float64_weight(codes, scales, zeros, group).T, dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("split_k", [None, 4])
@pytest.mark.parametrize("shape", SMALL)
def test_int4_matmul_interpreted(interpreter, shape, split_k):
    interpreter.run(check_launcher, shape, torch.float32, "cpu", split_k)


def test_int4_matmul_fp16_interpreted(interpreter):
    interpreter.run(check_launcher, SMALL[0], torch.float16, "cpu", 1)


def test_pack_unpack_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 3] & 0xF, codes[:, 6])  # even k: low nibble
    assert torch.equal(packed[:, 3] >> 4, codes[:, 7])  # odd k: high nibble
    assert torch.equal(unpack_int4(packed), codes)


def test_reference_matches_definition():
    m, k, n, group = 5, 288, 80, 96
    x, codes, scales, zeros = make_inputs(m, k, n, group, torch.float32, "cpu")
    w64 = float64_weight(codes, scales, zeros, group)
    torch.testing.assert_close(dequantize_int4(pack_int4(codes), scales, zeros, group).double(),
                               w64, rtol=1e-6, atol=1e-7)
    out = int4_matmul_reference(x, pack_int4(codes), scales, zeros, group)
    assert_close(out, x.double() @ w64.T, torch.float32)


def test_block_k_divides_the_group():
    assert kernels.block_k(128, 128) == 128
    assert kernels.block_k(128, 64) == 64
    assert kernels.block_k(96, 128) == 32
    assert kernels.block_k(16, 64) == 16


def test_launcher_rejects_bad_operands():
    x, codes, scales, zeros = make_inputs(3, 96, 80, 32, torch.float32, "cpu")
    packed = pack_int4(codes)
    with pytest.raises(AssertionError, match="group_size"):
        kernels.int4_matmul_forward(x, packed, scales, zeros, 40)
    with pytest.raises(AssertionError, match="qweight"):
        kernels.int4_matmul_forward(x, codes, scales, zeros, 32)  # unpacked codes
    with pytest.raises(AssertionError, match="zeros"):
        kernels.int4_matmul_forward(x, packed, scales, zeros.float(), 32)


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("int4_matmul", "cuda").backend == "triton"
    assert registry.select("int4_matmul", "cpu").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", LARGE)
def test_int4_matmul_gpu(shape, dtype):
    check_launcher(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 5])
def test_int4_matmul_forced_split_gpu(split_k):
    check_launcher((7, 4096, 1000, 128), torch.bfloat16, "cuda", split_k)
