"""Fixtures for the distillation tests: a tiny corpus, tokenizer and random teacher, built
once per session, and a helper that runs the real trainer on them in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.distill.run_config import load_run_config
from tessera.distill.trainer import distill

from .helpers import REPO, tiny_overrides, train_tokenizer, write_corpus, write_teacher

TINY_YAML = REPO / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and bitwise-repeatably) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def corpus(tiny_root) -> Path:
    return write_corpus(tiny_root / "corpus")


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus)


@pytest.fixture(scope="session")
def teacher_dir(tiny_root, tokenizer) -> Path:
    return write_teacher(tiny_root / "teacher", tokenizer)


@pytest.fixture(scope="session")
def shard_dir(tiny_root) -> Path:
    return tiny_root / "shards"


@pytest.fixture
def overrides(teacher_dir, corpus, shard_dir, tmp_path):
    """`overrides(out, **extra)`: key=value strings for configs/tiny.yaml on the tiny
    teacher (extra keys use '__' for dots: trainer__max_steps=3)."""

    def make(out: Path | None = None, **extra) -> list[str]:
        extra = {k.replace("__", "."): v for k, v in extra.items()}
        return tiny_overrides(teacher_dir, corpus, shard_dir, out or tmp_path / "run", **extra)

    return make


@pytest.fixture
def run_tiny(overrides):
    """Run configs/tiny.yaml in this process; returns (report, output dir)."""

    def run(out: Path, **extra):
        config = load_run_config(TINY_YAML, overrides(out, **extra))
        return distill(config, echo=lambda _msg: None), out

    return run


def csv_losses(path: Path) -> dict[int, float]:
    import csv

    with open(path, newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def read_json(path: Path):
    return json.loads(Path(path).read_text())
