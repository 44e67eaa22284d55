"""Output ids -> text, one token at a time, and the search for stop strings.

`IncrementalDetokenizer` needs only `tokenizer.decode(ids, skip_special_tokens=...)`. It
holds text back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) and
re-decodes the previously emitted tokens as context, so decoders that treat the first
token specially (leading-space strip) stay consistent; its pieces concatenate to
`decode(output ids)`. It knows nothing about sequences or the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # context (already emitted) + pending tokens
        self._num_emitted = 0

    def fresh(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text `token_id` completes ('' while a character is incomplete)."""
        self._ids.append(token_id)
        text = self._pending_text()
        if text is None or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._num_emitted:]  # emitted tokens become the next context
        self._num_emitted = len(self._ids)
        return text

    def _pending_text(self) -> str | None:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        context = decode(self._ids[:self._num_emitted], skip_special_tokens=skip)
        text = decode(self._ids, skip_special_tokens=skip)
        return text[len(context):] if text.startswith(context) else None


def find_stop(text: str, num_new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `num_new_chars` characters of
    `text`: (index where it starts, the stop string)."""
    if not stops or not num_new_chars:
        return None
    found = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index >= 0 and (found is None or index < found[0]):
            found = (index, stop)
    return found
