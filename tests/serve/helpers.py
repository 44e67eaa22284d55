"""Helpers for the serving tests: tiny random models, a fake character tokenizer, the
plain-generation reference, and a loop that runs an engine until it is idle."""

from __future__ import annotations

import torch

from tessera.config import ModelConfig
from tessera.generate import GenerationConfig, generate
from tessera.model.transformer import TesseraForCausalLM, build_model
from tessera.serve.engine import LLMEngine
from tessera.serve.outputs import RequestOutput
from tessera.serve.sampling_params import SamplingParams

VOCAB = 256
EOS = 1
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=128, max_seq_len=256, eos_token_ids=(EOS,),
                initializer_range=0.2)  # peaked logits: argmax ties are far apart
    return ModelConfig(**{**base, **changes})


def tiny_model(seed: int = 0, **changes) -> TesseraForCausalLM:
    torch.manual_seed(seed)
    return build_model(tiny_config(**changes)).eval()


def with_eos(model: TesseraForCausalLM, eos_token_ids: tuple[int, ...]) -> TesseraForCausalLM:
    """The same weights under a config with other EOS ids."""
    twin = build_model(model.config.replace(eos_token_ids=eos_token_ids), init=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def random_prompt(length: int, generator: torch.Generator) -> list[int]:
    return torch.randint(2, VOCAB, (length,), generator=generator).tolist()


def reference(model: TesseraForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain greedy generation: what the engine must reproduce."""
    return generate(model, prompt, GenerationConfig(max_new_tokens=max_tokens))


def run_engine(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
               ) -> dict[str, RequestOutput]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine)


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    raise AssertionError(f"the engine did not finish in {max_steps} steps")


def greedy_token_ids(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy output token ids (`GREEDY`), all prompts run together."""
    finished = run_engine(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    return [finished[str(i)].outputs[0].token_ids for i in range(len(prompts))]


def greedy_tokens_off_and_on(make_engine, option: str, is_applied
                             ) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy token ids of a few prompts from engines built with `option` False and True
    (each on a fresh model); `is_applied(model)` must tell which engine had it."""
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    outputs = []
    for enabled in (False, True):
        model = tiny_model(seed=7)
        engine = make_engine(model, **{option: enabled})
        assert is_applied(model) is enabled
        outputs.append(greedy_token_ids(engine, prompts))
    return outputs[0], outputs[1]


class FakeTokenizer:
    """Token id i is the character chr(ord('a') + i % 26); the EOS id is special."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if (i == EOS and skip_special_tokens) else chr(97 + i % 26)
                       for i in ids)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 + 26 for c in text]
