"""Group-wise int4 weight-only matmul with zero points (the AWQ layout).

Op "int4_matmul": `int4_matmul(x, qweight, scales, zeros, group_size) -> out` computes
`x @ W.T` for x `[..., K]` (fp32, fp16 or bf16), where W `[N, K]` is stored as

- qweight uint8 `[N, K // 2]`: 4-bit codes q in 0..15, two per byte along K (even k in the
  low nibble, odd k in the high nibble);
- scales fp32 `[N, K // group_size]` and zeros uint8 `[N, K // group_size]`: one scale s and
  one zero point z in 0..15 per group of `group_size` consecutive k;

and `W[n, k] = (q[n, k] - z[n, g]) * s[n, g]` with `g = k // group_size`. `group_size` is a
multiple of 16 dividing K. out `[..., N]` is in x's dtype.

Torch reference: unpack and dequantise the whole weight into x's dtype, then one matmul.

Triton kernel: the layout of `int8_matmul.py` (decode path with split-K for M <= 16, tiled
GEMM above), with K tiles that never straddle a group (BLOCK_K divides group_size). Each
tile's codes are unpacked inside the K loop, the zero point subtracted (exact small
integers in x's dtype), the tile multiplied on the tensor cores, and the group's scale
applied to the tile's fp32 partial product. No backward; knows nothing about AWQ itself.
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton
from tessera.kernels.int8_matmul import (
    FLOAT_DTYPES,
    GROUP_M,
    SKINNY_MAX_M,
    autotune_configs,
    m_bucket,
    skinny_tiling,
    sum_splits,
    tile_coords,
)

MIN_GROUP = 16  # smallest K extent of a tensor-core dot


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 `[N, K]` (K even) -> packed uint8 `[N, K // 2]`."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: packed uint8 `[N, K // 2]` -> codes uint8 `[N, K]`."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W `[N, K]` in `dtype`, computed in fp32."""
    codes = unpack_int4(qweight).float()
    n, k = codes.shape
    grouped = codes.view(n, k // group_size, group_size) - zeros.float()[..., None]
    return (grouped * scales.float()[..., None]).reshape(n, k).to(dtype)


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return x @ dequantize_int4(qweight, scales, zeros, group_size, x.dtype).T


# ---------------------------------------------------------------------------- kernels


# BLOCK_K is fixed by the group size (see `block_k`), so only the rest is tuned.
_SKINNY_CONFIGS = autotune_configs([({}, 4, 3), ({}, 4, 4), ({}, 2, 4), ({}, 8, 3)],
                                   interpreted={})
_LARGE_CONFIGS = autotune_configs(
    [({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in
     [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3)]],
    interpreted={"BLOCK_M": 16, "BLOCK_N": 32})
_TUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE"]


@triton.jit
def _int4_matmul_kernel(X, QW, S, Z, OUT, M, N, K, M_BUCKET, GROUP_SIZE, stride_xm,
                        stride_qn, stride_sn, stride_om, stride_osplit,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, GROUP: tl.constexpr):
    """OUT[split] = X[:, ks] @ W[:, ks].T for this program's K range ks (see int8_matmul)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    qw_cols = QW + offs_n.to(tl.int64)[None, :] * stride_qn
    s_cols = S + offs_n.to(tl.int64) * stride_sn
    z_cols = Z + offs_n.to(tl.int64) * stride_sn
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_first = split * tiles_per_split * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        k0 = k_first + i * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        packed = tl.load(qw_cols + (offs_k // 2)[:, None],
                         mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)
        codes = (packed >> ((offs_k % 2) * 4)[:, None]) & 0xF  # [BLOCK_K, BLOCK_N]
        # Tiles past K (the last split's tail) read the last group; x is zero there.
        group = tl.minimum(k0, K - 1) // GROUP_SIZE
        scale = tl.load(s_cols + group, mask=mask_n, other=0.0)
        zero = tl.load(z_cols + group, mask=mask_n, other=0).to(tl.int32)
        w = (codes - zero[None, :]).to(x.dtype)  # exact: integers in -15..15
        acc += tl.dot(x, w) * scale[None, :]
    out = OUT + split.to(tl.int64) * stride_osplit + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(out + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_skinny_kernel = triton.autotune(configs=_SKINNY_CONFIGS, key=_TUNE_KEY)(_int4_matmul_kernel)
_large_kernel = triton.autotune(configs=_LARGE_CONFIGS, key=_TUNE_KEY)(_int4_matmul_kernel)


# ---------------------------------------------------------------------------- launchers


def block_k(group_size: int, limit: int) -> int:
    """The largest power of two <= limit dividing group_size (>= 16 since 16 | group)."""
    size = limit
    while group_size % size:
        size //= 2
    return size


def _check_operands(x, qweight, scales, zeros, group_size: int, out) -> None:
    m, k = x.shape
    n = qweight.shape[0]
    assert x.dtype in FLOAT_DTYPES, f"x: dtype {x.dtype}, expected one of {FLOAT_DTYPES}"
    assert group_size % MIN_GROUP == 0 and k % group_size == 0, \
        f"group_size {group_size} must be a multiple of {MIN_GROUP} dividing K={k}"
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2), \
        f"qweight: {qweight.dtype} {tuple(qweight.shape)}, expected uint8 (N, {k // 2})"
    groups = (n, k // group_size)
    assert scales.dtype == torch.float32 and scales.shape == groups, \
        f"scales: {scales.dtype} {tuple(scales.shape)}, expected float32 {groups}"
    assert zeros.dtype == torch.uint8 and zeros.shape == groups, \
        f"zeros: {zeros.dtype} {tuple(zeros.shape)}, expected uint8 {groups}"
    assert out.shape == (m, n) and out.dtype == x.dtype, \
        f"out: {out.dtype} {tuple(out.shape)}, expected {x.dtype} ({m}, {n})"
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros),
                    ("out", out)):
        assert t.is_contiguous(), f"{name} must be contiguous"
        assert t.device == x.device, f"{name} is on {t.device}, x on {x.device}"


def int4_matmul_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int, *,
                        out: torch.Tensor | None = None,
                        split_k: int | None = None) -> torch.Tensor:
    """Launch on 2-D contiguous x `[M, K]`; `split_k` overrides the decode path's choice."""
    assert x.dim() == 2 and qweight.dim() == 2, "x and qweight must be matrices"
    m, n = x.shape[0], qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    _check_operands(x, qweight, scales, zeros, group_size, out)
    if m == 0 or n == 0:
        return out
    if m <= SKINNY_MAX_M:
        _launch_skinny(x, qweight, scales, zeros, group_size, out, split_k)
    else:
        _launch_large(x, qweight, scales, zeros, group_size, out)
    return out


def _launch_skinny(x, qweight, scales, zeros, group_size, out, split_k) -> None:
    (m, k), n = x.shape, qweight.shape[0]
    block_n, chosen = skinny_tiling(n, k, x.device)
    split_k = chosen if split_k is None else split_k
    assert split_k >= 1, f"split_k must be >= 1, got {split_k}"
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32,
                                                  device=x.device)
    bk = block_k(group_size, 32 if interpreting() else 128)
    grid = (triton.cdiv(m, SKINNY_MAX_M) * triton.cdiv(n, block_n), split_k)
    _skinny_kernel[grid](x, qweight, scales, zeros, target, m, n, k, m_bucket(m), group_size,
                         x.stride(0), qweight.stride(0), scales.stride(0), n, m * n,
                         BLOCK_M=SKINNY_MAX_M, BLOCK_N=block_n, BLOCK_K=bk, SPLIT_K=split_k,
                         GROUP=1)
    if split_k > 1:
        sum_splits(target, out)


def _launch_large(x, qweight, scales, zeros, group_size, out) -> None:
    (m, k), n = x.shape, qweight.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

    bk = block_k(group_size, 32 if interpreting() else 64)
    _large_kernel[grid](x, qweight, scales, zeros, out, m, n, k, m_bucket(m), group_size,
                        x.stride(0), qweight.stride(0), scales.stride(0), n, 0, BLOCK_K=bk,
                        SPLIT_K=1, GROUP=GROUP_M)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The op on x of any leading shape `[..., K]` (inference only: no autograd)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = int4_matmul_forward(rows, qweight.contiguous(), scales.float().contiguous(),
                              zeros.contiguous(), group_size)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


registry.register("int4_matmul", "torch", int4_matmul_reference, reference=True)
if HAS_TRITON:
    registry.register("int4_matmul", "triton", int4_matmul, supports=registry.on_cuda)
