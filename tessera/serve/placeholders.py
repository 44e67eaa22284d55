"""Placeholders: token ids the device has sampled and the host has not read yet.

An overlapped step (`engine.py`) launches before the host reads the previous step's
tokens. Each such token enters its sequence's ids as `-1 - j`, j being its row in the
previous step's token tensor (`sequence.py` keeps the bookkeeping); the runner's inputs
carry the placeholders to the device, where `fill_placeholders` swaps in the real ids.
"""

from __future__ import annotations

import torch


def placeholder(row: int) -> int:
    """The id standing for row `row` of a step's sampled-token tensor."""
    return -1 - row


def fill_placeholders(input_ids: torch.Tensor, pending_tokens: torch.Tensor | None) -> None:
    """Replace, in place, each placeholder `-1 - j` of `input_ids` by `pending_tokens[j]`;
    device ops only (no host sync)."""
    if pending_tokens is None or pending_tokens.numel() == 0:
        return
    rows = (-1 - input_ids).clamp_(min=0)  # real ids (>= 0) index row 0, then are kept
    torch.where(input_ids < 0, pending_tokens[rows], input_ids, out=input_ids)
