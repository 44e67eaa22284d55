"""Model parity with transformers on random Llama-family models, KV-cache decoding, hidden
states and the attention dispatch point."""

from __future__ import annotations

import pytest
import torch

from tessera.checkpoint.hf import read_hf_weights
from tessera.config import ModelConfig
from tessera.kernels import registry
from tessera.model import CacheContext, CausalContext, KVCache, build_model
from tessera.model.attention import attention_reference, attention_sdpa

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=96, num_hidden_layers=3, intermediate_size=160,
            max_position_embeddings=512)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

HF_CASES = {
    "llama-tied-gqa3": ("LlamaConfig", dict(num_attention_heads=6, num_key_value_heads=2,
                                            tie_word_embeddings=True, rope_theta=100000.0)),
    "llama-untied-mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=False, rope_theta=500.0)),
    "llama-mqa-bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                           attention_bias=True)),
    "llama3-rope-scaling": ("LlamaConfig", dict(num_attention_heads=6, num_key_value_heads=3,
                                                rope_scaling=LLAMA3_SCALING,
                                                rope_theta=500000.0)),
    "mistral": ("MistralConfig", dict(num_attention_heads=6, num_key_value_heads=2,
                                      sliding_window=None, head_dim=16)),
    "qwen2-qkv-bias": ("Qwen2Config", dict(num_attention_heads=6, num_key_value_heads=2,
                                           tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, tie_word_embeddings=False)),
}


def _random_hf_model(kind: str, overrides: dict):
    config = getattr(transformers, kind)(**BASE, **overrides)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # randomise biases and norms too, so they are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_parity_with_transformers_on_random_configs(case, tmp_path):
    kind, overrides = HF_CASES[case]
    hf_model = _random_hf_model(kind, overrides)
    hf_model.save_pretrained(tmp_path)
    from tessera.checkpoint.loader import model_from_state

    config, state = read_hf_weights(tmp_path)
    model = model_from_state(config, state, str(tmp_path), device=torch.device("cpu"),
                             dtype=torch.float32)
    ids = torch.randint(0, BASE["vocab_size"], (2, 150))  # past the llama3 original length
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids)
    assert actual.shape == (2, 150, BASE["vocab_size"])
    assert _relative_error(actual, expected) <= 1e-4, case


def _small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=112, max_seq_len=256)
    return ModelConfig(**(base | overrides))


@pytest.mark.parametrize("seed", range(4))
def test_incremental_decoding_equals_full_forward(seed):
    torch.manual_seed(seed)
    model = build_model(_small_config()).eval()
    length = int(torch.randint(5, 60, ()))
    prefix = int(torch.randint(1, length, ()))
    ids = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, length, dtype=torch.float32, device="cpu")
        steps = [model(ids[:, :prefix], torch.arange(prefix), CacheContext(cache, 0))]
        pos = prefix
        while pos < length:  # chunks of random size, down to single tokens
            size = int(torch.randint(1, 4, ()))
            chunk = ids[:, pos:pos + size]
            steps.append(model(chunk, torch.arange(pos, pos + chunk.shape[1]),
                               CacheContext(cache, pos)))
            pos += chunk.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_hidden_states_of_chosen_layers():
    model = build_model(_small_config(num_layers=3)).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        out = model.run(ids, hidden_layers=(0, 2), compute_logits=False)
        logits = model(ids)
    assert out.logits is None and sorted(out.hidden_states) == [0, 2]
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(out.last_hidden), logits)


def test_packed_documents_do_not_attend_across_boundaries():
    model = build_model(_small_config()).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 11, 3)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu_seqlens = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    with torch.no_grad():
        logits = model(packed, positions, CausalContext(cu_seqlens=cu_seqlens))[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(logits, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,q_len,k_len,offset", [(True, 13, 13, 0), (False, 7, 19, 0),
                                                       (True, 3, 29, 26), (True, 1, 17, 16)])
def test_sdpa_attention_matches_reference(causal, q_len, k_len, offset):
    q = torch.randn(2, q_len, 6, 32)
    k, v = torch.randn(2, k_len, 2, 32), torch.randn(2, k_len, 2, 32)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                              q_offset=offset)
    out = attention_sdpa(q, k, v, causal=causal, q_offset=offset)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_forcing_the_torch_path_selects_references():
    assert registry.select("attention", "cpu").backend == "sdpa"
    with registry.force_torch():
        assert registry.select("attention", "cpu").backend == "torch"
        model = build_model(_small_config()).eval()
        ids = torch.randint(0, 97, (1, 12))
        with torch.no_grad():
            reference = model(ids)
    with torch.no_grad():
        fast = model(ids)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_bf16_model_runs_and_keeps_fp32_rope():
    model = build_model(_small_config()).to(torch.bfloat16).eval()
    assert model.model.inv_freq(torch.device("cpu")).dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_attention_over_packed_documents_matches_reference(causal):
    """Documents attended one by one (an empty one included) equal the reference's
    block-diagonal mask, values and gradients."""
    cu_seqlens = torch.tensor([0, 7, 7, 20, 21, 33], dtype=torch.int32)
    q = torch.randn(1, 33, 6, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 33, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 33, 2, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 33, 6, 16, dtype=torch.float64)
    outs = []
    for impl in (attention_reference, attention_sdpa):
        out = impl(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the reference: fp32 math
