"""AWQ: the scale search beats plain round-to-nearest where activations have outlier
channels, folding leaves the model's function unchanged, and statistics are what they say."""

from __future__ import annotations

import copy

import torch

from tessera.quant import awq
from tessera.quant.model import quantize_model

from .helpers import tiny_model, token_ids

K, N = 256, 192


def outlier_activations(rows: int, seed: int) -> torch.Tensor:
    """Rows whose channels 0..7 are 30x larger than the rest, as in real LLM layers."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=generator)
    x[:, :8] *= 30
    return x


def test_search_beats_round_to_nearest_on_outlier_channels():
    torch.manual_seed(0)
    weight = torch.randn(N, K) / K**0.5
    calibration = outlier_activations(512, seed=1)
    held_out = outlier_activations(512, seed=2)
    quantize = awq.fake_quantizer(bits=4, group_size=128)
    s, alpha, errors = awq.search_scale(calibration, calibration.abs().mean(0), [weight],
                                        quantize, num_grid=20)
    assert 0 < alpha <= 1 and len(errors) == 21
    assert errors[int(alpha * 20)] == min(errors)
    assert s[:8].min() > s[8:].max()  # the outlier channels get the largest scales
    rtn = awq.output_error(held_out, weight, torch.ones(K), quantize)
    searched = awq.output_error(held_out, weight, s, quantize)
    assert searched < 0.5 * rtn  # on rows the search never saw


def test_search_keeps_round_to_nearest_without_outliers():
    """Alpha 0 is plain RTN, so the chosen error is never above it (on the search rows)."""
    torch.manual_seed(0)
    weight = torch.randn(N, K) / K**0.5
    x = torch.randn(256, K)
    _s, _alpha, errors = awq.search_scale(x, x.abs().mean(0), [weight],
                                          awq.fake_quantizer(4, 128), num_grid=10)
    assert min(errors) <= errors[0]


def test_folding_scales_leaves_the_function_unchanged():
    model = tiny_model()
    folded = copy.deepcopy(model)
    ids = token_ids(2, 24)
    groups = awq.scale_groups(folded, [n for n, m in folded.named_modules()
                                       if isinstance(m, torch.nn.Linear) and n != "lm_head"])
    foldable = [g for g in groups if g.is_folded]
    assert len(foldable) == 3 * 2  # q/k/v, gate/up and down in each of 2 layers
    generator = torch.Generator().manual_seed(3)
    for group in foldable:
        width = folded.get_submodule(group.names[0]).in_features
        awq.fold_scales(folded, group, torch.rand(width, generator=generator) * 4 + 0.1)
    with torch.no_grad():
        before, after = model(ids), folded(ids)
        changed = folded.model.layers[0].input_layernorm.weight
    assert not torch.allclose(changed, model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_groups_follow_the_decoder_layout():
    model = tiny_model()
    targets = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    groups = awq.scale_groups(model, targets)
    assert [g.names[0] for g in groups] == ["model.layers.1.self_attn.q_proj",
                                            "model.layers.1.mlp.down_proj"]
    assert groups[0].norm == "model.layers.1.input_layernorm"
    assert groups[1].producer == "model.layers.1.mlp.up_proj"
    assert awq.scale_groups(model, ["lm_head"])[0].is_folded is False


def test_input_statistics_cover_every_token_and_sample_evenly():
    model = tiny_model()
    ids = token_ids(3, 20)
    group = awq.ScaleGroup(("model.layers.0.mlp.down_proj",))
    seen = []
    hook = model.get_submodule(group.names[0]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    stats = awq.collect_input_stats(model, [group], ids, max_samples=10)[group.names[0]]
    hook.remove()
    inputs = torch.cat(seen)  # [60, 160], as the model saw them
    assert stats.count == 60
    torch.testing.assert_close(stats.mean_abs, inputs.abs().mean(0))
    torch.testing.assert_close(stats.samples, inputs[::6])  # 60 tokens // 10 samples


def test_awq_model_is_closer_to_fp32_than_round_to_nearest():
    """Whole-model check on the tiny model with amplified norm channels (outliers)."""
    base = tiny_model()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.input_layernorm.weight[:4] *= 25
            layer.post_attention_layernorm.weight[:4] *= 25
    calibration, ids = token_ids(4, 32, seed=5), token_ids(2, 32, seed=6)
    with torch.no_grad():
        exact = base(ids)
        errors = {}
        for method in ("int4", "awq"):
            model = quantize_model(copy.deepcopy(base), method, calibration=calibration,
                                   group_size=32)
            errors[method] = (model(ids) - exact).pow(2).mean().item()
    assert errors["awq"] < 0.7 * errors["int4"]
