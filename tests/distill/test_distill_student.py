"""Student construction: copied layers equal the teacher's, a full copy is the teacher,
vocabulary mismatches fail early, parameter counts add up."""

from __future__ import annotations

import pytest
import torch

from tessera.config import ModelConfig
from tessera.distill.run_config import StudentConfig
from tessera.distill.student import (
    build_student,
    default_layer_map,
    parameter_counts,
    resolve_student_config,
    select_layers,
    student_from_teacher,
)
from tessera.errors import ConfigError
from tessera.model import build_model


def _teacher(num_layers: int = 6, tie: bool = False, seed: int = 0):
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=num_layers, num_heads=4,
                         num_kv_heads=2, intermediate_size=48, tie_word_embeddings=tie,
                         attention_bias=True, attention_out_bias=True)
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so copies are visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_kept_layers_copy_the_teachers_weights(tie):
    teacher = _teacher(tie=tie)
    student = student_from_teacher(teacher, [0, 2, 5])
    assert student.config.num_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 2, 5]):
        prefix_s, prefix_t = f"model.layers.{j}.", f"model.layers.{i}."
        names = [n for n in s_state if n.startswith(prefix_s)]
        assert names
        for name in names:
            assert torch.equal(s_state[name], t_state[prefix_t + name[len(prefix_s):]]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], t_state[name])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie


def test_student_weights_are_copies_not_views():
    teacher = _teacher()
    before = teacher.model.layers[2].mlp.up_proj.weight.clone()
    student = student_from_teacher(teacher, [2])
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(teacher.model.layers[2].mlp.up_proj.weight, before)


def test_keeping_every_layer_reproduces_the_teacher():
    teacher = _teacher().eval()
    spec = StudentConfig(keep_every=1)
    student, layers = build_student(spec, teacher)
    ids = torch.randint(0, 97, (2, 11))
    assert layers == list(range(6))
    assert torch.equal(student(ids), teacher(ids))


def test_keep_every_two_and_layer_map():
    assert select_layers(30, keep_every=2) == list(range(0, 30, 2))
    assert select_layers(5, keep_every=3) == [0, 3]
    assert default_layer_map([0, 2, 4]) == {1: 1, 2: 3, 3: 5}


@pytest.mark.parametrize("layers, message", [([0, 6], "outside"), ([3, 1], "increasing")])
def test_bad_layer_choices_are_rejected(layers, message):
    with pytest.raises(ConfigError, match=message):
        select_layers(6, layers=layers)


def test_vocabulary_mismatch_is_a_clear_error():
    teacher_config = _teacher().config
    with pytest.raises(ConfigError, match="vocabulary.*97"):
        resolve_student_config(StudentConfig(preset="student-tiny"), teacher_config)


def test_fresh_student_inherits_vocab_and_is_seeded():
    teacher = _teacher()
    spec = StudentConfig(model={"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                "num_kv_heads": 1, "intermediate_size": 24})
    a, layers = build_student(spec, teacher, seed=3)
    b, _ = build_student(spec, teacher, seed=3)
    c, _ = build_student(spec, teacher, seed=4)
    assert layers is None and a.config.vocab_size == 97
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_match_the_config(tie):
    model = student_from_teacher(_teacher(tie=tie), [1, 3])
    counts = parameter_counts(model)
    config = model.config
    assert counts["total"] == config.num_parameters()
    assert counts["non_embedding"] == config.num_parameters(include_embeddings=False)
    assert counts["trainable"] == counts["total"]
