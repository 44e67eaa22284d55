"""`LLM`: offline batch generation on top of `LLMEngine`.

    llm = LLM("smollm2-135m-instruct")               # or a TesseraForCausalLM (+ tokenizer)
    results = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))
    results[0].text, results[0].token_ids, results[0].outputs   # outputs: the n completions

A model given as a string is loaded with `tessera.load` (its tokenizer comes with it).
Prompts are strings (encoded with the tokenizer, no special tokens added) or token-id
lists. Keyword arguments other than `draft_model`, `dtype` and `device` build the
`EngineConfig`. A prompt the engine refuses (too long) raises `RequestError` before
anything runs. This module knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import RequestError
from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine
from tessera.serve.outputs import CompletionOutput, RequestOutput
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import TokenLogprobs

Prompt = str | Seq[int]


@dataclass
class CompletionResult:
    prompt_ids: list[int]
    outputs: list[CompletionOutput]  # the n completions, by index
    has_text: bool  # False without a tokenizer: `text` is None

    @property
    def text(self) -> str | None:
        return self.outputs[0].text if self.has_text else None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs


class LLM:
    def __init__(self, model: TesseraForCausalLM | str | Path, tokenizer: Any = None, *,
                 draft_model: TesseraForCausalLM | str | Path | None = None,
                 dtype: Any = None, device: Any = None, **engine_args: Any):
        model, tokenizer = _resolve(model, tokenizer, dtype, device)
        if draft_model is not None:
            draft_model, _ = _resolve(draft_model, None, dtype, device)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, config=EngineConfig(**engine_args),
                                draft_model=draft_model)
        self._next_id = 0

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[CompletionResult]:
        """Run every prompt to completion; results in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompt_list))
        encoded = [self._encode(p) for p in prompt_list]
        for i, (ids, p) in enumerate(zip(encoded, params_list, strict=True)):
            refusal = self.engine.refusal_reason(ids, p)
            if refusal is not None:
                raise RequestError(f"prompt {i}: {refusal}")
        request_ids = [self._add(ids, p) for ids, p in zip(encoded, params_list, strict=True)]
        final = self._run_until_done(set(request_ids))
        return [self._result(final[r]) for r in request_ids]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("string prompts need a tokenizer; pass token ids or a "
                                   "tokenizer")
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def _add(self, prompt_ids: list[int], params: SamplingParams) -> str:
        request_id = f"llm-{self._next_id}"
        self._next_id += 1
        # Only finished outputs are read here: no per-step snapshots.
        self.engine.add_request(request_id, prompt_ids, params.replace(output_kind="final_only"))
        return request_id

    def _run_until_done(self, request_ids: set[str]) -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while len(final) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
        return final

    def _result(self, output: RequestOutput) -> CompletionResult:
        if output.error is not None:
            raise RequestError(output.error)
        return CompletionResult(output.prompt_ids, output.outputs, self.tokenizer is not None)


def _resolve(model: Any, tokenizer: Any, dtype: Any, device: Any) -> tuple[Any, Any]:
    if isinstance(model, (str, Path)):
        from tessera.checkpoint.loader import load  # lazy: loading pulls in checkpoint code

        loaded = load(model, dtype=dtype, device=device)
        return loaded.model, tokenizer if tokenizer is not None else loaded.tokenizer
    return model, tokenizer


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


def _as_params_list(params: SamplingParams | Seq[SamplingParams] | None,
                    num_prompts: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise RequestError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    return params
