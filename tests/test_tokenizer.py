"""Tokenizer: parity with transformers (ids, decoding, chat templates, saved directories),
round trips, streaming decode, and clear errors."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping

import pytest
import transformers

from tessera.checkpoint.gguf import read_gguf_tokenizer
from tessera.errors import TokenizerError
from tessera.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "",
    "   leading and trailing   ",
    "naïve café — déjà vu; Ünïcödé ß ø å",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷 and skin 👍🏽",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # tabs\n\n\n    spaces\r\nwindows\n",
    "runs of    spaces\t\t\ttabs\n\n\n\nnewlines",
    "numbers 12345 3.14159 -0.5e-10 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> special tokens inline",
    "mixed: αβγ ∑∫√ ½ ¼ \u00a0nbsp \u200bzero-width",
]

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the 🐔 cross the road?"},
        {"role": "user", "content": "Why?\nTell me in 日本語."},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\n  c  "}],
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
    return read_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(hf_smollm2):
    return hf_smollm2[1]


def _ids(output) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    return list(output["input_ids"] if isinstance(output, Mapping) else output)


# ----------------------------------------------------------------------------- parity
def test_special_tokens_match_the_file(tok, hf_tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == (2,)
    assert tok.special_tokens == {k: v for k, v in hf_tok.special_tokens_map.items()
                                  if isinstance(v, str)}
    assert tok.vocab_size == len(hf_tok) == 49152


def test_backend_identical_to_transformers_gguf_converter(tok, hf_tok):
    assert tok.fingerprint == Tokenizer(hf_tok.backend_tokenizer).fingerprint


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_equal_transformers(tok, hf_tok, add_special_tokens):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == \
            hf_tok.encode(text, add_special_tokens=add_special_tokens), text
    batch = tok.encode_batch(TEXTS)
    assert batch == [tok.encode(t) for t in TEXTS]
    assert batch == hf_tok(TEXTS, add_special_tokens=False)["input_ids"]


def test_decode_round_trip_and_parity(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_tok.decode(ids)
        skipped = tok.decode(ids, skip_special_tokens=True)
        assert skipped == hf_tok.decode(ids, skip_special_tokens=True)
        assert "<|im_end|>" not in skipped


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_equals_transformers(tok, hf_tok, chat, add_generation_prompt):
    messages = CHATS[chat]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    assert ids == _ids(hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True))


TEMPLATE = """{%- for m in messages %}
    {%- if m['role'] == 'bad' %}{{ raise_exception('role bad is not allowed') }}{% endif %}
    {{ bos_token }}{{ m['role'] | upper }}: {{ m['content'] | tojson }}
{% endfor %}
{% if tools %}
  TOOLS {{ tools | tojson(indent=2) }}
{% endif %}
{%- for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}
{{- eos_token ~ (custom or 'none') }}"""


def test_custom_template_with_extras_equals_transformers(tok, hf_tok):
    """Whitespace control, tojson (no HTML escaping), loop controls, tools and extra vars."""
    custom = Tokenizer(tok.backend, chat_template=TEMPLATE, **tok.special_tokens)
    messages = [{"role": "user", "content": "<b>\"quotes\" & ünïcode</b>"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": 1}}}]
    for kwargs in ({}, {"tools": tools, "custom": "X"}):
        assert custom.apply_chat_template(messages, **kwargs) == hf_tok.apply_chat_template(
            messages, chat_template=TEMPLATE, tokenize=False, **kwargs)
    with pytest.raises(TokenizerError, match="role bad is not allowed"):
        custom.apply_chat_template([{"role": "bad", "content": ""}])


# ----------------------------------------------------------------------------- save / load
def test_save_loads_unchanged_in_transformers(tok, hf_tok, tmp_path):
    tok.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text)
        assert loaded.encode(text) == hf_tok.encode(text)
    assert loaded.special_tokens_map == hf_tok.special_tokens_map
    for messages in CHATS:
        for prompt in (False, True):
            assert loaded.apply_chat_template(messages, add_generation_prompt=prompt,
                                              tokenize=False) == \
                tok.apply_chat_template(messages, add_generation_prompt=prompt)


def test_save_from_dir_round_trip(tok, tmp_path):
    again = Tokenizer.from_dir(tok.save(tmp_path / "a"))
    assert again.fingerprint == tok.fingerprint
    assert again.chat_template == tok.chat_template
    assert again.special_tokens == tok.special_tokens
    assert (again.bos_token_id, again.eos_token_ids, again.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id)
    assert [again.encode(t, True) for t in TEXTS] == [tok.encode(t, True) for t in TEXTS]


def test_from_dir_reads_jinja_file_and_generation_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"
    assert loaded.eos_token_ids == (2, 0)


def test_from_dir_adds_tokens_declared_in_tokenizer_config(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        "49153": {"content": "<tool>", "special": False},
        "49152": {"content": "<|new|>", "special": True, "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_dir(tmp_path)
    hf_loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "a<|new|>b <tool> c"
    assert loaded.encode(text) == hf_loaded.encode(text, add_special_tokens=False)
    assert loaded.encode(text)[1] == 49152 and 49153 in loaded.encode(text)
    assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == \
        hf_loaded.decode(hf_loaded.encode(text), skip_special_tokens=True)


def test_fingerprint_changes_with_the_vocabulary(tok, tmp_path):
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["vocab"]["Ġzzzz"] = len(data["model"]["vocab"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert Tokenizer.from_dir(tmp_path).fingerprint != tok.fingerprint


# ----------------------------------------------------------------------------- streaming
def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = tok.decode_stream(skip_special_tokens=skip)
    return [decoder.step(i) for i in ids] + [decoder.flush()]


def test_incremental_decode_equals_decode_on_random_ids(tok):
    rng = random.Random(0)
    multibyte = tok.encode("".join(TEXTS[3:7]))  # ids of partial UTF-8 byte sequences
    for trial in range(40):
        pool = multibyte if trial % 2 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 120))]
        if trial % 3 == 0:  # a special token somewhere
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(17))
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_decode_holds_back_incomplete_characters(tok):
    for text in TEXTS:
        pieces = _stream(tok, tok.encode(text))
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces), text
    emoji = tok.encode("🎉")
    assert len(emoji) > 1  # one character spread over several byte tokens
    assert _stream(tok, emoji)[:-1] == [""] * (len(emoji) - 1) + ["🎉"]


# ----------------------------------------------------------------------------- errors
def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_dir(tmp_path)


def test_bad_template_and_no_template(tok):
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        Tokenizer(tok.backend, chat_template="{% for m in messages %}{{ m }")
    bare = Tokenizer(tok.backend, **tok.special_tokens)
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])


def test_special_token_outside_vocabulary(tok):
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        Tokenizer(tok.backend, eos_token="<|no_such_token|>")


def test_non_bpe_gguf_tokenizer_is_refused():
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({})
