"""Decode products through the few-row GEMV ops (`tessera.model.gemv_products`): which
modules change, the same logits and state dict, undoing it (also before quantizing), the
engine leaving CPU models alone, and on CUDA the same greedy tokens as cuBLAS products."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.model.fused_projections import (
    MLP_GROUP,
    fuse_projections,
    is_fused,
    unfuse_group,
)
from tessera.model.gemv_products import (
    GemvLinear,
    NormGemvLayer,
    SwiGLUDownMLP,
    undo_gemv_products,
    use_gemv_products,
)
from tessera.model.transformer import MLP, DecoderLayer
from tessera.quant import quantize_model
from tessera.serve.config import EngineConfig

from .helpers import GREEDY, greedy_tokens_off_and_on, random_prompt, run_engine, tiny_model

IDS = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))


def uses_gemv(model) -> bool:
    return any(isinstance(m, (GemvLinear, SwiGLUDownMLP, NormGemvLayer))
               for m in model.modules())


@pytest.mark.parametrize("fuse", [False, True])
def test_gemv_products_give_the_same_logits_and_state_dict(fuse):
    plain, changed = tiny_model(seed=3), tiny_model(seed=3)
    if fuse:
        fuse_projections(changed)
    expected_state = changed.state_dict()
    # fused: two groups' products, o and down as GemvLinear, the MLP, the layer (its norms
    # into the groups' products); else 7 linears
    per_layer = 6 if fuse else 7
    assert use_gemv_products(changed, everywhere=True) == per_layer * changed.config.num_layers
    layer = changed.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, GemvLinear)
    assert (type(layer.mlp) is SwiGLUDownMLP) is fuse
    assert (type(layer) is NormGemvLayer) is fuse
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
    assert use_gemv_products(changed, everywhere=True) == 2 * changed.config.num_layers
    assert all(type(layer.mlp) is SwiGLUDownMLP for layer in changed.model.layers)
    assert all(type(layer) is NormGemvLayer for layer in changed.model.layers)
    with torch.inference_mode():
        for rows in (IDS[:1, :1], IDS[:, :1], IDS):  # a few rows, and more (the module)
            torch.testing.assert_close(changed(rows), plain(rows), rtol=1e-5, atol=1e-5)
    assert undo_gemv_products(changed) == 2 * changed.config.num_layers
    assert all(type(layer.mlp) is MLP for layer in changed.model.layers)
    assert all(type(layer) is DecoderLayer for layer in changed.model.layers)


def test_norms_run_inside_the_products_with_the_same_hidden_states(monkeypatch):
    """A layer's norms go into the "norm_gemv" op (one call per group, none to the norm
    ops) for a few rows, and the norm ops run as before for more; the kept hidden states
    (the stream, which the op returns) and the logits equal the plain model's."""
    import tessera.model.gemv_products as products

    plain, changed = tiny_model(seed=8), tiny_model(seed=8)
    fuse_projections(changed)
    use_gemv_products(changed, everywhere=True)
    calls = []
    real_get = products.registry.get
    monkeypatch.setattr(products.registry, "get",
                        lambda name, device: calls.append(name) or real_get(name, device))
    layers = changed.config.num_layers
    with torch.inference_mode():
        for rows, fused in ((IDS[:, :1], True), (IDS, False)):  # 3 rows; 33 rows
            expected = plain.run(rows, hidden_layers=(1, 2))
            calls.clear()
            out = changed.run(rows, hidden_layers=(1, 2))
            assert calls.count("norm_gemv") == (2 * layers if fused else 0)
            norms = calls.count("rms_norm") + calls.count("add_rms_norm")
            assert norms == (1 if fused else 2 * layers + 1)  # the final norm stays
            for i in (1, 2):
                torch.testing.assert_close(out.hidden_states[i], expected.hidden_states[i],
                                           rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
            assert all(layer.self_attn.qkv_proj._output is None and
                       layer.mlp.gate_up_proj._output is None for layer in
                       changed.model.layers)  # every primed product was read and released


def test_layers_with_unfused_groups_keep_their_norms():
    model = tiny_model(seed=9)
    fuse_projections(model)
    unfuse_group(model.model.layers[0].mlp, MLP_GROUP, "gate_up_proj")
    use_gemv_products(model, everywhere=True)
    assert type(model.model.layers[0]) is DecoderLayer  # no gate/up group to norm into
    assert type(model.model.layers[1]) is NormGemvLayer


def test_undoing_restores_plain_modules_and_the_model_still_quantizes():
    model = tiny_model(seed=2)
    fuse_projections(model)
    count = use_gemv_products(model, everywhere=True)
    assert undo_gemv_products(model) == count
    assert not uses_gemv(model) and is_fused(model)
    assert all(type(layer.mlp) is MLP for layer in model.model.layers)
    assert all(type(layer) is DecoderLayer for layer in model.model.layers)
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
    assert use_gemv_products(changed) == 6 * changed.config.num_layers
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
    assert use_gemv_products(changed) == 2 * changed.config.num_layers
    ids = IDS.cuda()
    with torch.inference_mode():
        for rows in (ids[:1, :1], ids[:, :1], ids):
            expected = plain(rows).float()
            scale = expected.abs().max().item()
            torch.testing.assert_close(changed(rows).float(), expected, rtol=0,
                                       atol=3e-2 * scale)
