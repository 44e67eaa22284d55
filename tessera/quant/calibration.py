"""Token windows from a corpus split, and the perplexity of a model on them.

`token_windows` reads the documents of one split of a corpus source in order (see
`tessera.data.corpus`: the split is decided per document by a hash of its text), encodes
each, appends EOS (as the token shards do), concatenates, and cuts the stream into
`num_tokens // seq_len` windows of `seq_len` tokens (the tail is dropped). It stops reading
as soon as it has enough tokens, so a few thousand tokens cost a few files.

AWQ calibrates on the `train` split; quality is measured on the `val` split with the same
`val_fraction`, so the two never share a document.

`perplexity(model, windows)` is `exp` of the mean next-token cross-entropy over every
position of every window, each window scored on its own from position 0 (no context carried
across windows). It knows nothing about quantization.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.data.corpus import iter_documents
from tessera.errors import DataError


def token_windows(tokenizer: Any, *, source: str = "python-stdlib", split: str = "train",
                  val_fraction: float = 0.02, num_tokens: int = 4096,
                  seq_len: int = 512) -> torch.Tensor:
    """`[num_tokens // seq_len, seq_len]` int64 token ids of `split` (see the module doc)."""
    if num_tokens < seq_len:
        raise DataError(f"num_tokens ({num_tokens}) must be at least seq_len ({seq_len})")
    wanted = (num_tokens // seq_len) * seq_len
    ids: list[int] = []
    for doc in iter_documents(source, split=split, val_fraction=val_fraction):
        ids += tokenizer.encode(doc.text) + [tokenizer.eos_token_id]
        if len(ids) >= wanted:
            break
    if len(ids) < wanted:
        raise DataError(f"split {split!r} of {source!r} (val_fraction={val_fraction}) holds "
                        f"{len(ids)} tokens, fewer than the {wanted} asked for")
    return torch.tensor(ids[:wanted], dtype=torch.long).view(-1, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Perplexity of `model` on token windows `[B, T]` (see the module doc)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids)[:, :-1].float()
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum")
        total += loss.item()  # NOTE: a host sync per batch, outside any hot loop
        count += targets.numel()
    return math.exp(total / count)
