"""Where documents come from: text files (split on a separator), .jsonl, .parquet, .gz/.zst
compressed files, manifests listing any of these, and Hugging Face datasets (streamed).

Everything is streamed document by document (text files through the block reader of text.py), so
a source may be far larger than memory, and so may one document. Invalid UTF-8 is replaced with
U+FFFD and counted; empty documents are skipped and counted.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import DataError
from ..files import jsonl_rows
from .text import CountingDecoder, LongDocument, documents, split_pieces, text_blocks

@dataclass
class SourceStats:
    """Counts gathered while reading, reported in the build index."""

    documents: int = 0
    empty_documents: int = 0
    invalid_utf8: int = 0


def read_manifest(path: str | os.PathLike) -> list[str]:
    """Paths listed one per line (blank lines and '#' comments skipped), relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line if os.path.isabs(line) or "://" in line else str(path.parent / line))
    if not entries:
        raise DataError(f"manifest {path} lists no files.")
    return entries


def resolve_inputs(inputs: Sequence[str], manifests: Sequence[str] = ()) -> list[Path]:
    """Expand globs and manifests into files; every missing entry is named in one error."""
    entries = list(inputs)
    for manifest in manifests:
        entries += read_manifest(manifest)
    files: list[Path] = []
    missing: list[str] = []
    for entry in entries:
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not matches:
            missing.append(f"{entry} (the pattern matches nothing)")
        for match in matches:
            p = Path(match)
            if p.is_dir():
                missing.append(f"{p} (a directory: list its files, e.g. {p}/*.txt)")
            elif not p.is_file():
                missing.append(str(p))
            elif not os.access(p, os.R_OK):
                missing.append(f"{p} (not readable)")
            else:
                files.append(p)
    if missing:
        raise DataError(f"{len(missing)} input(s) missing or unreadable: " + "; ".join(missing))
    if not files:
        raise DataError("no input files: pass --input FILE... or --manifest FILE.")
    return files


def _inner_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _lines(pieces: Iterable[tuple[str, bool]]) -> Iterator[str]:
    """Whole lines from `split_pieces(..., "\n")` (a JSON record has to be parsed whole anyway)."""
    parts: list[str] = []
    for text, last in pieces:
        parts.append(text)
        if last:
            yield "".join(parts)
            parts = []


def _jsonl_documents(lines: Iterable[str], text_key: str, path: Path) -> Iterator[str]:
    for number, record in jsonl_rows(lines, path, "each line of a .jsonl file must be one JSON object."):
        if not isinstance(record, dict) or text_key not in record:
            keys = list(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: no {text_key!r} field (found {keys}); pick the field with --text-key.")
        yield str(record[text_key])


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'psann-lm[data]'") from None
    reader = pq.ParquetFile(path)
    if text_key not in reader.schema_arrow.names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {reader.schema_arrow.names}); pick one with --text-key.")
    for batch in reader.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else str(value)


def iter_file_documents(path: Path, separator: str | None, text_key: str,
                        stats: SourceStats) -> Iterator[str | LongDocument]:
    """The documents of one file: strings, or a LongDocument for a text document longer than a block."""
    kind = _inner_suffix(path)
    if kind == ".parquet":
        yield from _parquet_documents(path, text_key)
        return
    decoder = CountingDecoder()
    # Universal newlines: \r\n and \r become \n, so "blank" and "line" separators work on any file.
    blocks = text_blocks(path, decoder)
    try:
        if kind == ".jsonl":
            yield from _jsonl_documents(_lines(split_pieces(blocks, "\n")), text_key, path)
        else:
            yield from documents(split_pieces(blocks, separator))
    finally:
        stats.invalid_utf8 += decoder.bad


def iter_hf_documents(name: str, split: str, text_key: str, config_name: str | None = None) -> Iterator[str]:
    """Stream a Hugging Face dataset (a hub name, or a local dataset directory/script)."""
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the datasets library: pip install 'psann-lm[hf-data]'") from None
    try:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as exc:  # hub errors come in many types; say which dataset and why
        raise DataError(f"could not open Hugging Face dataset {name!r} (split {split!r}): {exc}") from None
    for number, row in enumerate(stream):
        if text_key not in row:
            raise DataError(f"Hugging Face dataset {name!r}: row {number} has no {text_key!r} field "
                            f"(fields: {list(row)}); pick one with --hf-text-key.")
        yield str(row[text_key])


def iter_documents_from(files: Sequence[Path], *, separator: str | None = None, text_key: str = "text",
                        hf_dataset: str | None = None, hf_split: str = "train", hf_config: str | None = None,
                        hf_text_key: str = "text", stats: SourceStats | None = None,
                        long_documents: bool = False) -> Iterator[tuple[str, str | LongDocument]]:
    """(source name, document) for every non-empty document, files first then the HF dataset.
    With `long_documents`, a text document longer than a block comes as a LongDocument (read it
    before asking for the next); otherwise as one string."""
    stats = stats if stats is not None else SourceStats()
    streams = [(str(f), iter_file_documents(f, separator, text_key, stats)) for f in files]
    if hf_dataset:
        streams.append((f"hf:{hf_dataset}:{hf_split}", iter_hf_documents(hf_dataset, hf_split, hf_text_key, hf_config)))
    for name, docs in streams:
        for doc in docs:
            if isinstance(doc, LongDocument):
                if not long_documents:
                    doc = doc.text()
            else:
                doc = doc.strip()
            if not doc:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield name, doc
