"""Training checkpoints: exact round trips, corruption detection with fallback, pruning,
and temporary directories that resumption never picks up."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from tessera.config import ModelConfig
from tessera.distill import checkpointing as ckpt
from tessera.errors import CheckpointError
from tessera.model import build_model


def _model_and_optimizer(seed: int = 0):
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, intermediate_size=24, tie_word_embeddings=True)
    torch.manual_seed(seed)
    module = nn.ModuleDict({"student": build_model(config)})
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.9, 0.95))
    return module, optimizer


def _train(module, optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 50, (2, 7))
        loss = module["student"](ids).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _save(root, step, module, optimizer, keep_last=3):
    return ckpt.save_checkpoint(root, step, module, optimizer, {"note": step},
                                keep_last=keep_last)


def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    module, optimizer = _model_and_optimizer()
    _train(module, optimizer, 3)
    random.seed(5)
    np.random.seed(5)
    path = _save(tmp_path, 3, module, optimizer)
    expected = _train(module, optimizer, 3)  # continues from the saved RNG states too
    expected_rng = (random.random(), float(np.random.rand()))

    torch.manual_seed(123)  # scramble everything the checkpoint must restore
    random.seed(0)
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    ckpt.restore_rng(state["rng"])
    assert state["step"] == 3 and state["note"] == 3
    assert _train(fresh, fresh_opt, 3) == expected
    assert (random.random(), float(np.random.rand())) == expected_rng
    assert fresh["student"].lm_head.weight is fresh["student"].model.embed_tokens.weight


def test_keep_last_k(tmp_path):
    module, optimizer = _model_and_optimizer()
    for step in range(1, 6):
        _save(tmp_path, step, module, optimizer, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_detected_and_skipped(tmp_path):
    module, optimizer = _model_and_optimizer()
    _save(tmp_path, 1, module, optimizer)
    _train(module, optimizer, 1)
    newest = _save(tmp_path, 2, module, optimizer)
    _corrupt(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        ckpt.verify_checkpoint(newest)
    warnings: list[str] = []
    assert ckpt.find_latest(tmp_path, warn=warnings.append) == tmp_path / "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "corrupt" in warnings[0]


def test_missing_file_and_missing_manifest_are_corrupt(tmp_path):
    module, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 1, module, optimizer)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        ckpt.verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(path)


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    module, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 1, module, optimizer)
    _corrupt(path / "state.json")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        ckpt.find_latest(tmp_path, warn=lambda _m: None)
    assert ckpt.find_latest(tmp_path / "empty") is None


def test_leftover_temporary_directory_is_ignored_then_removed(tmp_path):
    module, optimizer = _model_and_optimizer()
    _save(tmp_path, 1, module, optimizer)
    # What a crash mid-save leaves: a hidden directory, here for a *later* step.
    leftover = tmp_path / ".tmp-step-00000009"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.find_latest(tmp_path) == tmp_path / "step-00000001"
    _save(tmp_path, 2, module, optimizer)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    module, optimizer = _model_and_optimizer()
    _save(tmp_path, 1, module, optimizer)
    _train(module, optimizer, 1)
    path = _save(tmp_path, 1, module, optimizer)
    ckpt.verify_checkpoint(path)
    fresh, fresh_opt = _model_and_optimizer(seed=2)
    ckpt.load_checkpoint(path, fresh, fresh_opt)
    for a, b in zip(fresh.parameters(), module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_generator_of_the_current_device_round_trips_through_json():
    torch.cuda.manual_seed(7)
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(8)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
