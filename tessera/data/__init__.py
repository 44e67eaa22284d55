"""The data pipeline: corpus sources -> token shards -> packed sequences -> batches."""

from tessera.data.corpus import (
    STDLIB,
    CorpusSource,
    Document,
    corpus_fingerprint,
    iter_documents,
    load_documents,
    parse_source,
    split_documents,
    split_of,
    stdlib_files,
)
from tessera.data.packing import Batch, PackedSequences, pack_rows
from tessera.data.sampler import SequenceSampler
from tessera.data.shards import TokenizerLike, TokenShards, build_shards, token_dtype

__all__ = [
    "STDLIB",
    "Batch",
    "CorpusSource",
    "Document",
    "PackedSequences",
    "SequenceSampler",
    "TokenShards",
    "TokenizerLike",
    "build_shards",
    "corpus_fingerprint",
    "iter_documents",
    "load_documents",
    "pack_rows",
    "parse_source",
    "split_documents",
    "split_of",
    "stdlib_files",
    "token_dtype",
]
