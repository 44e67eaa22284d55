"""Corpus sources: where documents come from, and the train/validation split.

A source is named by one string:

- `python-stdlib`: the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`), without site-packages, test suites and caches;
- a text file, a directory (every file under it, recursively), or a glob (`data/*.txt`,
  `data/**/*.md`);
- a JSONL file, one document per line, text in a field: `path.jsonl:field` (default field
  `text`).

A document is `(doc_id, text)`. Files are visited in sorted order, so a source yields the
same documents in the same order on every run. Documents that are empty or whitespace are
skipped. The split is decided per document by the SHA-1 of its text (not its path), so it is
the same on every machine and a duplicated document never straddles train and validation.

This module reads text; it knows nothing about tokenizers or shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import DataError

STDLIB = "python-stdlib"
SPLITS = ("train", "val")
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                         "__pycache__"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class CorpusSource:
    """One parsed source: its spec, its kind and, for JSONL, the text field."""

    spec: str
    kind: str  # "stdlib" | "text" | "jsonl"
    pattern: str  # path, directory or glob ("" for stdlib)
    text_field: str = "text"

    def files(self) -> list[Path]:
        """The files this source reads, in a deterministic order; DataError if none."""
        if self.kind == "stdlib":
            return stdlib_files()
        files = _expand(self.pattern)
        if not files:
            raise DataError(f"corpus source {self.spec!r} matches no files; check the path")
        return files

    def documents(self) -> Iterator[Document]:
        for path in self.files():
            if self.kind == "jsonl":
                yield from _jsonl_documents(path, self.text_field)
            else:
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield Document(self._doc_id(path), text)

    def _doc_id(self, path: Path) -> str:
        if self.kind == "stdlib":
            return f"{STDLIB}:{path.relative_to(stdlib_root()).as_posix()}"
        return path.as_posix()


def parse_source(spec: str, *, text_field: str = "text") -> CorpusSource:
    """Parse a source string (see the module doc); `path.jsonl:field` overrides text_field."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a corpus source must be a non-empty string, got {spec!r}")
    if spec == STDLIB:
        return CorpusSource(spec, "stdlib", "")
    path, sep, field = spec.rpartition(":")
    if sep and path.endswith(".jsonl") and field and "/" not in field:
        return CorpusSource(spec, "jsonl", path, field)
    kind = "jsonl" if spec.endswith(".jsonl") else "text"
    return CorpusSource(spec, kind, spec, text_field)


def iter_documents(sources: Sequence[str] | str, *, text_field: str = "text",
                   split: str | None = None, val_fraction: float = 0.0
                   ) -> Iterator[Document]:
    """Documents of all sources in order; with `split`, only those of that split."""
    if split is not None:
        check_split(split, val_fraction)
    for source in parse_sources(sources, text_field=text_field):
        for doc in source.documents():
            if split is None or split_of(doc, val_fraction) == split:
                yield doc


def load_documents(sources: Sequence[str] | str, *, text_field: str = "text",
                   split: str | None = None, val_fraction: float = 0.0) -> list[Document]:
    """`iter_documents` as a list; DataError if it is empty."""
    docs = list(iter_documents(sources, text_field=text_field, split=split,
                               val_fraction=val_fraction))
    if not docs:
        where = f" in split {split!r} (val_fraction={val_fraction})" if split else ""
        raise DataError(f"corpus {_as_list(sources)} has no non-empty documents{where}")
    return docs


def parse_sources(sources: Sequence[str] | str, *, text_field: str = "text"
                  ) -> list[CorpusSource]:
    specs = _as_list(sources)
    if not specs:
        raise DataError("no corpus sources given; pass files, directories, globs, "
                        f"'file.jsonl:field' or {STDLIB!r}")
    return [parse_source(spec, text_field=text_field) for spec in specs]


# --------------------------------------------------------------------------- split
def split_of(doc: Document, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` of documents (by text hash), else 'train'."""
    digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def split_documents(docs: Iterable[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, val), each keeping the input order."""
    check_split("train", val_fraction)
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if split_of(doc, val_fraction) == "val" else train).append(doc)
    return train, val


def check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction}")


# --------------------------------------------------------------------------- files
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, sorted by relative path."""
    root = stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS]  # prune the walk
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    if not files:
        raise DataError(f"found no standard-library .py files under {root} "
                        f"(Python {sys.version.split()[0]})")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    if glob.has_magic(pattern):
        matches = (Path(p) for p in glob.glob(pattern, recursive=True))
        return sorted((p for p in matches if p.is_file()), key=lambda p: p.as_posix())
    return []


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no} is not valid JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{line_no} has no string field {text_field!r}; "
                                "name the text field as 'file.jsonl:field'")
            if record[text_field].strip():
                yield Document(f"{path.as_posix()}:{line_no}", record[text_field])


def _as_list(sources: Sequence[str] | str) -> list[str]:
    return [sources] if isinstance(sources, str) else list(sources)


def corpus_fingerprint(sources: Sequence[str] | str, *, text_field: str = "text") -> str:
    """SHA-256 over each source's spec and its files' paths, sizes and modification times.

    NOTE: a cheap stand-in for hashing the text: touching a file changes the fingerprint
    (a needless rebuild), but an edit that keeps both size and mtime would go unnoticed.
    """
    h = hashlib.sha256()
    for source in parse_sources(sources, text_field=text_field):
        h.update(json.dumps([source.spec, source.kind, source.text_field]).encode())
        for path in source.files():
            stat = path.stat()
            h.update(json.dumps([path.as_posix(), stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()
