"""Quantization tests: skip `gpu`-marked tests without CUDA (the teacher fixture `smollm2`
comes from tests/conftest.py; the tiny model from helpers.py)."""

from __future__ import annotations

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
