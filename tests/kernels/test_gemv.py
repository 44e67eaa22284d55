"""Few-row GEMV kernel (plain and with the SwiGLU input) against float64 references.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small shapes on CPU; `gpu` tests run them here, compiled, at model sizes,
with and without the programmatic dependent launch. Outputs are poisoned with NaN before
each launch, so an element never written fails.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import gemv as kernels
from tessera.kernels import registry
from tessera.kernels._triton import use_pdl
from tessera.kernels.swiglu import swiglu_reference

# (rows, N, K): odd N and K that end mid-tile, one row, a power of two, the row limit; K
# within one interpreter tile (the kernel's WHOLE_ROWS path)
SMALL = [(1, 37, 70), (3, 64, 96), (8, 5, 33), (2, 19, 24)]
LARGE = [(1, 960, 576), (1, 2048, 2048), (4, 576, 1536), (3, 3072, 2048), (8, 2047, 8193)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_operands(rows, n, k, dtype, device, width=None):
    x = torch.randn(rows, width or k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    return x, weight


def check_gemv(rows, n, k, dtype, device, with_bias, pdl=False):
    x, weight = make_operands(rows, n, k, dtype, device)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    expected = x.double() @ weight.double().T
    if bias is not None:
        expected += bias.double()
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)
    assert kernels.gemv_forward(x, weight, bias, out=out, pdl=pdl) is out
    assert_close(out, expected, dtype)


def check_swiglu_gemv(rows, n, k, dtype, device, pdl=False):
    """The activation rounded to dtype as the `swiglu` kernel rounds it, then the product."""
    gate_up, weight = make_operands(rows, n, k, dtype, device, width=2 * k)
    gate_up = 3 * gate_up
    activation = swiglu_reference(*gate_up.chunk(2, dim=-1))  # in dtype, like the kernel
    expected = activation.double() @ weight.double().T
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)
    kernels.gemv_forward(gate_up, weight, swiglu_input=True, out=out, pdl=pdl)
    assert_close(out, expected, dtype)


def quantized(weight, code):
    """(codes, fp32 scales) of weight: int8 per channel, or e4m3 per channel / tensor."""
    from tessera.quant.fp8 import quantize_fp8
    from tessera.quant.int8 import quantize_int8

    if code == "int8":
        return quantize_int8(weight)
    return quantize_fp8(weight, per_channel=code == "fp8-channel")


def without_binade_carries(x):
    """x `[rows, K]` (fp32) with every element whose e4m3 rounding (after division by its
    row's dynamic scale) would carry into the next power of two moved to 3/4 of that power,
    inside the binade. NOTE: the Triton interpreter (3.9) casts such values to e4m3 wrong
    (half the right value); compiled kernels round them right, and the GPU checks keep them."""
    from tessera.quant.fp8 import quantize_rows

    codes, scale = quantize_rows(x)
    values, rounded = x / scale, codes.float()
    carries = (rounded.abs() > values.abs()) & (torch.log2(rounded.abs()).frac() == 0)
    return torch.where(carries, 0.75 * rounded * scale, x)


def check_scaled_gemv(rows, n, k, dtype, device, code, quantize_input, swiglu_input,
                      pdl=False, interpreted=False):
    """Codes and scales against their float64 dequantisation; with `quantize_input` the
    input rows rounded to e4m3 as `quantize_rows` rounds them."""
    from tessera.quant.fp8 import quantize_rows

    x, weight = make_operands(rows, n, k, dtype, device, width=2 * k if swiglu_input else k)
    if interpreted and quantize_input and not swiglu_input:
        x = without_binade_carries(x)
    codes, scale = quantized(weight.float(), code)
    inputs = swiglu_reference(*x.chunk(2, dim=-1)) if swiglu_input else x
    if quantize_input:
        row_codes, row_scales = quantize_rows(inputs)
        inputs = row_codes.double() * row_scales.double()
    dequantized = dequantized_double(codes, scale)
    expected = inputs.double() @ dequantized.T
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)
    kernels.gemv_forward(x, codes, weight_scale=scale, quantize_input=quantize_input,
                         swiglu_input=swiglu_input, out=out, pdl=pdl)
    assert_close(out, expected, dtype)


def check_norm_gemv(rows, n, k, dtype, device, code, with_residual, quantize_input=False,
                    pdl=False):
    """The RMSNorm of x (+ residual) as the `add_rms_norm` / `rms_norm` references round it
    (in dtype), then the product against float64 (float weight, or codes and scales); the
    stream x + residual written exactly, every element of it."""
    from tessera.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
    from tessera.quant.fp8 import quantize_rows

    x, weight = make_operands(rows, n, k, dtype, device)
    x = 2 * x + 0.5  # a row mean far from zero: the squares' sum matters
    residual = torch.randn(rows, k, device=device).to(dtype) if with_residual else None
    norm_weight = (torch.rand(k, device=device) + 0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if rows == 3 else None
    if residual is None:
        normed, stream = rms_norm_reference(x, norm_weight, 1e-5), x
    else:
        normed, stream = add_rms_norm_reference(x, residual, norm_weight, 1e-5)
    if code is None:
        codes, scale, dequantized = weight, None, weight.double()
    else:
        codes, scale = quantized(weight.float(), code)
        dequantized = dequantized_double(codes, scale)
    if quantize_input:
        row_codes, row_scales = quantize_rows(normed)
        normed = row_codes.double() * row_scales.double()
    expected = normed.double() @ dequantized.T + (bias.double() if bias is not None else 0)
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)
    residual_out = torch.full_like(x, float("nan")) if with_residual else None
    norm = kernels.NormInput(norm_weight, 1e-5, residual, residual_out)
    kernels.gemv_forward(x, codes, bias, weight_scale=scale, quantize_input=quantize_input,
                         norm=norm, out=out, pdl=pdl)
    assert_close(out, expected, dtype)
    if with_residual:
        assert torch.equal(residual_out, stream)


def dequantized_double(codes, scale):
    """Codes times their scales (per channel or one), in float64."""
    return codes.double() * (scale.double()[:, None] if scale.numel() > 1 else scale)


def every_code(dtype: torch.dtype) -> torch.Tensor:
    """Every int8 code, or every e4m3fn code but NaN (subnormals, zeros of both signs and
    +-448 included)."""
    if dtype == torch.int8:
        return torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    patterns = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    codes = patterns.view(torch.float8_e4m3fn)
    return codes[~codes.float().isnan()]


def check_every_code(code_dtype, device, quantize_input=False):
    """One-hot fp32 rows pick single weights, so each output is one code times its scale:
    exactly the dequantised value for every code the weights can hold. With
    `quantize_input` each row's one value is its maximum, 448 times its scale 1 / 448, and
    the output is the code times 448, times that scale, times the weight's (in that order,
    in fp32)."""
    codes = every_code(code_dtype)
    k = kernels.MAX_ROWS
    weight = codes.repeat(-(-k * 64 // codes.numel()))[:k * 64].reshape(64, k).to(device)
    scale = torch.rand(64, device=device) + 0.5
    x = torch.eye(k, device=device)
    out = kernels.gemv_forward(x, weight, weight_scale=scale, quantize_input=quantize_input)
    expected = weight.float()
    if quantize_input:
        expected = expected * 448.0 * (1.0 / 448.0)  # the row scale, as the kernel's
    expected = (expected * scale[:, None]).T
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def check_ops_on_views(dtype, device, codes=("int8",)):
    """The ops on leading dims and on row-strided views (the columns of a wider tensor), and
    "swiglu_gemv" with `codes` (the interpreter leaves out the e4m3-rounded inputs: see
    `without_binade_carries`)."""
    wide = torch.randn(2, 3, 50, device=device).to(dtype)
    x = wide[..., :40]  # [2, 3, 40], rows 50 apart
    weight = torch.randn(7, 40, device=device).to(dtype)
    out = kernels.gemv(x, weight)
    assert out.shape == (2, 3, 7)
    assert_close(out, x.double() @ weight.double().T, dtype)
    gate_up = torch.randn(1, 2, 2 * 24, device=device).to(dtype)
    down = torch.randn(9, 24, device=device).to(dtype)
    out = kernels.swiglu_gemv(gate_up, down)
    expected = swiglu_reference(*gate_up.chunk(2, dim=-1)).double() @ down.double().T
    assert out.shape == (1, 2, 9)
    assert_close(out, expected, dtype)
    for code in codes:  # the op with codes against its reference
        weight, scale = quantized(down.float(), code)
        quantize_input = code != "int8"
        out = kernels.swiglu_gemv(gate_up, weight, scale, quantize_input)
        expected = kernels.swiglu_gemv_reference(gate_up, weight, scale, quantize_input)
        assert out.shape == (1, 2, 9)
        assert_close(out, expected.double(), dtype)
    residual, norm_weight = torch.randn_like(x), torch.rand(40, device=device).to(dtype)
    projection = torch.randn(7, 40, device=device).to(dtype)
    for res in (residual, None):  # the norm op, with and without a residual
        out, stream = kernels.norm_gemv(x, res, norm_weight, 1e-6, projection)
        expected, expected_stream = kernels.norm_gemv_reference(x, res, norm_weight, 1e-6,
                                                                projection)
        assert out.shape == (2, 3, 7) and stream.shape == x.shape
        assert_close(out, expected.double(), dtype)
        assert torch.equal(stream, expected_stream)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, n, k", SMALL)
def test_gemv_interpreted(interpreter, rows, n, k, dtype, with_bias):
    interpreter.run(check_gemv, rows, n, k, dtype, "cpu", with_bias)


@pytest.mark.parametrize("rows, n, k", SMALL)
def test_swiglu_gemv_interpreted(interpreter, rows, n, k):
    interpreter.run(check_swiglu_gemv, rows, n, k, torch.float32, "cpu")


# (codes, quantize the input, SwiGLU input); the interpreter runs the first three
SCALED = [("int8", False, False), ("fp8-channel", True, False), ("fp8-tensor", False, True),
          ("fp8-tensor", True, True)]


@pytest.mark.parametrize("code, quantize_input, swiglu_input", SCALED[:3])
@pytest.mark.parametrize("rows, n, k", SMALL)
def test_scaled_gemv_interpreted(interpreter, rows, n, k, code, quantize_input,
                                 swiglu_input):
    interpreter.run(check_scaled_gemv, rows, n, k, torch.float32, "cpu", code,
                    quantize_input, swiglu_input, False, True)


# (codes, a residual); the interpreter leaves out W8A8 (see `without_binade_carries`)
NORMED = [(None, True), (None, False), ("int8", True), ("fp8-channel", False)]


@pytest.mark.parametrize("code, with_residual", NORMED)
@pytest.mark.parametrize("rows, n, k", SMALL)
def test_norm_gemv_interpreted(interpreter, rows, n, k, code, with_residual):
    interpreter.run(check_norm_gemv, rows, n, k, torch.float32, "cpu", code, with_residual)


@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
def test_every_code_interpreted(interpreter, code_dtype):
    interpreter.run(check_every_code, code_dtype, "cpu", code_dtype != torch.int8)


def test_ops_on_views_interpreted(interpreter):
    interpreter.run(check_ops_on_views, torch.float32, "cpu")


def test_launcher_refuses_what_it_cannot_do():
    x, weight = torch.randn(9, 16), torch.randn(4, 16)
    with pytest.raises(AssertionError, match="rows"):
        kernels.gemv_forward(x, weight)  # more than MAX_ROWS rows
    with pytest.raises(AssertionError, match="columns"):
        kernels.gemv_forward(x[:2], weight, swiglu_input=True)  # needs [M, 2K]
    with pytest.raises(AssertionError, match="dtype|float"):
        kernels.gemv_forward(x[:2], weight.double())
    with pytest.raises(AssertionError, match="codes"):
        kernels.gemv_forward(x[:2], weight, weight_scale=torch.ones(4))  # float "codes"
    with pytest.raises(AssertionError, match="weight_scale"):
        kernels.gemv_forward(x[:2], weight.to(torch.int8), weight_scale=torch.ones(3))
    norm = kernels.NormInput(torch.ones(16), 1e-6)
    with pytest.raises(AssertionError, match="one input transform"):
        kernels.gemv_forward(torch.randn(2, 32), weight, swiglu_input=True, norm=norm)
    with pytest.raises(AssertionError, match="norm weight"):
        kernels.gemv_forward(x[:2], weight, norm=kernels.NormInput(torch.ones(15), 1e-6))
    with pytest.raises(AssertionError, match="go together"):
        kernels.gemv_forward(x[:2], weight, norm=kernels.NormInput(torch.ones(16), 1e-6,
                                                                   residual=x[:2]))


def test_tiles_take_short_rows_whole_but_not_many_rows_of_wide_weights():
    """K of up to 1024 in one tile (the WHOLE_ROWS path: SmolLM2's q/k/v and gate/up at
    one row), except 3+ rows against N >= 3072; one row of K up to 2048 against N >= 2048
    too; longer K in several steps."""
    assert kernels.gemv_tile(960, 576, 4)[1] >= 576
    assert kernels.gemv_tile(3072, 576, 1)[1] >= 576
    assert kernels.gemv_tile(3072, 576, 4)[1] < 576
    assert kernels.gemv_tile(2048, 2048, 1)[1] >= 2048  # one row of Llama-1B's products
    assert kernels.gemv_tile(2048, 2048, 2)[1] < 2048
    assert kernels.gemv_tile(2048, 8192, 1)[1] < 8192


def test_more_rows_larger_weights_and_autograd_take_the_plain_product():
    """Past MAX_ROWS, where cuBLAS measured faster, or with a weight that wants gradients,
    the op is `F.linear` (no launch: these run on CPU tensors, which the kernel would refuse
    outside the interpreter)."""
    x = torch.randn(kernels.MAX_ROWS + 1, 16)
    weight = torch.randn(4, 16, requires_grad=True)
    torch.testing.assert_close(kernels.gemv(x, weight.detach()), x @ weight.detach().T)
    out = kernels.gemv(x[:2], weight)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x[:2].sum(0).expand(4, 16))
    gate_up = torch.randn(kernels.MAX_ROWS + 1, 32)
    torch.testing.assert_close(kernels.swiglu_gemv(gate_up, weight.detach()),
                               kernels.swiglu_gemv_reference(gate_up, weight.detach()))
    big = torch.randn(2000, 700)  # 1.4M elements: cuBLAS from 2 rows on
    assert kernels.prefers_gemv(1, *big.shape) and not kernels.prefers_gemv(2, *big.shape)
    torch.testing.assert_close(kernels.gemv(x[:2, :1].expand(2, 700), big),
                               x[:2, :1].expand(2, 700) @ big.T)


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    for name in ("gemv", "swiglu_gemv", "norm_gemv"):
        assert registry.select(name, "cuda").backend == "triton"
        assert registry.select(name, "cpu").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, n, k", LARGE)
def test_gemv_gpu(rows, n, k, dtype, pdl):
    if pdl and not use_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    check_gemv(rows, n, k, dtype, "cuda", with_bias=rows == 3, pdl=pdl)
    check_swiglu_gemv(rows, n, k, dtype, "cuda", pdl=pdl)


@pytest.mark.gpu
@pytest.mark.parametrize("code, quantize_input, swiglu_input", SCALED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n, k", LARGE)
def test_scaled_gemv_gpu(rows, n, k, dtype, code, quantize_input, swiglu_input):
    check_scaled_gemv(rows, n, k, dtype, "cuda", code, quantize_input, swiglu_input,
                      pdl=use_pdl(torch.device("cuda")))


@pytest.mark.gpu
@pytest.mark.parametrize("code, with_residual", NORMED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n, k", LARGE)
def test_norm_gemv_gpu(rows, n, k, dtype, code, with_residual):
    check_norm_gemv(rows, n, k, dtype, "cuda", code, with_residual,
                    pdl=use_pdl(torch.device("cuda")))
    if code == "fp8-channel":  # W8A8: the normed rows rounded to e4m3 in the kernel
        check_norm_gemv(rows, n, k, dtype, "cuda", code, with_residual, quantize_input=True)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize_input", [False, True])
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.float8_e4m3fn])
def test_every_code_gpu(code_dtype, quantize_input):
    check_every_code(code_dtype, "cuda", quantize_input)


@pytest.mark.gpu
def test_ops_on_views_gpu():
    check_ops_on_views(torch.bfloat16, "cuda", codes=("int8", "fp8-channel"))


def test_programmatic_dependent_launch_only_on_compiled_cuda(monkeypatch):
    monkeypatch.delenv("TESSERA_PDL", raising=False)
    assert not use_pdl(torch.device("cpu"))
    monkeypatch.setenv("TESSERA_PDL", "0")
    assert not use_pdl(torch.device("cuda"))  # off before asking the device anything
