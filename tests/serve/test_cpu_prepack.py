"""oneDNN-prepacked linear layers (`tessera.model.cpu_prepack`) against `F.linear` and the
plain model: the same products on odd shapes, the same logits, state dict and engine
tokens, untouched training, and undoing it (also before quantizing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.errors import ConfigError
from tessera.model import cpu_prepack
from tessera.model.cpu_prepack import (
    PackedProduct,
    PrepackedLinear,
    prepack_linears,
    unprepack_linears,
)
from tessera.model.fused_projections import fuse_projections
from tessera.quant import quantize_model
from tessera.serve.config import EngineConfig

from .helpers import greedy_tokens_off_and_on, tiny_model

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (17, 96), (3, 5, 96), (1, 300, 96)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("one_row_packed", [False, True])
def test_packed_product_equals_linear(dtype, shape, bias, one_row_packed):
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(131, 96, generator=generator).to(dtype)
    b = torch.randn(131, generator=generator).to(dtype) if bias else None
    x = torch.randn(*shape, generator=generator).to(dtype)
    product = PackedProduct(weight)
    if one_row_packed:
        product.min_rows = 1
    with torch.inference_mode():
        got = product(x, weight, b)
    expected = F.linear(x.double(), weight.double(), b.double() if bias else None)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("fuse", [False, True])
def test_prepacked_model_gives_the_same_logits_and_state_dict(fuse):
    config = dict(attention_bias=True, tie_word_embeddings=True)
    plain, packed = tiny_model(seed=3, **config), tiny_model(seed=3, **config)
    if fuse:
        fuse_projections(packed)
    expected_state = packed.state_dict()
    per_layer = 2 + (2 if fuse else 5)  # o, down + the fused groups or the five members
    assert prepack_linears(packed) == per_layer * packed.config.num_layers + 1  # + head
    assert isinstance(packed.lm_head, PrepackedLinear)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # still tied
    state = packed.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    ids = torch.randint(2, 256, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(ids[:, :1]), plain(ids[:, :1]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("wins", [False, True])
def test_one_float32_row_is_packed_where_the_timed_pass_says_so(monkeypatch, wins):
    """`prepack_linears` asks `packed_wins_one_row` once; the answer sets every float32
    product's `min_rows` (1 or 2), and one-row logits equal the plain model's either way."""
    calls = []
    monkeypatch.setattr(cpu_prepack, "packed_wins_one_row",
                        lambda products: calls.append(len(products)) or wins)
    plain, packed = tiny_model(seed=5), tiny_model(seed=5)
    count = prepack_linears(packed)
    assert calls == [count]  # every product, asked once
    products = [m.product for m in packed.modules() if isinstance(m, PrepackedLinear)]
    assert {p.min_rows for p in products} == {1 if wins else 2}
    ids = torch.randint(2, 256, (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed_seconds, expected", [(0.001, True), (0.003, False)])
def test_the_one_row_decision_takes_the_faster_best_pass(monkeypatch, packed_seconds,
                                                         expected):
    """Two passes each way, alternating; the best of each decides (a slow first pass, as
    a cold cache gives, does not)."""
    passes = []

    def one_row_pass(products, packed):
        passes.append(packed)
        return packed_seconds if packed else (0.01 if len(passes) == 1 else 0.002)

    monkeypatch.setattr(cpu_prepack, "_one_row_pass", one_row_pass)
    weights = [PackedProduct(torch.randn(8, 16)) for _ in range(3)]
    assert cpu_prepack.packed_wins_one_row(weights) is expected
    assert passes == [False, True, False, True]


def test_the_one_row_pass_runs_both_products_on_the_probe():
    products = [PackedProduct(torch.randn(n, k)) for n, k in ((40, 24), (7, 24), (9, 33))]
    for packed in (False, True):
        assert cpu_prepack._one_row_pass(products, packed) > 0
    assert isinstance(cpu_prepack.packed_wins_one_row(products), bool)


def test_training_through_a_prepacked_model_takes_the_plain_product():
    model = tiny_model(seed=1)
    prepack_linears(model)
    ids = torch.randint(2, 256, (2, 7))
    model(ids).logsumexp(-1).sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_unprepacking_restores_linears_and_a_prepacked_model_still_quantizes():
    model = tiny_model(seed=2)
    fuse_projections(model)
    count = prepack_linears(model)
    assert unprepack_linears(model) == count
    assert not any(isinstance(m, PrepackedLinear) for m in model.modules())
    assert type(model.lm_head) is torch.nn.Linear
    prepack_linears(model)
    quantize_model(model, "int8")
    expected = quantize_model(tiny_model(seed=2), "int8")
    ids = torch.randint(2, 256, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), expected(ids))


@pytest.mark.parametrize("fuse", [False, True])
def test_a_prepacked_model_deep_copies_into_its_own_packed_weights(fuse):
    """An engine packs the model it is given in place; a deep copy of it (the quantizer's
    callers take one) is a packed model of its own: the same logits, its own packed
    weights, and weights that no longer reach the original."""
    import copy

    model = tiny_model(seed=4, tie_word_embeddings=True)
    if fuse:
        fuse_projections(model)
    prepack_linears(model)
    copied = copy.deepcopy(model)
    assert copied.lm_head.weight is copied.model.embed_tokens.weight  # still tied
    assert copied.lm_head.product.weight is copied.lm_head.weight
    assert copied.lm_head.product.packed is not model.lm_head.product.packed
    ids = torch.randint(2, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(ids)
        torch.testing.assert_close(copied(ids), expected)
        copied.lm_head.weight.mul_(2)  # the copy's own parameter: the original is unmoved
        torch.testing.assert_close(model(ids), expected)


def test_nothing_is_packed_without_onednn_or_off_the_cpu(monkeypatch):
    model = tiny_model(seed=2).to(torch.float16)  # a dtype it does not pack
    assert prepack_linears(model) == 0
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert prepack_linears(tiny_model(seed=2)) == 0


def test_the_engine_prepacks_by_default_and_gives_the_same_tokens(make_engine):
    plain, packed = greedy_tokens_off_and_on(
        make_engine, "cpu_prepack", lambda model: isinstance(model.lm_head, PrepackedLinear))
    assert packed == plain


def test_cpu_prepack_must_be_a_bool():
    with pytest.raises(ConfigError, match="cpu_prepack must be true or false"):
        EngineConfig(cpu_prepack=1)
