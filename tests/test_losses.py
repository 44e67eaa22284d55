"""Distillation losses: mathematical properties against plain float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.distill import (
    LOSSES,
    HiddenStateMatcher,
    KDLossConfig,
    distill_loss,
    distill_loss_parts,
    kd_loss_from_hidden,
    temperature_schedule,
)
from tessera.errors import ConfigError

N, V = 37, 211  # odd on purpose: chunks never divide evenly


def reference(student, teacher, mask, *, loss, temperature=1.0, beta=0.5, alpha=0.1,
              labels=None, kd_weight=1.0, ce_weight=0.0):
    """The losses written out plainly in float64 (mean reduction)."""
    s, t = student.double(), teacher.double()
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if loss == "forward_kl":
        rows = kl(p, q)
    elif loss == "reverse_kl":
        rows = kl(q, p)
    elif loss == "jsd":
        m = beta * p + (1 - beta) * q
        rows = (1 - beta) * kl(p, m) + beta * kl(q, m)
    elif loss == "tvd":
        rows = 0.5 * (p - q).abs().sum(-1)
    else:
        rows = kl(p, alpha * p + (1 - alpha) * q)
    keep = mask.bool()
    soft = rows[keep].sum() * temperature**2 / keep.sum()
    total = kd_weight * soft
    if labels is not None and ce_weight:
        valid = keep & (labels != -100)
        ce = F.cross_entropy(s[valid], labels[valid], reduction="sum") / valid.sum()
        total = total + ce_weight * ce
    return total


def random_case(seed, n=N, v=V, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g) * scale).to(dtype)
    teacher = (torch.randn(n, v, generator=g) * scale).to(dtype)
    mask = torch.rand(n, generator=g) > 0.3
    mask[0] = True
    return student, teacher, mask


def value_and_grad(fn, student):
    student = student.detach().clone().requires_grad_(True)
    out = fn(student)
    (grad,) = torch.autograd.grad(out, student)
    return out.detach(), grad


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_values_and_gradients_match_float64_reference(loss, temperature):
    student, teacher, mask = random_case(seed=hash((loss, temperature)) % 1000)
    opts = {"loss": loss, "temperature": temperature, "beta": 0.3, "alpha": 0.2}
    want, want_grad = value_and_grad(
        lambda s: reference(s, teacher, mask, **opts), student.double())
    got, got_grad = value_and_grad(
        lambda s: distill_loss(s, teacher, mask, chunk_size=8, **opts), student)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # float64 inputs stay float64 all the way through.
    got64, got64_grad = value_and_grad(
        lambda s: distill_loss(s, teacher.double(), mask, chunk_size=8, **opts),
        student.double())
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got64_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_mixed_hard_label_cross_entropy_matches_reference(loss):
    student, teacher, mask = random_case(seed=7)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    labels[::5] = -100
    opts = {"loss": loss, "temperature": 2.0, "labels": labels, "kd_weight": 0.7,
            "ce_weight": 0.3}
    want, want_grad = value_and_grad(
        lambda s: reference(s, teacher, mask, **opts), student.double())
    got, got_grad = value_and_grad(
        lambda s: distill_loss(s.double(), teacher.double(), mask, chunk_size=5, **opts),
        student.double())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    parts = distill_loss_parts(student, teacher, mask, **opts)
    assert int(parts.num_label_tokens) == int((mask & (labels != -100)).sum())
    torch.testing.assert_close(parts.loss, 0.7 * parts.soft + 0.3 * parts.ce)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_on_identical_inputs(loss):
    student, _, mask = random_case(seed=3)
    value, grad = value_and_grad(
        lambda s: distill_loss(s, student, mask, loss=loss, temperature=1.7), student)
    assert abs(float(value)) < 1e-6
    assert grad.abs().max() < 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 19), v=st.integers(2, 97),
       scale=st.sampled_from([0.01, 1.0, 30.0]), temperature=st.floats(0.25, 4.0),
       beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 0.99))
def test_losses_are_non_negative(seed, n, v, scale, temperature, beta, alpha):
    student, teacher, mask = random_case(seed, n, v, scale)
    for loss in LOSSES:
        value = distill_loss(student, teacher, mask, loss=loss, temperature=temperature,
                             beta=beta, alpha=alpha, chunk_size=4)
        assert torch.isfinite(value) and value >= 0, loss


def test_jsd_endpoints_are_the_two_kls():
    student, teacher, mask = random_case(seed=11)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = distill_loss(student, teacher, mask, loss="jsd", beta=beta, temperature=1.5)
        want = distill_loss(student, teacher, mask, loss=kl, temperature=1.5)
        torch.testing.assert_close(jsd, want, rtol=1e-6, atol=0)
        # ... and JSD converges to them (no special-casing of the endpoints).
        s64, t64 = student.double(), teacher.double()
        want64 = float(distill_loss(s64, t64, mask, loss=kl, temperature=1.5))
        gaps = [abs(float(distill_loss(s64, t64, mask, loss="jsd", beta=abs(beta - eps),
                                       temperature=1.5)) - want64)
                for eps in (1e-2, 1e-4, 1e-6, 1e-8)]
        assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3 * want64
    skew0 = distill_loss(student, teacher, mask, loss="skew_kl", alpha=0.0)
    torch.testing.assert_close(skew0, distill_loss(student, teacher, mask))


def test_jsd_half_is_symmetric():
    student, teacher, mask = random_case(seed=12)
    ab = distill_loss(student, teacher, mask, loss="jsd", beta=0.5)
    ba = distill_loss(teacher, student, mask, loss="jsd", beta=0.5)
    torch.testing.assert_close(ab, ba)
    assert ab <= math.log(2) + 1e-6  # JSD (natural log) is bounded by log 2


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_inputs_give_finite_non_negative_losses(loss):
    student, teacher, mask = random_case(seed=5, scale=40.0, dtype=torch.bfloat16)
    for t in (teacher, student):  # different, and identical, inputs
        value, grad = value_and_grad(
            lambda s, t=t: distill_loss(s, t, mask, loss=loss, chunk_size=6), student)
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and value >= 0
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    # bf16 tracks the float32 loss of the same (rounded) logits.
    want = distill_loss(student.float(), teacher.float(), mask, loss=loss)
    torch.testing.assert_close(distill_loss(student, teacher, mask, loss=loss), want)


def test_infinite_logits_give_no_nan():
    student, teacher, mask = random_case(seed=6)
    student[:, :3] = -math.inf  # e.g. a padded vocabulary masked out in both
    teacher[:, :3] = -math.inf
    for loss in LOSSES:
        value, grad = value_and_grad(lambda s, loss=loss: distill_loss(
            s, teacher, mask, loss=loss), student)
        assert torch.isfinite(value) and value >= 0, loss
        assert not torch.isnan(grad).any(), loss


@pytest.mark.parametrize("loss", LOSSES)
def test_masked_tokens_contribute_nothing(loss):
    student, teacher, mask = random_case(seed=8)
    labels = torch.randint(0, V, (N,))
    opts = {"loss": loss, "labels": labels, "ce_weight": 0.5, "chunk_size": 7}
    value, grad = value_and_grad(lambda s: distill_loss(s, teacher, mask, **opts), student)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = torch.randn(int((~mask).sum()), V) * 10
    teacher2[~mask] = torch.randn(int((~mask).sum()), V) * 10
    value2, grad2 = value_and_grad(lambda s: distill_loss(s, teacher2, mask, **opts), student2)
    assert torch.equal(value, value2)
    assert torch.equal(grad[mask], grad2[mask])
    assert (grad[~mask] == 0).all()
    # A 0/1 mask means the same as a bool mask.
    torch.testing.assert_close(distill_loss(student, teacher, mask.float(), **opts), value,
                               rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_micro_batches_with_global_counts_equal_one_batch(loss):
    student, teacher, mask = random_case(seed=9, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    opts = {"loss": loss, "labels": labels, "kd_weight": 1.0, "ce_weight": 0.5,
            "temperature": 2.0}
    full, full_grad = value_and_grad(lambda s: distill_loss(s, teacher, mask, **opts), student)

    num_tokens = mask.sum()
    num_label_tokens = (mask & (labels != -100)).sum()
    leaf = student.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 10), slice(10, 11), slice(11, N)):  # uneven micro-batches
        micro = distill_loss(leaf[part], teacher[part], mask[part], loss=loss,
                             labels=labels[part], ce_weight=0.5, temperature=2.0,
                             num_tokens=num_tokens, num_label_tokens=num_label_tokens)
        micro.backward()  # gradients accumulate in leaf.grad
        total += micro.item()
    assert total == pytest.approx(float(full), rel=1e-12)
    torch.testing.assert_close(leaf.grad, full_grad, rtol=1e-12, atol=1e-15)

    # 'sum' reduction adds up exactly the same way.
    sums = sum(float(distill_loss(student[p], teacher[p], mask[p], loss=loss, reduction="sum"))
               for p in (slice(0, 20), slice(20, N)))
    assert sums == pytest.approx(
        float(distill_loss(student, teacher, mask, loss=loss, reduction="sum")), rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_equals_unchunked(loss):
    student, teacher, mask = random_case(seed=10)
    results = [value_and_grad(lambda s, c=c: distill_loss(
        s, teacher, mask, loss=loss, temperature=1.3, chunk_size=c), student)
        for c in (1, 6, N, 10 * N)]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_leading_dims_are_flattened():
    student, teacher, mask = random_case(seed=13, n=36)
    flat = distill_loss(student, teacher, mask, loss="jsd")
    shaped = distill_loss(student.view(4, 9, V), teacher.view(4, 9, V), mask.view(4, 9),
                          loss="jsd")
    torch.testing.assert_close(flat, shaped)


def _hidden_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(21)
    dim, teacher_dim = 24, 40
    hidden = torch.randn(N, dim, generator=g, dtype=dtype)
    weight = torch.randn(V, dim, generator=g, dtype=dtype) * 0.3
    t_hidden = torch.randn(N, teacher_dim, generator=g, dtype=dtype)
    t_weight = torch.randn(V, teacher_dim, generator=g, dtype=dtype) * 0.3
    mask = torch.rand(N, generator=g) > 0.2
    return hidden, weight, t_hidden, t_weight, mask


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_from_hidden_matches_loss_on_logits(loss):
    hidden, weight, t_hidden, t_weight, mask = _hidden_case()
    labels = torch.randint(0, V, (N,))
    opts = {"loss": loss, "temperature": 1.5, "labels": labels, "ce_weight": 0.25}

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = fn(h, w)
        out.backward()
        return out.detach(), h.grad, w.grad

    t_logits = t_hidden @ t_weight.t()
    want = run(lambda h, w: distill_loss(h @ w.t(), t_logits, mask, **opts))
    from_logits = run(lambda h, w: kd_loss_from_hidden(
        h, w, mask, teacher_logits=t_logits, chunk_size=5, **opts))
    from_hidden = run(lambda h, w: kd_loss_from_hidden(
        h, w, mask, teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight, chunk_size=8,
        **opts))
    for got in (from_logits, from_hidden):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_paths_keep_no_full_vocab_tensor_for_backward():
    hidden, weight, _, _, mask = _hidden_case(torch.float32)
    student = (hidden @ weight.t()).requires_grad_(True)
    teacher = torch.randn(N, V)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        a = distill_loss(student, teacher, mask, loss="jsd", chunk_size=4)
        b = kd_loss_from_hidden(hidden, weight, mask, teacher_logits=teacher, loss="jsd",
                                chunk_size=4)
    # Only per-chunk inputs are kept; the [chunk, V] float32 work is recomputed.
    assert sum(saved) < N * V // 4
    (a + b).backward()
    assert weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0


def test_option_validation():
    student, teacher, mask = random_case(seed=1)
    bad = [{"loss": "kl"}, {"temperature": 0.0}, {"beta": 1.5}, {"alpha": 1.0},
           {"reduction": "max"}, {"chunk_size": 0}, {"ce_weight": 1.0}]
    for opts in bad:
        with pytest.raises(ConfigError):
            distill_loss(student, teacher, mask, **opts)
    with pytest.raises(ConfigError, match="shared vocabulary"):
        distill_loss(student, teacher[:, :-1], mask)
    with pytest.raises(ConfigError, match="mask shape"):
        distill_loss(student, teacher, mask[:-1])


def test_kd_loss_config():
    cfg = KDLossConfig(loss="jsd", temperature=4.0, final_temperature=1.0,
                       temperature_schedule="linear", ce_weight=0.1, hidden_weight=0.5,
                       layer_map={"2": 4})
    assert cfg.layer_map == {2: 4}
    assert KDLossConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.loss_kwargs(0, 11)["temperature"] == 4.0
    assert cfg.loss_kwargs(10, 11)["temperature"] == 1.0
    for bad in ({"loss": "mse"}, {"temperature_schedule": "step"}, {"hidden_weight": 1.0},
                {"kd_weight": 0.0}, {"final_temperature": -1.0}):
        with pytest.raises(ConfigError):
            KDLossConfig(**bad)
    with pytest.raises(ConfigError, match="unknown KDLossConfig keys"):
        KDLossConfig.from_dict({"temprature": 2.0})


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_temperature_schedules(kind):
    total = 101
    temps = [temperature_schedule(s, total, start=4.0, end=1.0, kind=kind)
             for s in range(total + 5)]
    assert temps[0] == 4.0
    if kind == "constant":
        assert set(temps) == {4.0}
        return
    assert temps[total - 1] == pytest.approx(1.0) and temps[-1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(temps, temps[1:], strict=False))  # monotone from start to end
    assert temps[50] == pytest.approx(2.5)  # both are symmetric about the midpoint
    if kind == "cosine":  # flat at the ends, unlike linear
        assert 4.0 - temps[1] < (4.0 - 1.0) / (total - 1)


def test_hidden_state_matcher_projects_and_trains():
    torch.manual_seed(0)
    matcher = HiddenStateMatcher(24, 40, {1: 2, 3: 5}, kind="mse")
    student = {i: torch.randn(2, 7, 24, requires_grad=True) for i in range(4)}
    teacher = [torch.randn(2, 7, 40) for _ in range(6)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    loss = matcher(student, teacher, mask)
    loss.backward()
    for layer in ("1", "3"):
        assert matcher.projections[layer].weight.grad.abs().sum() > 0
    assert student[1].grad[mask].abs().sum() > 0
    assert (student[1].grad[~mask] == 0).all() and student[0].grad is None

    # The value is the masked per-token MSE, averaged over the two mapped layers.
    with torch.no_grad():
        want = sum(((matcher.projections[str(s)](student[s]) - teacher[t]) ** 2).mean(-1)[mask]
                   .mean() for s, t in ((1, 2), (3, 5))) / 2
    torch.testing.assert_close(loss.detach(), want)


def test_hidden_state_matcher_same_width_and_cosine():
    matcher = HiddenStateMatcher(16, 16, {0: 0}, kind="cosine")
    assert sum(p.numel() for p in matcher.parameters()) == 0  # identity projection
    states = torch.randn(3, 5, 16)
    assert matcher([states], [states * 3.0]).abs() < 1e-6  # cosine ignores scale
    assert matcher([states], [-states]) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="layer 1"):
        HiddenStateMatcher(16, 16, {1: 0})([states], [states])
    with pytest.raises(ConfigError):
        HiddenStateMatcher(16, 8, {}, kind="mse")
