"""Attention that leaves RoPE to the paged context (`tessera.model.rotating_attention`):
which modules change, the same logits under contexts without the method, the paged context
rotating and writing in one "rope_kv_write" call (no "rope", no "kv_write"), the engine's
greedy tokens unchanged, and on CUDA the same tokens as the two-launch path."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.model.fused_projections import fuse_projections
from tessera.model.gemv_products import use_gemv_products
from tessera.model.rotating_attention import (
    RotatingAttention,
    undo_rotating_attention,
    use_rotating_attention,
)
from tessera.model.transformer import Attention
from tessera.quant import quantize_model
from tessera.serve.config import EngineConfig

from .helpers import (
    GREEDY,
    drain,
    greedy_tokens_off_and_on,
    random_prompt,
    reference,
    run_engine,
    tiny_model,
)

IDS = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))


def rotates(model) -> bool:
    return any(type(m) is RotatingAttention for m in model.modules())


def test_only_attentions_change_and_other_contexts_see_the_plain_layer():
    plain, changed = tiny_model(seed=3), tiny_model(seed=3)
    expected_state = changed.state_dict()
    layers = changed.config.num_layers
    assert use_rotating_attention(changed, everywhere=True) == layers
    assert all(type(layer.self_attn) is RotatingAttention for layer in changed.model.layers)
    state = changed.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    with torch.inference_mode():  # the causal context has no rotate_and_attend
        torch.testing.assert_close(changed(IDS), plain(IDS), rtol=0, atol=0)
    assert undo_rotating_attention(changed) == layers
    assert all(type(layer.self_attn) is Attention for layer in changed.model.layers)


def test_only_devices_with_a_fast_op_are_changed():
    model = tiny_model(seed=1)
    assert use_rotating_attention(model) == 0  # CPU: the op is the reference there
    assert not rotates(model)


def test_the_engine_leaves_cpu_models_alone(make_engine):
    model = tiny_model(seed=4)
    make_engine(model, rope_kv_write=True)
    assert not rotates(model)


def test_the_paged_context_rotates_and_writes_in_one_call(make_engine, monkeypatch):
    """Over an engine's paged context a rotating layer calls "rope_kv_write" once per layer
    and step, and neither "rope" nor "kv_write"; prefill, decode and a prefix-cache hit give
    the greedy tokens of the plain engine."""
    import tessera.serve.engine as engine_module
    from tessera.kernels import registry

    monkeypatch.setattr(engine_module, "use_rotating_attention",
                        lambda model: use_rotating_attention(model, everywhere=True))
    calls = []
    real_get = registry.get
    monkeypatch.setattr(registry, "get",
                        lambda name, device: calls.append(name) or real_get(name, device))
    plain, changed = greedy_tokens_off_and_on(make_engine, "rope_kv_write", rotates)
    assert changed == plain
    model = tiny_model(seed=7)
    engine = make_engine(model, rope_kv_write=True)
    calls.clear()
    prompt = random_prompt(9, torch.Generator().manual_seed(2))
    run_engine(engine, {"a": (prompt, GREEDY.replace(max_tokens=3))})
    steps = 3  # one prefill, two decode steps
    assert calls.count("rope_kv_write") == steps * model.config.num_layers
    assert calls.count("rope") == 0 and calls.count("kv_write") == 0


def test_mixed_steps_and_prefix_hits_match_plain_generation(make_engine, monkeypatch):
    """Steps that mix a decode with prefills, one of them reading cached prefix blocks (a
    paged group of several queries), through the rotating layers: each request's greedy
    tokens equal plain generation's (the same model, whose layers run unrotated there)."""
    import tessera.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "use_rotating_attention",
                        lambda model: use_rotating_attention(model, everywhere=True))
    model = tiny_model(seed=9)
    engine = make_engine(model, rope_kv_write=True, block_size=4)
    assert rotates(model)
    generator = torch.Generator().manual_seed(3)
    first = random_prompt(10, generator)
    prompts = {"a": first, "b": first[:8] + random_prompt(3, generator),
               "c": random_prompt(6, generator)}
    engine.add_request("a", prompts["a"], GREEDY)
    engine.step()
    engine.step()  # "a" decodes while "b" and "c" prefill
    for request_id in ("b", "c"):
        engine.add_request(request_id, prompts[request_id], GREEDY)
    done = drain(engine)
    assert engine.stats().prefix_cache_hit_rate > 0
    for request_id, prompt in prompts.items():
        assert done[request_id].outputs[0].token_ids == \
            reference(model, prompt, GREEDY.max_tokens)


def test_quantized_and_gemv_models_rotate_with_the_same_tokens(make_engine, monkeypatch):
    """The class change composes with fused, quantized projections and the GEMV layers."""
    import tessera.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "use_rotating_attention",
                        lambda model: use_rotating_attention(model, everywhere=True))
    monkeypatch.setattr(engine_module, "use_gemv_products",
                        lambda model: use_gemv_products(model, everywhere=True))
    prompts = {"a": ([5, 9, 17, 3], GREEDY), "b": ([40, 41, 42, 43, 44], GREEDY)}
    outputs = []
    for enabled in (False, True):
        model = quantize_model(tiny_model(seed=5), "int8")
        engine = make_engine(model, rope_kv_write=enabled)
        assert rotates(model) is enabled
        done = run_engine(engine, prompts)
        outputs.append([done[r].outputs[0].token_ids for r in prompts])
    assert outputs[1] == outputs[0]


def test_rope_kv_write_must_be_a_bool():
    with pytest.raises(ConfigError, match="rope_kv_write must be true or false"):
        EngineConfig(rope_kv_write=1)


@pytest.mark.gpu
def test_engine_rope_kv_write_matches_two_launches_on_cuda(make_engine):
    """Greedy tokens with and without the one-launch RoPE and KV write (float32): CUDA
    graphs, single and batched decode steps, a prefill."""
    generator = torch.Generator().manual_seed(11)
    prompts = {f"r{i}": random_prompt(n, generator) for i, n in enumerate((3, 9, 40, 5))}
    outputs = []
    for enabled in (False, True):
        model = tiny_model(seed=7).to("cuda")
        fuse_projections(model)
        engine = make_engine(model, rope_kv_write=enabled, max_num_seqs=4, max_model_len=128)
        assert rotates(model) is enabled
        singles = [run_engine(engine, {r: (p, GREEDY)})[r].outputs[0].token_ids
                   for r, p in prompts.items()]
        batch = run_engine(engine, {r: (p, GREEDY) for r, p in prompts.items()})
        outputs.append((singles, [batch[r].outputs[0].token_ids for r in prompts]))
    assert outputs[1] == outputs[0]
