"""Distillation: losses on logits and hidden states (the trainer builds on these)."""

from tessera.distill.hidden import HiddenStateMatcher
from tessera.distill.losses import (
    IGNORE_INDEX,
    LOSSES,
    KDLossConfig,
    LossParts,
    distill_loss,
    distill_loss_parts,
    kd_loss_from_hidden,
    kd_loss_from_hidden_parts,
    soft_loss_rows,
    temperature_schedule,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "HiddenStateMatcher",
    "KDLossConfig",
    "LossParts",
    "distill_loss",
    "distill_loss_parts",
    "kd_loss_from_hidden",
    "kd_loss_from_hidden_parts",
    "soft_loss_rows",
    "temperature_schedule",
]
