"""`Tokenizer`: a Hugging Face `tokenizers` tokenizer plus its special tokens and chat template.

It is built from an HF tokenizer directory (`tokenizer.json`, `tokenizer_config.json`,
optionally `chat_template.jinja` and `generation_config.json`) or from the tokenizer metadata
of a GGUF file (byte-level BPE, built the way transformers' GGUF converter builds it, so the
ids are the same). It encodes, decodes, streams decoded text one token at a time
(`IncrementalDecoder`), renders chat templates exactly as transformers does, and saves a
directory that `transformers.AutoTokenizer.from_pretrained` loads unchanged.

It knows nothing about models, weights or devices; `fingerprint` identifies the text -> ids
mapping for data shard manifests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from tessera.errors import TokenizerError

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of the GGUF `tokenizer.ggml.pre` types that do not use GPT-2's own regex;
# the same table transformers' GGUF converter uses. Other types get ByteLevel's GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 extra_eos_ids: Sequence[int] = (), add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None):
        self.backend = backend
        self._special = {"bos_token": bos_token, "eos_token": eos_token,
                         "unk_token": unk_token, "pad_token": pad_token}
        for name, token in self._special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(
                    f"{name} {token!r} is not in the vocabulary; fix it in tokenizer_config.json"
                )
        self._extra_eos_ids = tuple(int(i) for i in extra_eos_ids)
        self._add_flags = {"add_bos_token": add_bos_token, "add_eos_token": add_eos_token}
        self._chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{path} has no tokenizer.json; save the tokenizer there in Hugging Face "
                "format (tokenizer.save_pretrained) or point at the model's directory"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{tokenizer_file} cannot be read: {exc}") from None
        config = _read_json(path / "tokenizer_config.json")
        _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, path)
        special_map = _read_json(path / "special_tokens_map.json")
        tokens = {name: _token_str(config.get(name, special_map.get(name)))
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template_file = path / "chat_template.jinja"
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else _pick_template(config.get("chat_template")))
        generation = _read_json(path / "generation_config.json")
        extra_eos = _as_ids(generation.get("eos_token_id"))
        return cls(backend, chat_template=template, extra_eos_ids=extra_eos,
                   add_bos_token=config.get("add_bos_token"),
                   add_eos_token=config.get("add_eos_token"), **tokens)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata (byte-level BPE, `gpt2` model)."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("the GGUF file has no tokenizer (no tokenizer.ggml.model key)")
        if model != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {model!r} is not supported; Tessera builds byte-level "
                "BPE ('gpt2') tokenizers. Load the model from an HF directory instead"
            )
        tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
        types = list(metadata.get("tokenizer.ggml.token_type") or [])
        merges = metadata.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError(
                "the GGUF byte-level tokenizer lacks tokenizer.ggml.tokens or .merges; "
                "convert the model again with llama.cpp's convert_hf_to_gguf.py"
            )
        backend = _byte_level_backend(tokens, types, merges, metadata.get("tokenizer.ggml.pre"))

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return backend.id_to_token(index) if index is not None else None

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        bos, eos = token("bos_token_id"), token("eos_token_id")
        backend.post_processor = _template_processor(backend, bos if add_bos else None,
                                                     eos if add_eos else None)
        # llama.cpp also stops on the end-of-turn / end-of-message tokens when a file names them.
        extra_eos = [metadata[f"tokenizer.ggml.{key}"] for key in ("eot_token_id", "eom_token_id")
                     if metadata.get(f"tokenizer.ggml.{key}") is not None]
        return cls(backend, chat_template=metadata.get("tokenizer.chat_template"),
                   bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                   unk_token=token("unknown_token_id"), extra_eos_ids=extra_eos,
                   add_bos_token=add_bos, add_eos_token=add_eos)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The eos id followed by any extra stop ids the files name, without duplicates."""
        ids = ([] if self.eos_token_id is None else [self.eos_token_id]) + list(self._extra_eos_ids)
        return tuple(dict.fromkeys(ids))

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<|im_start|>", ...}."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of the canonical tokenizer JSON: equal fingerprints give equal ids.

        NOTE: computed once; the backend is not to be modified after construction.
        """
        data = json.loads(self.backend.to_str())
        data.pop("truncation", None)
        data.pop("padding", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self.backend.token_to_id(token)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False,
                     ) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the batch over threads."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            **extra: Any) -> str | list[int]:
        """Render `messages` with the chat template, as transformers' method of the same name.

        The template sees `messages`, `add_generation_prompt`, `tools`/`documents` (None
        unless given), the special token strings (`bos_token`, `eos_token`, ...) and `extra`.
        With `tokenize=True` the rendered text is encoded without adding special tokens.
        """
        if self._template is None:
            raise TokenizerError(
                "this tokenizer has no chat template; use a chat/instruct model or set "
                "chat_template in tokenizer_config.json"
            )
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            text = self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"the chat template rejected these messages: {exc}") from None
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ save
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False, **self.special_tokens}
        config.update({k: v for k, v in self._add_flags.items() if v is not None})
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", self.special_tokens)
        return directory

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_ids}, pad={self.pad_token_id}, "
                f"chat_template={self._chat_template is not None})")


class IncrementalDecoder:
    """Streaming detokenizer: `step(id)` returns the text that id completes.

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD), and a
    few already-emitted tokens are re-decoded as context so that decoders which treat the
    first token specially (leading-space strip) stay consistent. The pieces returned by
    `step` followed by `flush()` concatenate to `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # context tokens (already emitted) + unemitted tokens
        self._num_read = 0  # how many of self._ids are already emitted

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        new_text = self._pending_text()
        if new_text is None or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its remaining bytes
        # The emitted tokens become the context of the next step; older ones are dropped.
        self._ids = self._ids[self._num_read:]
        self._num_read = len(self._ids)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence decodes as U+FFFD)."""
        new_text = self._pending_text() or ""
        self._ids, self._num_read = [], 0
        return new_text

    def _pending_text(self) -> str | None:
        decode = self._tokenizer.decode
        context = decode(self._ids[:self._num_read], skip_special_tokens=self._skip)
        text = decode(self._ids, skip_special_tokens=self._skip)
        return text[len(context):] if text.startswith(context) else None


# ---------------------------------------------------------------------- GGUF byte-level BPE
@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_backend(tokens: list[str], types: list[int], merges: Sequence[str],
                        pre: str | None) -> tokenizers.Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens a converter wrote as raw UTF-8 are respelled in the byte alphabet.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    bpe = models.BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False, byte_fallback=False)
    backend = tokenizers.Tokenizer(bpe)
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>, ...) stay whole and are special; a control token spelled
    # outside the byte alphabet is a converter mislabel and is left alone.
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and set(token) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(spelled, types, strict=False) if kind == _USER_DEFINED
    ])
    return backend


def _add_declared_tokens(backend: tokenizers.Tokenizer, declared: Mapping[str, Any],
                         path: Path) -> None:
    """Add tokenizer_config.json's `added_tokens_decoder` entries tokenizer.json lacks, at the
    ids they declare (as transformers does)."""
    for token_id, spec in sorted(declared.items(), key=lambda item: int(item[0])):
        content, special = spec.get("content"), bool(spec.get("special", False))
        if content is None or backend.token_to_id(content) is not None:
            continue
        if int(token_id) != backend.get_vocab_size(with_added_tokens=True):
            raise TokenizerError(
                f"{path}/tokenizer_config.json declares {content!r} at id {token_id}, which "
                "tokenizer.json neither has nor can append; the tokenizer files disagree"
            )
        token = AddedToken(content, single_word=spec.get("single_word", False),
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           normalized=spec.get("normalized", False), special=special)
        add = backend.add_special_tokens if special else backend.add_tokens
        add([token])


def _template_processor(backend: tokenizers.Tokenizer, bos: str | None,
                        eos: str | None) -> processors.TemplateProcessing:
    """The post-processor transformers builds from the add_bos/add_eos flags."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1",
                     *([f"{eos}:1"] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------------- chat templates
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' assistant-mask markers, which
    render their body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message}); "
            "fix chat_template in the tokenizer files"
        ) from None


def _pick_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} with a "default"."""
    if value is None or isinstance(value, str):
        return value
    named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
    if "default" not in named:
        raise TokenizerError(
            f"tokenizer_config.json has named chat templates {sorted(map(str, named))} but "
            "none called 'default'"
        )
    return named["default"]


# ---------------------------------------------------------------------- small helpers
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)
