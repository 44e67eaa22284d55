"""Data pipeline: corpus sources, split, token shards, packing and the sampler."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tessera.data import (
    STDLIB,
    Document,
    PackedSequences,
    SequenceSampler,
    TokenShards,
    build_shards,
    iter_documents,
    load_documents,
    pack_rows,
    split_documents,
    split_of,
    stdlib_files,
    token_dtype,
)
from tessera.errors import ConfigError, DataError

EOS = "<eos>"


class BPETokenizer:
    """The four attributes the shard builder needs, over a real `tokenizers` BPE."""

    def __init__(self, backend: Tokenizer, *, vocab_size: int | None = None, salt: str = ""):
        self.backend = backend
        self.eos_token_id = backend.token_to_id(EOS)
        self.vocab_size = vocab_size or backend.get_vocab_size()
        self.fingerprint = hashlib.sha256((backend.to_str() + salt).encode()).hexdigest()
        self.num_calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.num_calls += 1
        return [e.ids for e in self.backend.encode_batch(texts)]

    def expected_stream(self, texts: list[str]) -> list[int]:
        """Tokens one document at a time (not batched), each followed by EOS."""
        return [t for text in texts for t in self.backend.encode(text).ids + [self.eos_token_id]]


def _stdlib_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    files = stdlib_files()
    picks = rng.choice(len(files), size=count, replace=False)
    texts = []
    for i in sorted(picks):
        text = files[i].read_text(encoding="utf-8", errors="replace")
        texts.append(text[: int(rng.integers(40, 1500))] or "x")
    return texts


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_stdlib_texts(40, seed=1), trainer)
    return tok


@pytest.fixture
def tokenizer(backend) -> BPETokenizer:
    return BPETokenizer(backend)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A directory of real text documents, two levels deep."""
    root = tmp_path / "corpus"
    for i, text in enumerate(_stdlib_texts(24, seed=2)):
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _texts(source) -> list[str]:
    return [d.text for d in iter_documents(str(source))]


# --------------------------------------------------------------------------- corpus
def test_directory_glob_and_jsonl_sources(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta")
    (tmp_path / "b" / "a.txt").write_text("alpha")
    (tmp_path / "b" / "blank.txt").write_text("  \n")
    (tmp_path / "top.md").write_text("top")
    records = [{"body": "one", "text": "uno"}, {"body": "two", "text": "dos"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")

    assert _texts(tmp_path / "b") == ["alpha", "zeta"]  # sorted, blank skipped
    assert [d.text for d in iter_documents(f"{tmp_path}/**/*.txt")] == ["alpha", "zeta"]
    assert _texts(f"{jsonl}:body") == ["one", "two"]
    assert _texts(jsonl) == ["uno", "dos"]  # default field "text"
    docs = load_documents([str(tmp_path / "top.md"), f"{jsonl}:body"])
    assert [d.text for d in docs] == ["top", "one", "two"]
    assert len({d.doc_id for d in docs}) == 3


def test_bad_and_empty_sources_raise_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("\n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    for sources, message in ((str(tmp_path / "empty"), "matches no files"),
                             (str(tmp_path / "nope.txt"), "matches no files"),
                             (str(tmp_path / "blank"), "no non-empty documents"),
                             ([], "no corpus sources"),
                             (str(bad), "bad.jsonl:2 has no string field 'text'"),
                             (str(broken), "not valid JSON")):
        with pytest.raises(DataError, match=message):
            load_documents(sources)


def _synthetic_docs(count: int) -> list[Document]:
    return [Document(f"doc-{i}", f"document number {i} " * (1 + i % 5)) for i in range(count)]


def test_split_is_deterministic_disjoint_and_sized():
    docs = _synthetic_docs(4000)
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.doc_id for d in val} == {d.doc_id for d in val2}  # order does not matter
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    assert len(train) + len(val) == len(docs)
    assert abs(len(val) - 400) < 4 * (4000 * 0.1 * 0.9) ** 0.5  # binomial, 4 sigma
    # The split follows the text, not the id: a renamed copy lands in the same split.
    assert all(split_of(Document("renamed", d.text), 0.1) == "val" for d in val)
    # Growing val_fraction only moves documents from train to val.
    assert {d.doc_id for d in val} <= {d.doc_id for d in split_documents(docs, 0.3)[1]}
    assert split_documents(docs, 0.0)[1] == [] and split_documents(docs, 1.0)[0] == []


def test_split_is_the_same_in_a_fresh_interpreter():
    docs = _synthetic_docs(300)
    here = [split_of(d, 0.25) for d in docs]
    code = ("from tessera.data import Document, split_of\n"
            "print(''.join(split_of(Document(f'doc-{i}', f'document number {i} ' * (1 + i % 5)),"
            " 0.25)[0] for i in range(300)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1]).stdout.strip()
    assert out == "".join(s[0] for s in here)


def test_stdlib_corpus_is_non_empty_and_deterministic():
    files = stdlib_files()
    assert len(files) > 100
    assert files == stdlib_files()
    assert all(p.suffix == ".py" for p in files)
    assert not any({"site-packages", "test", "tests"} & set(p.parts) for p in files)
    docs = []
    for doc in iter_documents(STDLIB):
        docs.append(doc)
        if len(docs) == 20:
            break
    assert all(d.doc_id.startswith(f"{STDLIB}:") and d.text.strip() for d in docs)
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids)


# --------------------------------------------------------------------------- shards
def test_shard_round_trip(corpus, tokenizer, tmp_path):
    out = tmp_path / "shards"
    shards = build_shards(str(corpus), tokenizer, out, max_shard_tokens=2000,
                          docs_per_batch=5)
    expected = tokenizer.expected_stream(_texts(corpus))
    assert len(shards.shards) > 2  # the stream crosses several shard files
    assert all(s.num_tokens >= 2000 for s in shards.shards[:-1])  # closed once full ...
    assert sum(s.num_documents for s in shards.shards) == 24  # ... of whole documents
    assert all(shards.shard(i)[-1] == tokenizer.eos_token_id for i in range(len(shards.shards)))
    assert shards.num_tokens == len(expected) and shards.num_documents == 24
    assert shards.read(0, shards.num_tokens).tolist() == expected
    assert shards.read(1990, 4100).tolist() == expected[1990:4100]
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest["dtype"] == "uint16"
    assert manifest["key"]["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert manifest["key"]["sources"] == [str(corpus)]
    for info in manifest["shards"]:
        data = (out / info["file"]).read_bytes()
        assert len(data) == 2 * info["num_tokens"]
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
    reopened = TokenShards.open(out)
    assert reopened.read(0, reopened.num_tokens).tolist() == expected


def test_wide_vocabularies_use_uint32(corpus, backend, tmp_path):
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    wide = BPETokenizer(backend, vocab_size=100_000)
    shards = build_shards(str(corpus), wide, tmp_path / "wide")
    assert shards.dtype == np.uint32
    assert (tmp_path / "wide" / "train_00000.bin").stat().st_size == 4 * shards.num_tokens
    assert shards.read(0, shards.num_tokens).tolist() == wide.expected_stream(_texts(corpus))


def test_val_split_shards_hold_only_val_documents(corpus, tokenizer, tmp_path):
    train = build_shards(str(corpus), tokenizer, tmp_path, split="train", val_fraction=0.3)
    val = build_shards(str(corpus), tokenizer, tmp_path, split="val", val_fraction=0.3)
    val_texts = [d.text for d in iter_documents(str(corpus), split="val", val_fraction=0.3)]
    assert 0 < len(val_texts) < 24
    assert val.read(0, val.num_tokens).tolist() == tokenizer.expected_stream(val_texts)
    assert train.num_documents + val.num_documents == 24
    with pytest.raises(DataError, match="no non-empty documents in split 'val'"):
        build_shards(str(corpus), tokenizer, tmp_path / "none", split="val", val_fraction=0.0)


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_shards_are_reused_or_rebuilt(corpus, backend, tmp_path):
    out = tmp_path / "shards"
    tok = BPETokenizer(backend)
    first = build_shards(str(corpus), tok, out, max_shard_tokens=3000)
    calls, mtimes = tok.num_calls, _mtimes(out)
    again = build_shards(str(corpus), tok, out, max_shard_tokens=3000)
    assert again.is_reused and not first.is_reused
    assert tok.num_calls == calls and _mtimes(out) == mtimes

    other = BPETokenizer(backend, salt="changed")  # a different tokenizer fingerprint
    assert not build_shards(str(corpus), other, out, max_shard_tokens=3000).is_reused
    assert other.num_calls > 0

    doc = sorted(corpus.rglob("*.txt"))[0]
    doc.write_text("a brand new first document")
    rebuilt = build_shards(str(corpus), other, out, max_shard_tokens=3000)
    assert not rebuilt.is_reused
    assert rebuilt.read(0, rebuilt.num_tokens).tolist() == other.expected_stream(_texts(corpus))

    # Fewer, larger shards: the stale shard files are removed.
    single = build_shards(str(corpus), other, out, max_shard_tokens=10**9)
    assert len(single.shards) == 1
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin"]


def test_corrupt_truncated_or_missing_shards_are_detected(corpus, tokenizer, tmp_path):
    out = tmp_path / "shards"
    build_shards(str(corpus), tokenizer, out, max_shard_tokens=3000)
    shard = out / "train_00001.bin"
    original = shard.read_bytes()

    flipped = bytearray(original)
    flipped[10] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="SHA-256"):
        TokenShards.open(out)

    shard.write_bytes(original[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenShards.open(out, verify=False)
    # Building again notices the bad shard and rebuilds it.
    assert not build_shards(str(corpus), tokenizer, out, max_shard_tokens=3000).is_reused
    assert shard.read_bytes() == original
    TokenShards.open(out)

    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenShards.open(out)
    (out / "train.manifest.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenShards.open(out)


class _CrashingTokenizer(BPETokenizer):
    def encode_batch(self, texts):
        if self.num_calls == 3:
            raise KeyboardInterrupt  # a crash part way through the corpus
        return super().encode_batch(texts)


def test_a_crashed_build_leaves_no_manifest_or_partial_file(corpus, backend, tokenizer,
                                                             tmp_path):
    out = tmp_path / "shards"
    build_shards(str(corpus), tokenizer, out, max_shard_tokens=1000, docs_per_batch=2)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(corpus), _CrashingTokenizer(backend, salt="x"), out,
                     max_shard_tokens=1000, docs_per_batch=2)
    assert not (out / "train.manifest.json").exists()  # the old manifest went first
    assert not list(out.glob(".*tmp*"))
    with pytest.raises(DataError, match="no shard manifest"):
        TokenShards.open(out)
    again = build_shards(str(corpus), tokenizer, out, max_shard_tokens=1000)
    assert not again.is_reused
    assert again.read(0, again.num_tokens).tolist() == tokenizer.expected_stream(_texts(corpus))


def test_multi_process_tokenization_equals_single_process(corpus, backend, tmp_path):
    single = build_shards(str(corpus), BPETokenizer(backend), tmp_path / "one",
                          num_workers=1, docs_per_batch=3, max_shard_tokens=2500)
    multi = build_shards(str(corpus), BPETokenizer(backend), tmp_path / "two",
                         num_workers=2, docs_per_batch=3, max_shard_tokens=2500)
    assert multi.manifest["shards"] == single.manifest["shards"]  # same files, same hashes
    assert multi.read(0, multi.num_tokens).tolist() == single.read(0, single.num_tokens).tolist()


def test_the_project_tokenizer_builds_shards(corpus, backend, tmp_path):
    from tessera.tokenizer import Tokenizer as TesseraTokenizer

    tok = TesseraTokenizer(backend, eos_token=EOS)
    shards = build_shards(str(corpus), tok, tmp_path)
    expected = [t for text in _texts(corpus) for t in tok.encode(text) + [tok.eos_token_id]]
    assert shards.read(0, shards.num_tokens).tolist() == expected
    assert shards.tokenizer_fingerprint == tok.fingerprint


# --------------------------------------------------------------------------- packing
def _check_batch(batch, rows, seq_len, eos):
    """The packing invariants, row by row."""
    b = len(rows)
    assert batch.input_ids.shape == batch.labels.shape == (b, seq_len)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.positions.dtype == torch.int64
    assert batch.loss_mask.dtype == torch.bool
    starts = []
    for i, tokens in enumerate(rows):
        n = len(tokens) - 1
        inputs, labels = batch.input_ids[i], batch.labels[i]
        mask, pos = batch.loss_mask[i], batch.positions[i]
        assert inputs[:n].tolist() == list(tokens[:-1])
        assert labels[:n].tolist() == list(tokens[1:])
        assert torch.equal(labels[: n - 1], inputs[1:n])  # each target is the next input
        assert mask.tolist() == [t < n for t in range(seq_len)]  # padding is excluded
        assert (labels[n:] == -100).all()
        for t in range(seq_len):
            new_doc = t == 0 or t == n or (t < n and int(inputs[t - 1]) == eos)
            assert int(pos[t]) == (0 if new_doc else int(pos[t - 1]) + 1)
            if new_doc:
                starts.append(i * seq_len + t)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == starts + [b * seq_len]


def test_pack_rows_small_example():
    eos = 0
    batch = pack_rows([np.array([5, 6, 0, 7, 8, 0, 9]), np.array([4, 0, 3])], 6, eos)
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert batch.cu_seqlens.tolist() == [0, 3, 6, 8, 12]  # row 2: [4, EOS] + padding
    assert batch.loss_mask.tolist() == [[True] * 6, [True, True, False, False, False, False]]
    _check_batch(batch, [[5, 6, 0, 7, 8, 0, 9], [4, 0, 3]], 6, eos)
    plain = pack_rows([np.array([5, 6, 0, 7, 8, 0, 9])], 6, eos, is_document_masked=False)
    assert plain.positions.tolist() == [list(range(6))] and plain.cu_seqlens is None


def test_packed_sequences_from_shards(corpus, tokenizer, tmp_path):
    shards = build_shards(str(corpus), tokenizer, tmp_path, max_shard_tokens=1500)
    stream = shards.read(0, shards.num_tokens)
    seq_len = 97
    packed = PackedSequences(shards, seq_len)
    assert len(packed) == -(-(len(stream) - 1) // seq_len)
    rows = [packed.tokens(i) for i in range(len(packed))]
    batch = packed.batch(range(len(packed)))
    _check_batch(batch, rows, seq_len, tokenizer.eos_token_id)
    # Every token after the first is a target exactly once, in stream order.
    assert batch.labels[batch.loss_mask].tolist() == stream[1:].tolist()
    assert batch.input_ids[batch.loss_mask].tolist() == stream[:-1].tolist()
    # Sequences are independent of which batch they land in.
    pair = packed.batch([5, 2])
    assert torch.equal(pair.input_ids, batch.input_ids[[5, 2]])
    assert torch.equal(pair.positions, batch.positions[[5, 2]])


# --------------------------------------------------------------------------- sampler
def _epoch_steps(sampler, steps):
    return [sampler.next_step() for _ in range(steps)]


def test_ranks_split_each_global_batch_disjointly():
    n, world = 50, 3
    samplers = [SequenceSampler(n, global_batch_size=12, micro_batch_size=2, world_size=world,
                                rank=r, seed=7) for r in range(world)]
    assert samplers[0].steps_per_epoch == 4 and samplers[0].grad_accum_steps == 2
    seen = []
    for step in range(4):
        per_rank = [s.next_step() for s in samplers]
        assert all(len(m) == 2 and all(len(mb) == 2 for mb in m) for m in per_rank)
        flat = [i for micro in per_rank for mb in micro for i in mb]
        assert sorted(flat) == sorted(samplers[0].global_batch(0, step).tolist())
        seen += flat
    assert len(seen) == len(set(seen)) == 48  # no overlap; only the 2-sequence tail dropped
    assert set(seen) == set(samplers[0].epoch_order(0)[:48].tolist())
    assert all(s.epoch == 1 and s.step_in_epoch == 0 for s in samplers)

    exact = [SequenceSampler(48, global_batch_size=12, micro_batch_size=2, world_size=world,
                             rank=r) for r in range(world)]
    covered = [i for s in exact for _ in range(4) for mb in s.next_step() for i in mb]
    assert sorted(covered) == list(range(48))  # the union over ranks is the whole epoch


def test_order_is_seeded_and_reshuffled_per_epoch():
    def make(seed, shuffle=True):
        return SequenceSampler(40, global_batch_size=8, micro_batch_size=4, seed=seed,
                               shuffle=shuffle)

    a, b = make(3), make(3)
    assert _epoch_steps(a, 12) == _epoch_steps(b, 12)
    e0, e1 = a.epoch_order(0), a.epoch_order(1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(40))
    assert e0.tolist() != e1.tolist()
    assert make(4).epoch_order(0).tolist() != e0.tolist()
    assert [i for step in _epoch_steps(make(3, shuffle=False), 5) for mb in step
            for i in mb] == list(range(40))


def test_resume_from_state_dict_gives_the_exact_continuation():
    def make(**kw):
        opts = {"global_batch_size": 12, "micro_batch_size": 3, "seed": 11, **kw}
        return SequenceSampler(62, **opts)

    reference = _epoch_steps(make(), 20)  # 5 steps per epoch: crosses epoch boundaries
    for stop in (0, 3, 5, 7):
        run = make()
        _epoch_steps(run, stop)
        state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        assert _epoch_steps(resumed, 20 - stop) == reference[stop:]
    # Resuming on two ranks instead of one continues with the same global batches.
    run = make()
    _epoch_steps(run, 7)
    ranks = [make(world_size=2, rank=r) for r in range(2)]
    for r in ranks:
        r.load_state_dict(run.state_dict())
    for want in reference[7:12]:
        got = [mb for r in ranks for mb in r.next_step()]
        assert sorted(i for mb in got for i in mb) == sorted(i for mb in want for i in mb)


def test_sampler_validation():
    with pytest.raises(ConfigError, match="multiple of"):
        SequenceSampler(100, global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError, match="rank 2"):
        SequenceSampler(100, global_batch_size=8, micro_batch_size=4, world_size=2, rank=2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        SequenceSampler(7, global_batch_size=8, micro_batch_size=4)
    state = SequenceSampler(100, global_batch_size=8, micro_batch_size=4).state_dict()
    with pytest.raises(DataError, match="num_sequences"):
        SequenceSampler(99, global_batch_size=8, micro_batch_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        SequenceSampler(100, global_batch_size=8, micro_batch_size=4,
                        seed=1).load_state_dict(state)


def test_sampler_and_packing_give_every_rank_its_batches(corpus, tokenizer, tmp_path):
    packed = PackedSequences(build_shards(str(corpus), tokenizer, tmp_path), 64)
    ranks = [SequenceSampler(len(packed), global_batch_size=8, micro_batch_size=2,
                             world_size=2, rank=r, seed=5) for r in range(2)]
    whole = packed.batch(ranks[0].global_batch(0, 0).tolist())
    micro = [packed.batch(mb) for r in ranks for mb in r.next_step()]
    assert torch.equal(torch.cat([m.input_ids for m in micro]), whole.input_ids)
    assert torch.equal(torch.cat([m.loss_mask for m in micro]), whole.loss_mask)
