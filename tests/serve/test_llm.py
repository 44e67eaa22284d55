"""The offline `LLM` API: token-id and string prompts, text, n > 1, refusals."""

from __future__ import annotations

import pytest
import torch

import tessera
from tessera.errors import RequestError
from tessera.serve.llm import LLM
from tessera.serve.sampling_params import SamplingParams

from .helpers import GREEDY, FakeTokenizer, random_prompt, reference


def test_token_id_prompts_in_order(model):
    gen = torch.Generator().manual_seed(40)
    prompts = [random_prompt(n, gen) for n in (4, 17, 9)]
    llm = LLM(model, block_size=4)
    results = llm.generate(prompts, GREEDY.replace(max_tokens=9))
    assert [r.token_ids for r in results] == [reference(model, p, 9) for p in prompts]
    assert all(r.text is None for r in results)
    assert [r.prompt_ids for r in results] == prompts
    single = llm.generate(prompts[1], GREEDY.replace(max_tokens=9))
    assert len(single) == 1 and single[0].token_ids == results[1].token_ids
    assert llm.engine.block_manager.is_idle_clean()


def test_string_prompts_with_a_tokenizer(model):
    tokenizer = FakeTokenizer()
    llm = LLM(model, tokenizer, block_size=4)
    params = [GREEDY.replace(max_tokens=6), SamplingParams(n=2, max_tokens=5, seed=1)]
    first, second = llm.generate(["hello", "abc"], params)
    assert first.token_ids == reference(model, tokenizer.encode("hello"), 6)
    assert first.text == tokenizer.decode(first.token_ids, skip_special_tokens=True)
    assert len(second.outputs) == 2 and second.finish_reason in ("stop", "length")
    assert all(o.text == tokenizer.decode(o.token_ids, skip_special_tokens=True)
               for o in second.outputs)


def test_refusals_raise_before_anything_runs(model):
    llm = LLM(model, block_size=4)
    with pytest.raises(RequestError, match="tokenizer"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(RequestError, match="prompt 1: prompt too long"):
        llm.generate([[3, 4], list(range(2, 258))], GREEDY)
    with pytest.raises(RequestError, match="2 SamplingParams for 1"):
        llm.generate([[3, 4]], [GREEDY, GREEDY])
    assert not llm.engine.has_unfinished()


def test_top_level_names():
    assert tessera.LLM is LLM and tessera.SamplingParams is SamplingParams


@pytest.mark.slow
def test_real_model_and_tokenizer(smollm2):
    """SmolLM2-135M-Instruct with its own tokenizer: greedy parity, text, a stop string."""
    llm = LLM(smollm2.model, smollm2.tokenizer, block_size=16)
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    free, counting = llm.generate(prompts, GREEDY.replace(max_tokens=10))
    for prompt, result in zip(prompts, (free, counting), strict=True):
        ids = smollm2.tokenizer.encode(prompt)
        assert result.token_ids == reference(smollm2.model, ids, 10)
        assert result.text == smollm2.tokenizer.decode(result.token_ids,
                                                       skip_special_tokens=True)
    assert "Paris" in free.text
    stop = free.text.strip()[:3]  # cut inside the first word
    [stopped] = llm.generate(prompts[0], GREEDY.replace(max_tokens=10, stop=[stop]))
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
