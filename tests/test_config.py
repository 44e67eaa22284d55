"""ModelConfig validation, JSON round trip, HF conversion and presets."""

from __future__ import annotations

import pytest
import torch

from tessera.config import PRESETS, ModelConfig, get_preset
from tessera.errors import ConfigError, UnsupportedModelError
from tessera.model import build_model

transformers = pytest.importorskip("transformers")


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=128)
    return ModelConfig(**(base | overrides))


@pytest.mark.parametrize("overrides,fragment", [
    (dict(num_heads=6, num_kv_heads=4), "divisible by num_kv_heads"),
    (dict(hidden_size=66, num_heads=4), "not divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=3.5), "vocab_size must be a positive integer"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(eos_token_ids=(100,)), "outside the vocabulary"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(version=99), "version 99"),
])
def test_invalid_configs_give_clear_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(**overrides)


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        _config(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_json_round_trip_and_unknown_keys():
    cfg = _config(rope_scaling={"rope_type": "linear", "factor": 2.0}, eos_token_ids=(2, 3))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig keys: colour"):
        ModelConfig.from_dict(cfg.to_dict() | {"colour": "red"})
    with pytest.raises(ConfigError, match="malformed"):
        ModelConfig.from_json("{not json")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_the_built_model(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg, device="meta", init=False)
    actual = sum(p.numel() for p in model.parameters())  # tied weights appear once
    assert cfg.num_parameters() == actual


def test_smollm2_preset_has_135m_parameters():
    assert 134e6 < get_preset("smollm2-135m").num_parameters() < 135e6


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-3.2-1b", "qwen3-0.6b"])
def test_presets_round_trip_through_transformers_config(name):
    cfg = get_preset(name)
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    assert ModelConfig.from_hf_config(hf.to_dict()) == cfg


def test_sliding_window_and_other_architectures_are_refused():
    mistral = transformers.MistralConfig(sliding_window=16, max_position_embeddings=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        ModelConfig.from_hf_config(mistral.to_dict())
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelConfig.from_hf_config(transformers.GPT2Config().to_dict())
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gpt-5")
