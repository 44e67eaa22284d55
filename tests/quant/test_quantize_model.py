"""`quantize_model` on a whole model: what it replaces, save -> load round trips, and
generation (plain and through the serving engine) on the quantized model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from tessera.checkpoint.loader import LoadedModel
from tessera.errors import CheckpointError, ConfigError
from tessera.generate import GenerationConfig, generate
from tessera.quant import (
    QuantizedLinear,
    is_quantized,
    load_quantized,
    quantize_model,
    quantized_modules,
    save_quantized,
)

from .helpers import TINY, tiny_model, token_ids

METHODS = {
    "int8": {},
    "int4": {"group_size": 32},
    "awq-int4": {"group_size": 64, "max_samples": 32, "num_grid": 4},
    "awq-int8": {"bits": 8, "max_samples": 32, "num_grid": 4},
    "fp8-channel": {},
    "fp8-tensor-weight-only": {"per_channel": False, "activations": "none"},
}
LINEARS_PER_LAYER = 7


def quantized(name: str, seed: int = 0) -> nn.Module:
    method = name.split("-")[0]
    return quantize_model(tiny_model(seed), method, calibration=token_ids(2, 16),
                          **METHODS[name])


def test_replaces_every_linear_but_the_lm_head():
    model = quantized("int8")
    names = set(quantized_modules(model))
    assert len(names) == LINEARS_PER_LAYER * TINY.num_layers
    assert "lm_head" not in names and type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_skip_patterns_leave_matching_linears_alone():
    model = quantize_model(tiny_model(), "int8", skip=("lm_head", "*.mlp.*"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear


def test_bad_requests_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown quantization method"):
        quantize_model(tiny_model(), "int3")
    with pytest.raises(ConfigError, match="unknown quantization option"):
        quantize_model(tiny_model(), "int8", group_sise=64)
    with pytest.raises(ConfigError, match="lm_head cannot be quantized"):
        quantize_model(tiny_model(), "int8", skip=())
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(tiny_model(), "awq")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(quantized("int8"), "int8")


@pytest.mark.parametrize("name", list(METHODS))
def test_quantized_model_stays_close_to_fp32(name):
    """Relative logit error; observed about 1% for int8, 5% for e4m3 (3 mantissa bits), 13%
    for int4 on this random model. The limits leave a margin of 2.5-3x."""
    limit = next(v for k, v in {"int8": 0.03, "fp8": 0.12, "int4": 0.3}.items() if k in name)
    ids = token_ids(2, 16, seed=9)
    with torch.no_grad():
        exact = tiny_model()(ids)
        approx = quantized(name)(ids)
    relative = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < relative < limit


@pytest.mark.parametrize("name", list(METHODS))
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name):
    model = quantized(name)
    ids = token_ids(2, 16, seed=9)
    path = save_quantized(LoadedModel(model, None, TINY, "tiny"), tmp_path / "q")
    assert is_quantized(path) and not is_quantized(tmp_path)
    loaded = load_quantized(path, dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    spec = json.loads((path / "config.json").read_text())["quantization_config"]
    assert spec["config"]["method"] == name.split("-")[0]
    assert set(spec["modules"]) == set(quantized_modules(model))
    assert loaded.model.quantization == model.quantization


def test_loading_in_bfloat16_keeps_quantized_tensors(tmp_path):
    model = quantized("awq-int4")
    path = save_quantized(LoadedModel(model, None, TINY, "tiny"), tmp_path / "q")
    loaded = load_quantized(path, dtype="bfloat16", device="cpu").model
    layer = loaded.model.layers[0]
    assert layer.self_attn.q_proj.qweight.dtype == torch.uint8
    assert layer.self_attn.q_proj.scales.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert layer.self_attn.o_proj.input_scale.dtype == torch.bfloat16  # AWQ, not folded
    logits = loaded(token_ids(1, 8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_a_tampered_checkpoint_is_refused(tmp_path):
    path = save_quantized(LoadedModel(quantized("int8"), None, TINY, "tiny"), tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    spec = config["quantization_config"]
    spec["modules"]["model.layers.0.mlp.up_proj"]["kind"] = "int4"
    spec["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(path, device="cpu")
    spec["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_quantized(path, device="cpu")


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        save_quantized(LoadedModel(tiny_model(), None, TINY, "tiny"), tmp_path / "q")


@pytest.mark.parametrize("name", ["int8", "awq-int4", "fp8-channel"])
def test_greedy_generation_runs_and_the_engine_agrees(name):
    from tessera.serve.llm import LLM
    from tessera.serve.sampling_params import SamplingParams

    model = quantized(name)
    prompt = token_ids(1, 6, seed=4)[0].tolist()
    gen = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    tokens = generate(model, prompt, gen)
    assert len(tokens) == 12 and all(0 <= t < TINY.vocab_size for t in tokens)
    assert generate(copy.deepcopy(model), prompt, gen) == tokens  # deterministic
    llm = LLM(model, num_kv_blocks=16, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], params)[0].token_ids == tokens


def test_quantize_checkpoint_writes_a_loadable_directory(tmp_path):
    import tessera
    from tessera.quant import quantize_checkpoint

    source = tessera.save(LoadedModel(tiny_model(), None, TINY, "tiny"), tmp_path / "fp32")
    path = quantize_checkpoint(source, tmp_path / "int8", "int8", dtype="float32",
                               device="cpu")
    ids = token_ids(2, 16, seed=9)
    with torch.no_grad():
        expected = quantized("int8")(ids)
        assert torch.equal(load_quantized(path, device="cpu").model(ids), expected)


def test_foreign_quantization_configs_are_refused(tmp_path):
    from tessera.errors import UnsupportedModelError

    path = save_quantized(LoadedModel(quantized("int8"), None, TINY, "tiny"), tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'awq'"):
        is_quantized(path)
