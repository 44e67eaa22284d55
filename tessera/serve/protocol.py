"""The OpenAI wire format: request models with validation, response and chunk shapes.

Requests are parsed strictly (`model_validate_json`): a wrong type, an out-of-range value
or an unknown field raises `ProtocolError` with OpenAI's error fields (message, param), so
the server can answer 400 saying what was wrong. `null` means "the default" for every
optional field, as in OpenAI's API. Extras beyond OpenAI's fields follow vLLM's names
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`).

Responses are built from the engine's `RequestOutput`s by pure functions: whole responses
(`completion_response`, `chat_response`) and streaming chunks (`CompletionStreamer`,
`ChatStreamer`, which diff cumulative outputs). Choice `index` is
`prompt index * n + completion index`. Token strings for logprobs come from a
`token_text(id)` callable. This module knows nothing about HTTP, the engine's thread or
tokenizer internals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tessera.errors import RequestError
from tessera.serve.outputs import CompletionOutput, RequestOutput
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import TokenLogprobs

MAX_LOGPROBS = 20  # top logprobs per position, as vLLM's default max_logprobs
MIN_LOGPROB = -9999.0  # JSON has no -inf
TokenText = Callable[[int], str]


class ProtocolError(RequestError):
    """A request that does not follow the API; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of them")
        return tuple(stops)

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo
                              ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return value

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams with OpenAI's defaults for the fields left out."""
        fields = {
            "temperature": self.temperature, "top_p": self.top_p, "n": self.n,
            "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos, "skip_special_tokens": self.skip_special_tokens,
            "top_k": max(self.top_k, 0) if self.top_k is not None else None,  # -1: off
            "stop_token_ids": tuple(self.stop_token_ids or ()),
        }
        given = {k: v for k, v in fields.items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, stop=self.stop, logprobs=logprobs,
                              **given)


class CompletionRequest(_SamplingRequest):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str | list[int]]:
        """One or more prompts: a string, a list of strings, token ids or lists of them."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(_is_token_id(t) for t in value):
                return [value]
            if all(isinstance(p, str) for p in value):
                return value
            if all(isinstance(p, list) and p and all(map(_is_token_id, p)) for p in value):
                return value
        raise ValueError("must be a string, a non-empty list of strings, a list of token "
                         "ids, or a list of token-id lists")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str:
        """A string, or a list of text parts joined into one."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list) and all(_is_text_part(p) for p in value):
            return "".join(part["text"] for part in value)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} '
                         'parts (this server reads text only)')

    def for_template(self) -> dict[str, str]:
        """The message as a chat template reads it ("developer" is what older templates
        call "system")."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


def _is_text_part(part: Any) -> bool:
    return (isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) and set(part) <= {"type", "text"})


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body; a `ProtocolError` says which field was wrong and why."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _protocol_error(exc) from None


def _protocol_error(exc: ValidationError) -> ProtocolError:
    error = exc.errors(include_url=False)[0]
    kind, param = error["type"], _param_name(error["loc"])
    if kind == "json_invalid":
        return ProtocolError(f"the request body is not valid JSON: {error['ctx']['error']}")
    if kind == "model_type" and not error["loc"]:
        return ProtocolError("the request body must be a JSON object")
    if kind == "missing":
        return ProtocolError(f"{param} is required", param)
    if kind == "extra_forbidden":
        return ProtocolError(f"unknown field {param!r}: this server does not support it",
                             param)
    message = error["msg"].removeprefix("Value error, ")
    shown = repr(error["input"])
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ProtocolError(f"{param}: {message} (got {shown})", param)


def _param_name(loc: Sequence[str | int]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


# ---------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """What the served model and engine allow."""

    max_model_len: int
    vocab_size: int
    max_n: int  # the engine's max_num_seqs: a larger n could never be scheduled


def check_prompt(prompt_ids: Sequence[int], limits: Limits, *, index: int | None = None
                 ) -> None:
    where = "prompt" if index is None else f"prompt[{index}]"
    if not prompt_ids:
        raise ProtocolError(f"{where} is empty; give at least one token", "prompt")
    bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ProtocolError(f"{where} has token ids outside [0, {limits.vocab_size}): "
                            f"{bad[:5]}", "prompt")
    if len(prompt_ids) >= limits.max_model_len:
        raise ProtocolError(
            f"{where} has {len(prompt_ids)} tokens, which leaves no room to generate within "
            f"the model's context of {limits.max_model_len} tokens; shorten it", "prompt")


def resolve_max_tokens(requested: int | None, num_prompt: int, limits: Limits, *,
                       default: int | None) -> int:
    """max_tokens for a prompt: the request's (which must fit the context), else
    `default` capped by the context, else all of the remaining context."""
    room = limits.max_model_len - num_prompt
    if requested is not None and requested > room:
        raise ProtocolError(
            f"this model's context is {limits.max_model_len} tokens; the prompt has "
            f"{num_prompt} and max_tokens asks for {requested} more. Lower max_tokens to "
            f"at most {room} or shorten the prompt", "max_tokens")
    if requested is not None:
        return requested
    return room if default is None else min(default, room)


def check_n(n: int | None, limits: Limits) -> None:
    if n is not None and n > limits.max_n:
        raise ProtocolError(f"n is {n} but this server runs at most {limits.max_n} "
                            "sequences at once", "n")


# ---------------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole response, or (the same object type in OpenAI's API) one stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobEntry(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobEntry]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": ..., "content": ...}, {"content": ...} or {}
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tessera"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def usage(outputs: Sequence[RequestOutput]) -> UsageInfo:
    num_prompt = sum(len(o.prompt_ids) for o in outputs)
    num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                     total_tokens=num_prompt + num_completion)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def completion_logprobs(entries: Sequence[TokenLogprobs], token_text: TokenText,
                        start_offset: int = 0) -> CompletionLogprobs:
    tokens = [token_text(e.token_id) for e in entries]
    offsets = [start_offset]
    for text in tokens[:-1]:
        offsets.append(offsets[-1] + len(text))
    return CompletionLogprobs(
        text_offset=offsets[:len(tokens)], tokens=tokens,
        token_logprobs=[_logprob(e.logprob) for e in entries],
        top_logprobs=[{token_text(t): _logprob(lp) for t, lp in reversed(e.top)}
                      for e in entries],  # reversed: the likelier wins a text collision
    )


def chat_logprobs(entries: Sequence[TokenLogprobs], token_text: TokenText
                  ) -> ChatChoiceLogprobs:
    def one(token_id: int, value: float) -> ChatLogprob:
        text = token_text(token_id)
        return ChatLogprob(token=text, logprob=_logprob(value), bytes=list(text.encode()))

    return ChatChoiceLogprobs(content=[
        ChatLogprobEntry(**one(e.token_id, e.logprob).model_dump(),
                         top_logprobs=[one(t, lp) for t, lp in e.top])
        for e in entries
    ])


def _choices(outputs: Sequence[RequestOutput]) -> list[tuple[int, CompletionOutput]]:
    """(choice index, completion) over every prompt's n completions, in index order."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        n = len(output.outputs)
        choices += [(prompt_index * n + c.index, c) for c in output.outputs]
    return choices


def completion_response(request_id: str, model: str, outputs: Sequence[RequestOutput],
                        token_text: TokenText) -> CompletionResponse:
    choices = [
        CompletionChoice(index=index, text=c.text, finish_reason=c.finish_reason,
                         logprobs=(completion_logprobs(c.logprobs, token_text)
                                   if c.logprobs is not None else None))
        for index, c in _choices(outputs)
    ]
    return CompletionResponse(id=request_id, created=int(time.time()), model=model,
                              choices=choices, usage=usage(outputs))


def chat_response(request_id: str, model: str, output: RequestOutput,
                  token_text: TokenText) -> ChatCompletionResponse:
    choices = [
        ChatChoice(index=index, message=AssistantMessage(content=c.text),
                   finish_reason=c.finish_reason,
                   logprobs=(chat_logprobs(c.logprobs, token_text)
                             if c.logprobs is not None else None))
        for index, c in _choices([output])
    ]
    return ChatCompletionResponse(id=request_id, created=int(time.time()), model=model,
                                  choices=choices, usage=usage([output]))


# ---------------------------------------------------------------------- streaming
@dataclass
class _Sent:
    """What one choice has streamed so far."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    is_started: bool = False
    is_done: bool = False


class _Streamer:
    """Turns successive cumulative outputs into chunks of what is new."""

    def __init__(self, request_id: str, model: str, token_text: TokenText, *,
                 include_usage: bool):
        self.request_id, self.model, self.token_text = request_id, model, token_text
        self.include_usage = include_usage
        self.created = int(time.time())
        self._sent: dict[int, _Sent] = {}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[str]:
        """SSE `data:` lines (JSON) for what is new in `output`."""
        chunks = []
        for index, c in _choices([output]):
            index += prompt_index * len(output.outputs)
            sent = self._sent.setdefault(index, _Sent())
            if not sent.is_done:
                chunks += self._choice_chunks(index, c, sent)
        return chunks

    def _choice_chunks(self, index: int, c: CompletionOutput, sent: _Sent) -> list[str]:
        new_text = c.text[sent.num_chars:]
        new_logprobs = c.logprobs[sent.num_tokens:] if c.logprobs is not None else None
        chunks = []
        if not sent.is_started:
            chunks += self._start(index)
            sent.is_started = True
        if new_text or new_logprobs:
            chunks.append(self._delta(index, new_text, new_logprobs, sent))
        sent.num_chars, sent.num_tokens = len(c.text), len(c.token_ids)
        if c.is_finished:
            chunks.append(self._finish(index, c.finish_reason))
            sent.is_done = True
        return chunks

    def usage_chunk(self, outputs: Sequence[RequestOutput]) -> str:
        raise NotImplementedError

    def _start(self, index: int) -> list[str]:
        return []

    def _delta(self, index: int, text: str, logprobs: Sequence[TokenLogprobs] | None,
               sent: _Sent) -> str:
        raise NotImplementedError

    def _finish(self, index: int, reason: str | None) -> str:
        raise NotImplementedError

    def _dump(self, chunk: BaseModel) -> str:
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})


class CompletionStreamer(_Streamer):
    def _chunk(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices)

    def _delta(self, index: int, text: str, logprobs: Sequence[TokenLogprobs] | None,
               sent: _Sent) -> str:
        lp = None
        if logprobs is not None:
            lp = completion_logprobs(logprobs, self.token_text, sent.text_offset)
            sent.text_offset += sum(len(t) for t in lp.tokens)
        return self._dump(self._chunk([CompletionChoice(index=index, text=text, logprobs=lp)]))

    def _finish(self, index: int, reason: str | None) -> str:
        choice = CompletionChoice(index=index, text="", finish_reason=reason)
        return self._dump(self._chunk([choice]))

    def usage_chunk(self, outputs: Sequence[RequestOutput]) -> str:
        chunk = self._chunk([])
        chunk.usage = usage(outputs)
        return chunk.model_dump_json()


class ChatStreamer(_Streamer):
    def _chunk(self, choice: ChatChunkChoice) -> str:
        return self._dump(ChatCompletionChunk(id=self.request_id, created=self.created,
                                              model=self.model, choices=[choice]))

    def _start(self, index: int) -> list[str]:
        return [self._chunk(ChatChunkChoice(index=index,
                                            delta={"role": "assistant", "content": ""}))]

    def _delta(self, index: int, text: str, logprobs: Sequence[TokenLogprobs] | None,
               sent: _Sent) -> str:
        lp = chat_logprobs(logprobs, self.token_text) if logprobs is not None else None
        return self._chunk(ChatChunkChoice(index=index, delta={"content": text}, logprobs=lp))

    def _finish(self, index: int, reason: str | None) -> str:
        return self._chunk(ChatChunkChoice(index=index, delta={}, finish_reason=reason))

    def usage_chunk(self, outputs: Sequence[RequestOutput]) -> str:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=usage(outputs)).model_dump_json()
