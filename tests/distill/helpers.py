"""Tiny, deterministic stand-ins for the real thing: a corpus of generated documents, a
byte-level BPE tokenizer trained on it (with special tokens and a chat template), and a
random 4-layer teacher saved as an HF directory. Everything the distillation tests run is
the real code path on these."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

import tessera
from tessera.checkpoint.loader import LoadedModel
from tessera.config import ModelConfig
from tessera.model import build_model
from tessera.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ("def return class import self value list dict index count total token layer "
         "model teacher student batch step loss print while for in if else None True").split()


def write_corpus(directory: Path, num_docs: int = 48, seed: int = 0) -> Path:
    """`num_docs` small Python-like text files with a learnable structure."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        lines = []
        for _ in range(rng.randint(12, 30)):
            name = rng.choice(WORDS)
            args = ", ".join(rng.sample(WORDS, rng.randint(1, 3)))
            lines.append(f"def {name}_{rng.randint(0, 9)}({args}):\n    return {name} + 1")
        (directory / f"doc_{i:03d}.py").write_text("\n".join(lines) + "\n")
    return directory


def train_tokenizer(corpus: Path, vocab_size: int = 320) -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train([str(p) for p in sorted(corpus.glob("*.py"))], trainer)
    return Tokenizer(backend, chat_template=CHAT_TEMPLATE, bos_token="<|im_start|>",
                     eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def teacher_config(tokenizer: Tokenizer, **changes) -> ModelConfig:
    base = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                num_kv_heads=2, intermediate_size=128, tie_word_embeddings=True,
                max_seq_len=512, initializer_range=0.08,
                bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
                pad_token_id=tokenizer.pad_token_id)
    return ModelConfig(**(base | changes))


def write_teacher(directory: Path, tokenizer: Tokenizer, seed: int = 0, **changes) -> Path:
    """A random teacher (weights drawn from `seed`) as an HF directory with tokenizer."""
    config = teacher_config(tokenizer, **changes)
    torch.manual_seed(seed)
    model = build_model(config)
    tessera.save(LoadedModel(model, tokenizer, config, "tiny-random"), directory)
    return directory


def tiny_overrides(teacher: Path, corpus: Path, shards: Path, out: Path, **extra) -> list[str]:
    """`key=value` overrides that point configs/tiny.yaml at the tiny teacher and corpus."""
    items = {"teacher": str(teacher), "data.corpus": json.dumps([str(corpus)]),
             "data.shard_dir": str(shards), "output_dir": str(out)} | extra
    return [f"{k}={v}" for k, v in items.items()]


def tessera_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tessera.cli", *args]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Child processes: the repo on the path, a fixed thread count (bitwise-stable CPU
    math between runs needs the same number of threads)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    env["TESSERA_CACHE"] = env.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera"))
    return env


def run_tessera(*args: str, timeout: float = 300, threads: int = 1
                ) -> subprocess.CompletedProcess:
    return subprocess.run(tessera_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=subprocess_env(threads))
