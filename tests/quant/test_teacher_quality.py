"""Perplexity budgets of each method on the real SmolLM2-135M-Instruct teacher.

A reduced version of the table in docs/quantization.md: the first 512 tokens of the
python-stdlib validation split (one window), and AWQ calibrated on 512 train tokens with a
coarser search (6 alphas, 128 rows per input), so that it takes about a minute of CPU time.
The budgets are the documented ones: int8 within +2% of fp32 perplexity, FP8 (per channel,
dynamic activations) within +3%, AWQ int4 (groups <= 128) within +25% and at least 5
percentage points better than round-to-nearest int4 with the same groups.
"""

from __future__ import annotations

import copy

import pytest

from tessera.quant import quantize_model
from tessera.quant.calibration import perplexity, token_windows

pytestmark = pytest.mark.slow

EVAL_TOKENS, SEQ_LEN = 512, 512
AWQ_FAST = {"calibration_tokens": 512, "max_samples": 128, "num_grid": 5}
BUDGETS = {"int8": 0.02, "fp8": 0.03, "awq": 0.25}


@pytest.fixture(scope="module")
def held_out(smollm2):
    return token_windows(smollm2.tokenizer, split="val", num_tokens=EVAL_TOKENS,
                         seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, held_out):
    return perplexity(smollm2.model, held_out)


def change(smollm2, held_out, fp32_ppl, method, **options) -> float:
    model = quantize_model(copy.deepcopy(smollm2.model), method,
                           tokenizer=smollm2.tokenizer, **options)
    return perplexity(model, held_out) / fp32_ppl - 1


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_eight_bit_methods_stay_within_budget(smollm2, held_out, fp32_ppl, method):
    budget = BUDGETS[method]
    assert -budget < change(smollm2, held_out, fp32_ppl, method) < budget


def test_awq_int4_stays_within_budget_and_beats_round_to_nearest(smollm2, held_out,
                                                                  fp32_ppl):
    awq = change(smollm2, held_out, fp32_ppl, "awq", bits=4, group_size=128, **AWQ_FAST)
    rtn = change(smollm2, held_out, fp32_ppl, "int4", group_size=128)
    assert 0 < awq < BUDGETS["awq"]
    assert awq < rtn - 0.05
