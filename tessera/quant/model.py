"""`quantize_model`: replace a model's `nn.Linear` modules with quantized ones, from outside.

Targets are the `nn.Linear` modules whose qualified names match none of `skip` (fnmatch
patterns; default `("lm_head",)`). Embeddings are `nn.Embedding`s and never targets. The
LM head stays in the activation dtype by default and cannot be targeted: the serving engine
and `generate` take the KV-cache dtype from `lm_head.weight`. Norms, embeddings and biases
keep the model's dtype.

The model's forward is untouched: each replaced module computes `x @ W_q.T (+ bias)` through
its method's registered op (see `Int8Linear`, `Int4Linear`, `FP8Linear`). The model gains
one attribute, `quantization` (the `QuantConfig`), which `save_quantized` writes out.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.nn as nn

from tessera.errors import ConfigError
from tessera.quant import awq
from tessera.quant.calibration import token_windows
from tessera.quant.config import QuantConfig
from tessera.quant.fp8 import FP8Linear
from tessera.quant.int4 import Int4Linear
from tessera.quant.int8 import Int8Linear
from tessera.quant.linear import QuantizedLinear

PROTECTED = ("lm_head",)


def quantize_model(model: nn.Module, method: str, *, calibration: torch.Tensor | None = None,
                   tokenizer: Any = None, **options: Any) -> nn.Module:
    """Quantize `model` in place with `method` ('int8', 'int4', 'awq' or 'fp8'; options are
    `QuantConfig` fields) and return it. AWQ calibrates on `calibration` token windows
    `[B, T]`, or else on `config.calibration_tokens` tokens of the corpus read with
    `tokenizer`."""
    config = QuantConfig.build(method, **options)
    targets = target_linears(model, config.skip)
    if config.method == "awq":
        windows = calibration if calibration is not None else _calibration(tokenizer, config)
        modules = awq_modules(model, targets, config, windows)
    else:
        modules = {name: quantize_linear(linear, config) for name, linear in targets.items()}
    for name, module in modules.items():
        replace_module(model, name, module)
    model.quantization = config
    return model


def target_linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Name -> module of every plain `nn.Linear` not matched by a skip pattern."""
    from tessera.model.cpu_prepack import unprepack_linears
    from tessera.model.fused_projections import unfuse_projections
    from tessera.model.gemv_products import undo_gemv_products

    unprepack_linears(model)  # a model a serving engine has prepacked, given GEMV products
    undo_gemv_products(model)  # or fused: plain nn.Linear members back first
    unfuse_projections(model)
    targets = {name: m for name, m in model.named_modules()
               if type(m) is nn.Linear and not any(fnmatch.fnmatch(name, p) for p in skip)}
    protected = sorted(name for name in targets if name in PROTECTED)
    if protected:
        raise ConfigError(f"{protected[0]} cannot be quantized: the serving engine reads the "
                          "activation dtype from its weight; keep it in skip")
    if not targets:
        raise ConfigError(f"no nn.Linear left to quantize after skip={list(skip)}; is the "
                          "model already quantized?")
    return targets


def quantize_linear(linear: nn.Linear, config: QuantConfig, *,
                    column_scale: torch.Tensor | None = None) -> QuantizedLinear:
    """Round-to-nearest quantization of one Linear; with `column_scale` s, of `W diag(s)`,
    with an input scale 1/s (AWQ's unfolded case)."""
    method = config.method
    if method == "fp8":
        return FP8Linear.from_linear(linear, per_channel=config.per_channel,
                                     activations=config.activations)
    input_scale = None
    if column_scale is not None:
        input_scale = (1.0 / column_scale).to(linear.weight.dtype)
    if method == "int8" or (method == "awq" and config.bits == 8):
        return Int8Linear.from_linear(linear, column_scale=column_scale,
                                      input_scale=input_scale)
    return Int4Linear.from_linear(linear, group_size=config.group_size,
                                  column_scale=column_scale, input_scale=input_scale)


def awq_modules(model: nn.Module, targets: dict[str, nn.Linear], config: QuantConfig,
                windows: torch.Tensor) -> dict[str, QuantizedLinear]:
    """Search and fold AWQ scales (see `awq`), then quantize every target."""
    was_training = model.training
    model.eval()
    groups = awq.scale_groups(model, targets)
    stats = awq.collect_input_stats(model, groups, windows, config.max_samples)
    unfolded, _alphas = awq.search_and_fold(model, groups, stats, set(targets), config.bits,
                                            config.group_size, config.num_grid)
    model.train(was_training)
    return {name: quantize_linear(linear, config, column_scale=unfolded.get(name))
            for name, linear in targets.items()}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    weight = getattr(parent, child).weight
    setattr(parent, child, module.to(weight.device))


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Name -> module of every quantized layer, under its own name also where an engine
    has fused it into a group (`fused_projections.py`): a fused model saves like an
    unfused one."""
    from tessera.model.fused_projections import SharedInputQuantized

    modules = dict(model.named_modules())
    groups = {name: m for name, m in modules.items() if isinstance(m, SharedInputQuantized)}
    inside = {id(group.fused) for group in groups.values()}
    found = {name: m for name, m in modules.items()
             if isinstance(m, QuantizedLinear) and id(m) not in inside}
    for name, group in groups.items():
        parent = name.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        for member_name, member in zip(group.member_names, group.split(), strict=True):
            found[prefix + member_name] = member
    return found


def _calibration(tokenizer: Any, config: QuantConfig) -> torch.Tensor:
    if tokenizer is None:
        raise ConfigError("AWQ needs calibration text: pass calibration=<token ids [B, T]> "
                          "or tokenizer=<the model's tokenizer>")
    return token_windows(tokenizer, source=config.calibration_source, split="train",
                         val_fraction=config.val_fraction,
                         num_tokens=config.calibration_tokens,
                         seq_len=config.calibration_seq_len)
