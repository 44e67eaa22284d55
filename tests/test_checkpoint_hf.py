"""HF-format directories: save / reload bit-identity, loading in transformers, sharded
weights, and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tessera
from tessera.checkpoint import hf
from tessera.checkpoint.loader import LoadedModel
from tessera.config import ModelConfig
from tessera.errors import CheckpointError, TesseraError
from tessera.model import build_model

transformers = pytest.importorskip("transformers")


def _loaded(tie: bool = True, tokenizer=None, **overrides) -> LoadedModel:
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=96, tie_word_embeddings=tie, bos_token_id=1,
                eos_token_ids=(2,))
    config = ModelConfig(**(base | overrides))
    return LoadedModel(build_model(config).eval(), tokenizer, config, "random")


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_reload_is_bit_identical(tmp_path, tie, dtype):
    original = _loaded(tie)
    original.model.to(dtype)
    tessera.save(original, tmp_path / "out")
    reloaded = tessera.load(tmp_path / "out", dtype=dtype, device="cpu")
    assert reloaded.config == original.config
    _assert_same_weights(original.model, reloaded.model)
    manifest = json.loads((tmp_path / "out" / hf.MANIFEST).read_text())
    assert ModelConfig.from_dict(manifest["model_config"]) == original.config
    assert set(manifest["sha256"]) >= {"config.json", "model.safetensors"}


@pytest.mark.parametrize("tie", [True, False])
def test_exported_directory_loads_in_transformers_with_same_logits(tmp_path, tie):
    original = _loaded(tie, attention_bias=True, attention_out_bias=True)
    tessera.save(original, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, original.model(ids), rtol=1e-5,
                                   atol=1e-5)


def test_sharded_weights_round_trip(tmp_path):
    original = _loaded(False)
    hf.write_hf_dir(tmp_path, original.config, original.model, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / hf.SAFETENSORS_INDEX).exists()
    _assert_same_weights(original.model, tessera.load(tmp_path, device="cpu").model)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, original.model(ids))


def test_save_refuses_to_overwrite_a_non_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(TesseraError, match="not a model directory"):
        tessera.save(_loaded(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def _saved(tmp_path):
    tessera.save(_loaded(False), tmp_path)
    return tmp_path


def test_truncated_safetensors_is_reported(tmp_path):
    path = _saved(tmp_path) / hf.SAFETENSORS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        tessera.load(tmp_path, device="cpu")


def test_garbage_safetensors_is_reported(tmp_path):
    (_saved(tmp_path) / hf.SAFETENSORS).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        tessera.load(tmp_path, device="cpu")


def test_inconsistent_shapes_are_reported(tmp_path):
    path = _saved(tmp_path) / hf.SAFETENSORS
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \(95, 64\)"):
        tessera.load(tmp_path, device="cpu")


def test_missing_tensor_and_missing_config_are_reported(tmp_path):
    path = _saved(tmp_path) / hf.SAFETENSORS
    state = load_file(path)
    del state["model.norm.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        tessera.load(tmp_path, device="cpu")
    (tmp_path / "config.json").unlink()
    with pytest.raises(TesseraError, match="without config.json"):
        tessera.load(tmp_path, device="cpu")


def test_pytorch_bin_is_read_without_unpickling_code(tmp_path):
    original = _loaded(False)
    hf.write_hf_dir(tmp_path, original.config, original.model)
    state = load_file(tmp_path / hf.SAFETENSORS)
    (tmp_path / hf.SAFETENSORS).unlink()
    torch.save(state, tmp_path / hf.TORCH_BIN)
    _assert_same_weights(original.model, tessera.load(tmp_path, device="cpu").model)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / hf.TORCH_BIN)
    with pytest.raises(CheckpointError, match="could not be read"):
        tessera.load(tmp_path, device="cpu")
