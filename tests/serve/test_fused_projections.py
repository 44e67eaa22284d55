"""Fused q/k/v and gate/up projections (`tessera.model.fused_projections`) against the
unfused model: same logits, same engine output, same state dict, and what is left alone."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.model.fused_projections import (
    ProjectionSlice,
    SharedInputProjection,
    SharedInputQuantized,
    fuse_projections,
    is_fused,
    unfuse_projections,
)
from tessera.quant import quantization_spec, quantize_model
from tessera.serve.config import EngineConfig

from .helpers import GREEDY, greedy_token_ids, greedy_tokens_off_and_on, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("changes", [
    {}, {"attention_bias": True}, {"qk_norm": True, "num_kv_heads": 1},
    {"hidden_size": 48, "num_heads": 3, "num_kv_heads": 3, "intermediate_size": 100},
])
def test_fused_logits_equal_the_unfused_model(changes):
    plain, fused = tiny_model(seed=3, **changes), tiny_model(seed=3, **changes)
    assert fuse_projections(fused) == 2 * fused.config.num_layers
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, ProjectionSlice)
    assert isinstance(attention.qkv_proj, SharedInputProjection)
    assert (attention.qkv_proj.bias is not None) == bool(changes.get("attention_bias"))
    ids = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5,
                               atol=1e-5)
    assert attention.qkv_proj._output is None  # the kept product is released


def test_a_member_called_with_another_input_computes_for_it():
    model = tiny_model(seed=1)
    reference = [model.model.layers[0].self_attn.k_proj.weight.clone()]
    fuse_projections(model)
    attention = model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    attention.q_proj(x1)
    torch.testing.assert_close(attention.k_proj(x2), x2 @ reference[0].T)
    torch.testing.assert_close(attention.v_proj(x2).shape, torch.Size([2, 5, 32]))


def test_the_state_dict_keeps_the_unfused_names_and_loads_both_ways():
    plain, fused = tiny_model(seed=4, attention_bias=True), tiny_model(seed=5,
                                                                      attention_bias=True)
    fuse_projections(fused)
    expected = plain.state_dict()
    fused.load_state_dict(expected)  # unfused names into the fused model
    saved = fused.state_dict()
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    ids = torch.randint(2, 256, (2, 9))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5,
                               atol=1e-5)
    again = tiny_model(seed=6, attention_bias=True)
    again.load_state_dict(saved)  # and the fused model's dict into an unfused one
    torch.testing.assert_close(_logits(again, ids), _logits(plain, ids))


@pytest.mark.parametrize("method, options", [("int8", {}), ("int4", {}), ("fp8", {}),
                                             ("fp8", {"activations": "none"})])
def test_quantized_groups_fuse_and_save_like_unfused_ones(method, options):
    plain = quantize_model(tiny_model(seed=2, attention_bias=True), method, **options)
    fused = quantize_model(tiny_model(seed=2, attention_bias=True), method, **options)
    expected_state = plain.state_dict()
    assert fuse_projections(fused) == 2 * fused.config.num_layers
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, SharedInputQuantized)
    assert type(attention.qkv_proj.fused) is type(plain.model.layers[0].self_attn.q_proj)
    ids = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5,
                               atol=1e-5)
    state = fused.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    assert quantization_spec(fused) == quantization_spec(plain)
    reloaded = quantize_model(tiny_model(seed=9, attention_bias=True), method, **options)
    fuse_projections(reloaded)
    reloaded.load_state_dict(expected_state)  # an unfused checkpoint into a fused model
    torch.testing.assert_close(_logits(reloaded, ids), _logits(plain, ids), rtol=1e-5,
                               atol=1e-5)
    assert unfuse_projections(fused) == 2 * fused.config.num_layers
    assert type(fused.model.layers[1].mlp.up_proj) is type(plain.model.layers[1].mlp.up_proj)
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5,
                               atol=1e-5)


def test_per_tensor_scales_and_mixed_biases_are_left_alone():
    per_tensor = quantize_model(tiny_model(seed=2), "fp8", per_channel=False)
    assert fuse_projections(per_tensor) == 0 and not is_fused(per_tensor)
    mixed = tiny_model(seed=2)
    attention = mixed.model.layers[0].self_attn
    attention.q_proj.bias = torch.nn.Parameter(torch.zeros(attention.q_proj.out_features))
    assert fuse_projections(mixed) == 2 * mixed.config.num_layers - 1
    assert type(attention.q_proj) is torch.nn.Linear


def test_unfusing_restores_linears_and_a_fused_model_still_quantizes():
    plain, model = tiny_model(seed=2, attention_bias=True), tiny_model(seed=2,
                                                                      attention_bias=True)
    fuse_projections(model)
    assert unfuse_projections(model) == 2 * model.config.num_layers and not is_fused(model)
    attention = model.model.layers[1].self_attn
    assert type(attention.v_proj) is torch.nn.Linear and not hasattr(attention, "qkv_proj")
    assert sorted(model.state_dict()) == sorted(plain.state_dict())
    ids = torch.randint(2, 256, (2, 9))
    torch.testing.assert_close(_logits(model, ids), _logits(plain, ids))

    fuse_projections(model)
    quantize_model(model, "int8")  # unfuses first, then quantizes every projection
    assert not is_fused(model)
    expected = quantize_model(tiny_model(seed=2, attention_bias=True), "int8")
    torch.testing.assert_close(_logits(model, ids), _logits(expected, ids))


def test_the_engine_fuses_by_default_and_gives_the_same_tokens(make_engine):
    unfused, fused = greedy_tokens_off_and_on(make_engine, "fuse_projections", is_fused)
    assert fused == unfused
    assert all(len(tokens) == GREEDY.max_tokens for tokens in fused)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_the_engine_fuses_quantized_groups_with_the_same_tokens(make_engine, method):
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    outputs = []
    for enabled in (False, True):
        model = quantize_model(tiny_model(seed=7), method)
        engine = make_engine(model, fuse_projections=enabled)
        assert is_fused(model) is enabled
        outputs.append(greedy_token_ids(engine, prompts))
    assert outputs[1] == outputs[0]


def test_fuse_projections_must_be_a_bool():
    with pytest.raises(ConfigError, match="fuse_projections must be true or false"):
        EngineConfig(fuse_projections="yes")
