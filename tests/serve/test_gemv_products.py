"""Decode products through the few-row GEMV ops (`tessera.model.gemv_products`): which
modules change, the same logits and state dict, undoing it (also before quantizing), the
engine leaving CPU models alone, and on CUDA the same greedy tokens as cuBLAS products."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.model.fused_projections import fuse_projections, is_fused
from tessera.model.gemv_products import (
    GemvLinear,
    SwiGLUDownMLP,
    undo_gemv_products,
    use_gemv_products,
)
from tessera.model.transformer import MLP
from tessera.quant import quantize_model
from tessera.serve.config import EngineConfig

from .helpers import GREEDY, greedy_tokens_off_and_on, random_prompt, run_engine, tiny_model

IDS = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))


def uses_gemv(model) -> bool:
    return any(isinstance(m, (GemvLinear, SwiGLUDownMLP)) for m in model.modules())


@pytest.mark.parametrize("fuse", [False, True])
def test_gemv_products_give_the_same_logits_and_state_dict(fuse):
    plain, changed = tiny_model(seed=3), tiny_model(seed=3)
    if fuse:
        fuse_projections(changed)
    expected_state = changed.state_dict()
    # fused: two groups' products, o and down as GemvLinear, the MLP; else 7 linears
    per_layer = 5 if fuse else 7
    assert use_gemv_products(changed, everywhere=True) == per_layer * changed.config.num_layers
    layer = changed.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, GemvLinear)
    assert (type(layer.mlp) is SwiGLUDownMLP) is fuse
    assert type(changed.lm_head) is torch.nn.Linear  # the head stays with cuBLAS
    state = changed.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    with torch.inference_mode():
        torch.testing.assert_close(changed(IDS), plain(IDS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(changed(IDS[:, :1]), plain(IDS[:, :1]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_mlps_take_the_swiglu_gemv_with_the_same_logits(method):
    """A quantized model fused by an engine: only its MLPs change (their products' own ops
    take the GEMV), to the SwiGLU-input GEMV over the down projection's codes."""
    plain = quantize_model(tiny_model(seed=6), method)
    changed = quantize_model(tiny_model(seed=6), method)
    fuse_projections(changed)
    assert use_gemv_products(changed, everywhere=True) == changed.config.num_layers
    assert all(type(layer.mlp) is SwiGLUDownMLP for layer in changed.model.layers)
    with torch.inference_mode():
        for rows in (IDS[:1, :1], IDS[:, :1], IDS):  # a few rows, and more (the module)
            torch.testing.assert_close(changed(rows), plain(rows), rtol=1e-5, atol=1e-5)
    assert undo_gemv_products(changed) == changed.config.num_layers
    assert all(type(layer.mlp) is MLP for layer in changed.model.layers)


def test_undoing_restores_plain_modules_and_the_model_still_quantizes():
    model = tiny_model(seed=2)
    fuse_projections(model)
    count = use_gemv_products(model, everywhere=True)
    assert undo_gemv_products(model) == count
    assert not uses_gemv(model) and is_fused(model)
    assert all(type(layer.mlp) is MLP for layer in model.model.layers)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    use_gemv_products(model, everywhere=True)
    quantize_model(model, "int8")
    expected = quantize_model(tiny_model(seed=2), "int8")
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS), expected(IDS))


def test_only_devices_with_a_fast_gemv_are_changed():
    model = tiny_model(seed=1)
    fuse_projections(model)
    assert use_gemv_products(model) == 0  # CPU: the op is the reference there
    assert not uses_gemv(model)


def test_the_engine_leaves_cpu_models_alone(make_engine):
    model = tiny_model(seed=4)
    make_engine(model, gemv_products=True)
    assert is_fused(model) and not uses_gemv(model)


def test_an_engine_over_gemv_products_gives_the_same_tokens(make_engine, monkeypatch):
    """The engine's paths (prefill, paged decode, the static decode path) over a model whose
    products are GEMV modules (their CPU ops are the references): the same greedy tokens."""
    import tessera.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "use_gemv_products",
                        lambda model: use_gemv_products(model, everywhere=True))
    plain, changed = greedy_tokens_off_and_on(make_engine, "gemv_products", uses_gemv)
    assert changed == plain


def test_gemv_products_must_be_a_bool():
    with pytest.raises(ConfigError, match="gemv_products must be true or false"):
        EngineConfig(gemv_products="yes")


@pytest.mark.gpu
def test_engine_gemv_products_match_cublas_on_cuda(make_engine):
    """Greedy tokens with and without the GEMV products (float32, so that the products'
    different summation orders cannot flip a near tie): CUDA graphs, single and batched
    decode steps, a prompt long enough to prefill through cuBLAS."""
    generator = torch.Generator().manual_seed(11)
    prompts = {f"r{i}": random_prompt(n, generator) for i, n in enumerate((3, 9, 40, 5))}
    outputs = []
    for enabled in (False, True):
        model = tiny_model(seed=7).to("cuda")
        engine = make_engine(model, gemv_products=enabled, max_num_seqs=4, max_model_len=128)
        assert uses_gemv(model) is enabled
        singles = [run_engine(engine, {r: (p, GREEDY)})[r].outputs[0].token_ids
                   for r, p in prompts.items()]
        batch = run_engine(engine, {r: (p, GREEDY) for r, p in prompts.items()})
        outputs.append((singles, [batch[r].outputs[0].token_ids for r in prompts]))
    assert outputs[1] == outputs[0]


@pytest.mark.gpu
def test_gemv_products_match_cublas_logits_in_bf16():
    plain = tiny_model(seed=5).to("cuda", torch.bfloat16)
    changed = tiny_model(seed=5).to("cuda", torch.bfloat16)
    fuse_projections(changed)
    assert use_gemv_products(changed) == 5 * changed.config.num_layers
    ids = IDS.cuda()
    with torch.inference_mode():
        for rows in (ids[:1, :1], ids[:, :1], ids):  # 1 and 3 rows: GEMV; 33: cuBLAS
            expected = plain(rows).float()
            scale = expected.abs().max().item()
            torch.testing.assert_close(changed(rows).float(), expected, rtol=0,
                                       atol=2e-2 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_gemv_paths_match_the_modules_on_cuda(method):
    """Fused quantized groups and the SwiGLU-input GEMV over codes against the same quantized
    model unfused, in bf16 on CUDA: a few rows (GEMV) and many (the modules' kernels)."""
    plain = quantize_model(tiny_model(seed=5).to("cuda", torch.bfloat16), method)
    changed = quantize_model(tiny_model(seed=5).to("cuda", torch.bfloat16), method)
    fuse_projections(changed)
    assert use_gemv_products(changed) == changed.config.num_layers
    ids = IDS.cuda()
    with torch.inference_mode():
        for rows in (ids[:1, :1], ids[:, :1], ids):
            expected = plain(rows).float()
            scale = expected.abs().max().item()
            torch.testing.assert_close(changed(rows).float(), expected, rtol=0,
                                       atol=3e-2 * scale)
