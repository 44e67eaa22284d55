"""Post-training quantization of a trained model, applied from outside the model.

    quantize_model(model, "int8" | "int4" | "awq" | "fp8", **options) -> model
    save_quantized(loaded, directory); load_quantized(directory) -> LoadedModel
    quantize_checkpoint(source, destination, method, **options) -> directory

`quantize_model` swaps `nn.Linear` modules (not the LM head, not embeddings) for quantized
ones whose forward calls a registered op: "int8_matmul" and "int4_matmul" (Triton kernels
on CUDA, dequantise + matmul elsewhere) and "fp8_matmul" (`torch._scaled_mm` on FP8 GPUs).
The options are `QuantConfig` fields. A saved quantized directory is an HF-format directory
with quantized tensors and a `quantization_config` in `config.json` (see `checkpoint.py`);
`is_quantized(directory)` tells a loader to use `load_quantized`. Quality figures and the
perplexity protocol are in docs/quantization.md.

Modules: `config` (QuantConfig), `linear` (the base module), `int8`, `int4`, `fp8` (one
format each), `awq` (scale search and folding), `model` (quantize_model), `checkpoint`
(save/load), `calibration` (corpus token windows and perplexity).
"""

from tessera.quant.checkpoint import (
    is_quantized,
    load_quantized,
    quantization_spec,
    quantize_checkpoint,
    save_quantized,
)
from tessera.quant.config import METHODS, QuantConfig
from tessera.quant.fp8 import FP8Linear
from tessera.quant.int4 import Int4Linear
from tessera.quant.int8 import Int8Linear
from tessera.quant.linear import QuantizedLinear
from tessera.quant.model import quantize_model, quantized_modules

__all__ = [
    "METHODS",
    "FP8Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantConfig",
    "QuantizedLinear",
    "is_quantized",
    "load_quantized",
    "quantization_spec",
    "quantize_checkpoint",
    "quantize_model",
    "quantized_modules",
    "save_quantized",
]
