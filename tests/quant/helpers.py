"""A tiny random Llama-family model and token ids for the quantization tests."""

from __future__ import annotations

import torch

from tessera.config import ModelConfig
from tessera.model import build_model

# hidden 96 and ffn 160: int4 groups of 96 and 80 (the largest multiples of 16 dividing them)
TINY = ModelConfig(vocab_size=256, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=160, max_seq_len=256, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)


def tiny_model(seed: int = 0, config: ModelConfig = TINY) -> torch.nn.Module:
    """A random model whose norms are not all ones, so that folding into them is tested."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.uniform_(0.5, 1.5)
    return model


def token_ids(num_rows: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (num_rows, seq_len), generator=generator)

