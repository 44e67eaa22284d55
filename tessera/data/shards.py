"""Token shards: a corpus split tokenized once into memory-mapped files, with a manifest.

`build_shards` tokenizes the documents of one split (batched, in a process pool of
`num_workers`, or in this process when it is 1), appends EOS after every document, and
writes flat token files `{split}_{i:05d}.bin` (uint16 when the vocabulary fits, else uint32;
whole documents, each file closed once it reaches `max_shard_tokens`) plus
`{split}.manifest.json`: per-shard token and document counts and SHA-256, the dtype, the
tokenizer fingerprint, the sources and a fingerprint of their files, the settings and a
format version. Token order is document order, whatever the number of workers.

Re-running with the same sources, files, tokenizer and settings reuses the shards; any
change rebuilds them. Every file is written to a temporary name, fsynced and renamed, and the
manifest is removed first and written last, so a crash leaves either no manifest (the next
run rebuilds) or a complete set. `TokenShards.open` checks every shard's size and (by
default) checksum and raises `DataError` on a missing, truncated or corrupt one.

Shards know documents only as token runs ending in EOS; packing them into sequences is
`tessera.data.packing`'s job. The tokenizer is anything with `encode_batch`,
`eos_token_id`, `vocab_size` and `fingerprint` (see `TokenizerLike`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tessera.data.corpus import check_split, corpus_fingerprint, iter_documents, parse_sources
from tessera.errors import DataError

MANIFEST_VERSION = 1


class TokenizerLike(Protocol):
    eos_token_id: int
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name inside the shard directory
    num_tokens: int
    num_documents: int
    sha256: str


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def manifest_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.manifest.json"


# --------------------------------------------------------------------------- reading
class TokenShards:
    """The shards of one split, opened read-only; a flat stream of `num_tokens` tokens."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, is_reused: bool = False):
        self.directory = directory
        self.manifest = manifest
        self.is_reused = is_reused  # True when build_shards found them up to date
        self.shards = [ShardInfo(**s) for s in manifest["shards"]]
        self.dtype = np.dtype(manifest["dtype"])
        self.eos_token_id: int = manifest["key"]["eos_token_id"]
        self.vocab_size: int = manifest["key"]["vocab_size"]
        self.tokenizer_fingerprint: str = manifest["key"]["tokenizer_fingerprint"]
        self._starts = np.cumsum([0] + [s.num_tokens for s in self.shards])
        self._maps: dict[int, np.memmap] = {}

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    @classmethod
    def open(cls, directory: str | Path, split: str = "train", *,
             verify: bool = True) -> TokenShards:
        """Open built shards; `verify` also checks each shard's SHA-256 (reads them all)."""
        directory = Path(directory)
        manifest = _read_manifest(manifest_path(directory, split))
        shards = cls(directory, manifest)
        shards.check(checksums=verify)
        return shards

    def check(self, *, checksums: bool = True) -> None:
        """DataError unless every shard exists with the manifest's size (and checksum)."""
        for info in self.shards:
            path = self.directory / info.file
            expected = info.num_tokens * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"shard {path} is missing; rebuild the shards")
            if path.stat().st_size != expected:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, the manifest "
                                f"says {expected}; it is truncated or corrupt, rebuild it")
            if checksums and _sha256_file(path) != info.sha256:
                raise DataError(f"shard {path} does not match its SHA-256 in the manifest; "
                                "it is corrupt, rebuild the shards")

    def shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            path = self.directory / self.shards[index].file
            self._maps[index] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[index]

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the whole stream as int64 (crossing shards as needed)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.num_tokens})")
        parts = []
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < end:
            offset = start - int(self._starts[index])
            take = min(end - start, self.shards[index].num_tokens - offset)
            parts.append(self.shard(index)[offset:offset + take])
            start += take
            index += 1
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"no shard manifest at {path}; build the shards first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"shard manifest {path} is not valid JSON ({exc}); rebuild") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"shard manifest {path} has format version {manifest.get('version')}, "
                        f"this Tessera reads version {MANIFEST_VERSION}; rebuild the shards")
    return manifest


# --------------------------------------------------------------------------- building
def build_shards(sources: Sequence[str] | str, tokenizer: TokenizerLike,
                 out_dir: str | Path, *, split: str = "train", val_fraction: float = 0.0,
                 text_field: str = "text", num_workers: int = 1, docs_per_batch: int = 64,
                 max_shard_tokens: int = 2**24) -> TokenShards:
    """Tokenize `split` of the corpus into `out_dir`, or reuse shards already built from
    the same inputs. Returns the opened shards (`is_reused` says which happened)."""
    for name, value in (("num_workers", num_workers), ("docs_per_batch", docs_per_batch),
                        ("max_shard_tokens", max_shard_tokens)):
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    check_split(split, val_fraction)
    out_dir = Path(out_dir)
    key = _build_key(sources, tokenizer, split=split, val_fraction=val_fraction,
                     text_field=text_field, max_shard_tokens=max_shard_tokens)
    reused = _reusable(out_dir, split, key)
    if reused is not None:
        return reused
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path(out_dir, split).unlink(missing_ok=True)  # no manifest until complete
    docs = iter_documents(sources, text_field=text_field, split=split,
                          val_fraction=val_fraction)
    arrays = _encoded_batches(docs, tokenizer, num_workers, docs_per_batch)
    shards = _write_shards(arrays, out_dir, split, np.dtype(key["dtype"]), max_shard_tokens,
                           key["eos_token_id"])
    if not shards:
        raise DataError(f"corpus {key['sources']} has no non-empty documents in split "
                        f"{split!r} (val_fraction={val_fraction}); nothing to tokenize")
    manifest = {"version": MANIFEST_VERSION, "split": split, "dtype": key["dtype"],
                "key": key, "num_tokens": sum(s.num_tokens for s in shards),
                "shards": [asdict(s) for s in shards]}
    _atomic_write(manifest_path(out_dir, split),
                  json.dumps(manifest, indent=2, sort_keys=True).encode())
    _remove_stale(out_dir, split, {s.file for s in shards})
    return TokenShards(out_dir, manifest)


def _build_key(sources: Sequence[str] | str, tokenizer: TokenizerLike, **settings: Any
               ) -> dict[str, Any]:
    """Everything the shards depend on; equal keys mean the shards can be reused."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; shards need one after each document")
    specs = [s.spec for s in parse_sources(sources, text_field=settings["text_field"])]
    return {"sources": specs,
            "corpus_fingerprint": corpus_fingerprint(specs,
                                                     text_field=settings["text_field"]),
            "tokenizer_fingerprint": str(tokenizer.fingerprint),
            "vocab_size": int(tokenizer.vocab_size),
            "eos_token_id": int(tokenizer.eos_token_id),
            "dtype": token_dtype(int(tokenizer.vocab_size)).name,
            **settings}


def _reusable(out_dir: Path, split: str, key: dict[str, Any]) -> TokenShards | None:
    try:
        manifest = _read_manifest(manifest_path(out_dir, split))
    except DataError:
        return None
    if manifest.get("key") != key:
        return None
    shards = TokenShards(out_dir, manifest, is_reused=True)
    try:
        shards.check(checksums=False)  # sizes only; open() verifies checksums
    except DataError:
        return None
    return shards


# --------------------------------------------------------------------------- tokenizing
_worker_tokenizer: TokenizerLike | None = None


def _init_worker(tokenizer: TokenizerLike) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_tokenizer is not None
    return encode_documents(_worker_tokenizer, texts)


def encode_documents(tokenizer: TokenizerLike, texts: list[str]) -> np.ndarray:
    """int64 tokens of `texts`, each followed by EOS, concatenated."""
    eos = int(tokenizer.eos_token_id)
    encoded = tokenizer.encode_batch(list(texts))
    out = np.fromiter(itertools.chain.from_iterable(ids + [eos] for ids in encoded),
                      dtype=np.int64)
    if out.size and (out.min() < 0 or out.max() >= tokenizer.vocab_size):
        raise DataError(f"the tokenizer produced token ids outside 0..{tokenizer.vocab_size - 1}"
                        " (its vocab_size is too small, or EOS lies outside it)")
    return out


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _encoded_batches(docs: Iterable[Any], tokenizer: TokenizerLike, num_workers: int,
                     docs_per_batch: int) -> Iterator[np.ndarray]:
    """Tokens (with EOS) of each batch of documents, in document order."""
    batches = _batched((doc.text for doc in docs), docs_per_batch)
    if num_workers == 1:
        for texts in batches:
            yield encode_documents(tokenizer, texts)
        return
    with ProcessPoolExecutor(num_workers, mp_context=_mp_context(), initializer=_init_worker,
                             initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for texts in batches:  # a bounded window keeps memory flat on big corpora
            pending.append(pool.submit(_encode_in_worker, texts))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork shares the tokenizer without pickling it and starts fast; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


# --------------------------------------------------------------------------- writing
def _write_shards(batches: Iterable[np.ndarray], out_dir: Path, split: str,
                  dtype: np.dtype, max_shard_tokens: int, eos_token_id: int) -> list[ShardInfo]:
    """Cut the token stream into shards of whole documents (runs ending in EOS), each
    closed as soon as it holds `max_shard_tokens` or more, and write each atomically."""
    shards: list[ShardInfo] = []
    parts: list[np.ndarray] = []
    num_tokens = num_docs = 0
    for tokens in batches:
        doc_ends = np.flatnonzero(tokens == eos_token_id) + 1
        start = 0
        while start < tokens.size:
            # the first document end at which this shard reaches max_shard_tokens
            need = start + max_shard_tokens - num_tokens
            cut = int(np.searchsorted(doc_ends, need))
            end = int(doc_ends[cut]) if cut < doc_ends.size else tokens.size
            parts.append(tokens[start:end])
            num_docs += int(np.count_nonzero(tokens[start:end] == eos_token_id))
            num_tokens += end - start
            start = end
            if num_tokens >= max_shard_tokens:
                shards.append(_write_shard(parts, out_dir, split, len(shards), dtype, num_docs))
                parts, num_tokens, num_docs = [], 0, 0
    if num_tokens:
        shards.append(_write_shard(parts, out_dir, split, len(shards), dtype, num_docs))
    return shards


def _write_shard(parts: list[np.ndarray], out_dir: Path, split: str, index: int,
                 dtype: np.dtype, num_docs: int) -> ShardInfo:
    data = np.concatenate(parts).astype(dtype).tobytes()
    name = f"{split}_{index:05d}.bin"
    _atomic_write(out_dir / name, data)
    return ShardInfo(file=name, num_tokens=len(data) // dtype.itemsize, num_documents=num_docs,
                     sha256=hashlib.sha256(data).hexdigest())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(out_dir: Path, split: str, keep: set[str]) -> None:
    for path in out_dir.glob(f"{split}_*.bin"):
        if path.name not in keep:
            path.unlink()
    for path in out_dir.glob(f".{split}_*.bin.tmp-*"):  # left by a crashed build
        path.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
