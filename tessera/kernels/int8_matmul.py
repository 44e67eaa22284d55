"""Int8 weight-only matmul with per-output-channel scales.

Op "int8_matmul": `int8_matmul(x, weight, scale) -> out` computes `x @ (weight * scale[:, None]).T`
for x `[..., K]` (fp32, fp16 or bf16), weight int8 `[N, K]` (row n holds output channel n),
scale fp32 `[N]`; out `[..., N]` in x's dtype. Activations are never quantized.

Torch reference: dequantise the whole weight into x's dtype, then one matmul.

Triton kernel: streams int8 weight tiles and dequantises each one inside the K loop (the
conversion to x's dtype is exact, |q| <= 127), accumulates in fp32 and multiplies by the
per-channel scale once after the loop, since the scale is constant along K. Three regimes:

- one row (single-stream decode), and up to 4 rows against small weights: the few-row
  GEMV of `gemv.py` (no tensor cores; the weight's int8 codes loaded in large K steps,
  scaled after the reduction; a programmatic dependent launch on Hopper).
- other decode-shaped calls, M <= 16 (and any call given `split_k`): BLOCK_M = 16 and
  split-K. Each output tile's K range is divided among SPLIT_K programs so that a handful
  of rows still occupies every SM; the programs write fp32 partial sums into a workspace
  `[SPLIT_K, M, N]` that a second small kernel adds up in a fixed order (deterministic, no
  atomics) and casts.
- prefill-shaped, M > 16: a tiled GEMM with grouped tile order for L2 reuse.

Tile sizes are autotuned per (M bucket, N, K, dtypes); under Triton's CPU interpreter one
small fixed tile is used. NOTE: the first call for a new shape benchmarks the candidates;
warm up before capturing CUDA graphs. There is no backward: the weights are frozen. On GPUs
fp32 inputs go through TF32 dots. This module knows nothing about how weights are quantized
(see `tessera.quant`).
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton
from tessera.kernels.gemv import QUANTIZED_MAX_ROWS, gemv_forward, prefers_gemv

SKINNY_MAX_M = 16  # rows handled by the split-K decode path
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 512
GROUP_M = 8
_REDUCE_BLOCK = 1024
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight * scale[:, None]`, computed in fp32 and returned in `dtype`."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor,
                          scale: torch.Tensor) -> torch.Tensor:
    return x @ dequantize_int8(weight, scale, x.dtype).T


# ---------------------------------------------------------------------------- kernels


def autotune_configs(tiles: list[tuple[dict, int, int]], interpreted: dict) -> list:
    """Autotune candidates `(meta, num_warps, num_stages)`, or one small tile under the
    interpreter, where benchmarking would take minutes."""
    if interpreting():
        tiles = [(interpreted, 4, 1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in tiles]


# Decode: BLOCK_M = 16 and BLOCK_N / SPLIT_K come from the launcher; only BLOCK_K is tuned.
_SKINNY_CONFIGS = autotune_configs(
    [({"BLOCK_K": 64}, 4, 4), ({"BLOCK_K": 128}, 4, 3), ({"BLOCK_K": 128}, 4, 4),
     ({"BLOCK_K": 128}, 2, 4), ({"BLOCK_K": 256}, 4, 3), ({"BLOCK_K": 256}, 8, 3)],
    interpreted={"BLOCK_K": 32})
_LARGE_CONFIGS = autotune_configs(
    [({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, w, s) for m, n, k, w, s in
     [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
      (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3)]],
    interpreted={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
# The autotuner appends every tensor argument's dtype to this key by itself.
_TUNE_KEY = ["M_BUCKET", "N", "K"]


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP row tiles at a time, so that programs
    running together share weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _int8_matmul_kernel(X, W, S, OUT, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_om,
                        stride_osplit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP: tl.constexpr):
    """OUT[split] = (X[:, ks] @ W[:, ks].T) * S for this program's K range ks; with
    SPLIT_K == 1, OUT is the output itself (stride_osplit unused)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = W + offs_n.to(tl.int64)[None, :] * stride_wn
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_first = split * tiles_per_split * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        offs_k = k_first + i * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                    other=0)  # [BLOCK_K, BLOCK_N] int8
        acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(S + offs_n, mask=mask_n, other=0.0)
    acc = acc * scale[None, :]
    out = OUT + split.to(tl.int64) * stride_osplit + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(out + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_skinny_kernel = triton.autotune(configs=_SKINNY_CONFIGS, key=_TUNE_KEY)(_int8_matmul_kernel)
_large_kernel = triton.autotune(configs=_LARGE_CONFIGS, key=_TUNE_KEY)(_int8_matmul_kernel)


@triton.jit
def _sum_splits_kernel(WS, OUT, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """OUT = sum over the leading axis of WS `[SPLIT_K, numel]`, in a fixed order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(WS + s * numel + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 4 elsewhere (the interpreter), so that split-K is exercised."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def skinny_tiling(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, SPLIT_K) for the decode path: narrow column tiles when there are few, then
    enough K splits for about two programs per SM, each covering >= MIN_K_PER_SPLIT."""
    sms = num_sms(device)
    block_n = 64 if -(-n // 64) >= sms else 32
    tiles = -(-n // block_n)
    split_k = min(MAX_SPLIT_K, (2 * sms) // tiles, k // MIN_K_PER_SPLIT)
    return block_n, max(1, split_k)


def m_bucket(m: int) -> int:
    """Autotuning key for M: powers of two (capped), so prefill lengths share a tuning."""
    return min(1 << (m - 1).bit_length(), 4096)


def sum_splits(workspace: torch.Tensor, out: torch.Tensor) -> None:
    """`out = workspace.sum(0)` (fp32 adds in split order), cast to out's dtype."""
    numel = out.numel()
    _sum_splits_kernel[(triton.cdiv(numel, _REDUCE_BLOCK),)](
        workspace, out, numel, SPLIT_K=workspace.shape[0], BLOCK=_REDUCE_BLOCK)


def _check_operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    out: torch.Tensor) -> None:
    m, k = x.shape
    n = weight.shape[0]
    assert x.dtype in FLOAT_DTYPES, f"x: dtype {x.dtype}, expected one of {FLOAT_DTYPES}"
    assert weight.dtype == torch.int8, f"weight: dtype {weight.dtype}, expected int8"
    assert weight.shape == (n, k), f"weight: shape {tuple(weight.shape)}, expected (N, {k})"
    assert scale.dtype == torch.float32 and scale.shape == (n,), \
        f"scale: {scale.dtype} {tuple(scale.shape)}, expected float32 ({n},)"
    assert out.shape == (m, n) and out.dtype == x.dtype, \
        f"out: {out.dtype} {tuple(out.shape)}, expected {x.dtype} ({m}, {n})"
    for name, t in (("x", x), ("weight", weight), ("scale", scale), ("out", out)):
        assert t.is_contiguous(), f"{name} must be contiguous"
        assert t.device == x.device, f"{name} is on {t.device}, x on {x.device}"


def int8_matmul_forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
                        out: torch.Tensor | None = None,
                        split_k: int | None = None) -> torch.Tensor:
    """Launch on 2-D contiguous x `[M, K]`; `split_k` takes the split-K decode path with
    that many splits."""
    assert x.dim() == 2 and weight.dim() == 2, "x and weight must be matrices"
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    _check_operands(x, weight, scale, out)
    if m == 0 or n == 0:
        return out
    if split_k is None and m <= QUANTIZED_MAX_ROWS and (m == 1 or prefers_gemv(m, n, k)):
        gemv_forward(x, weight, weight_scale=scale, out=out)
    elif m <= SKINNY_MAX_M:
        _launch_skinny(x, weight, scale, out, split_k)
    else:
        _launch_large(x, weight, scale, out)
    return out


def _launch_skinny(x, weight, scale, out, split_k: int | None) -> None:
    (m, k), n = x.shape, weight.shape[0]
    block_n, chosen = skinny_tiling(n, k, x.device)
    split_k = chosen if split_k is None else split_k
    assert split_k >= 1, f"split_k must be >= 1, got {split_k}"
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32,
                                                  device=x.device)
    grid = (triton.cdiv(m, SKINNY_MAX_M) * triton.cdiv(n, block_n), split_k)
    _skinny_kernel[grid](x, weight, scale, target, m, n, k, m_bucket(m), x.stride(0),
                         weight.stride(0), n, m * n, BLOCK_M=SKINNY_MAX_M, BLOCK_N=block_n,
                         SPLIT_K=split_k, GROUP=1)
    if split_k > 1:
        sum_splits(target, out)


def _launch_large(x, weight, scale, out) -> None:
    (m, k), n = x.shape, weight.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

    _large_kernel[grid](x, weight, scale, out, m, n, k, m_bucket(m), x.stride(0),
                        weight.stride(0), n, 0, SPLIT_K=1, GROUP=GROUP_M)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The op on x of any leading shape `[..., K]` (inference only: no autograd)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = int8_matmul_forward(rows, weight.contiguous(), scale.float().contiguous())
    return out.reshape(*x.shape[:-1], weight.shape[0])


registry.register("int8_matmul", "torch", int8_matmul_reference, reference=True)
if HAS_TRITON:
    registry.register("int8_matmul", "triton", int8_matmul, supports=registry.on_cuda)
