"""Hidden-state matching: pull chosen student layers towards chosen teacher layers.

`HiddenStateMatcher` holds one learned projection per mapped student layer (an
`nn.Linear(student_dim, teacher_dim, bias=False)` when the widths differ, the identity when
they agree) and compares the projected student states with the teacher's, per token, by
mean squared error or by cosine distance (1 - cosine similarity). The loss is the mean over
masked tokens, averaged over the mapped layers.

Layer indices follow `tessera.model` (`ModelOutput.hidden_states`): 0 = embeddings,
i = output of block i. Hidden states are passed as a mapping (or sequence) from layer index
to `[..., dim]` tensors. The teacher's states are constants (detached). The matcher knows
nothing about the models that produce the states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distill.losses import HIDDEN_KINDS
from tessera.errors import ConfigError

HiddenStates = Mapping[int, torch.Tensor] | Sequence[torch.Tensor]


class HiddenStateMatcher(nn.Module):
    """Projected student hidden states vs teacher hidden states over a layer map."""

    def __init__(self, student_dim: int, teacher_dim: int, layer_map: Mapping[int, int],
                 kind: str = "mse"):
        super().__init__()
        if kind not in HIDDEN_KINDS:
            raise ConfigError(f"unknown hidden-state loss {kind!r}; expected one of "
                              f"{HIDDEN_KINDS}")
        if not layer_map:
            raise ConfigError("hidden-state matching needs a non-empty layer_map "
                              "(student layer -> teacher layer)")
        self.student_dim, self.teacher_dim, self.kind = student_dim, teacher_dim, kind
        self.layer_map = {int(s): int(t) for s, t in sorted(layer_map.items())}
        self.projections = nn.ModuleDict({
            str(s): (nn.Linear(student_dim, teacher_dim, bias=False)
                     if student_dim != teacher_dim else nn.Identity())
            for s in self.layer_map
        })

    def forward(self, student_hidden: HiddenStates, teacher_hidden: HiddenStates,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss; `mask` `[...]` (the states' token dims) selects the tokens."""
        total = None
        for s_layer, t_layer in self.layer_map.items():
            student = self.projections[str(s_layer)](_layer(student_hidden, s_layer, "student"))
            teacher = _layer(teacher_hidden, t_layer, "teacher").detach()
            if student.shape != teacher.shape:
                raise ConfigError(f"student layer {s_layer} projects to "
                                  f"{tuple(student.shape)} but teacher layer {t_layer} is "
                                  f"{tuple(teacher.shape)}")
            per_token = self._per_token(student.float(), teacher.float())  # [...]
            term = _masked_mean(per_token, mask)
            total = term if total is None else total + term
        return total / len(self.layer_map)

    def _per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return (student - teacher).pow(2).mean(-1)
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def _layer(states: HiddenStates, index: int, who: str) -> torch.Tensor:
    try:
        return states[index]
    except (KeyError, IndexError):
        have = sorted(states) if isinstance(states, Mapping) else list(range(len(states)))
        raise ConfigError(f"{who} hidden state of layer {index} was not given "
                          f"(have layers {have}); check layer_map") from None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} does not match the hidden "
                          f"states' token dims {tuple(values.shape)}")
    keep = mask != 0
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp_min(1)
