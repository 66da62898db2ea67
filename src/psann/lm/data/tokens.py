"""Documents -> one flat token array (BOS doc EOS BOS doc EOS ...), with document starts.

File corpora are written once to a raw memmap (uint16 when the vocabulary fits, else uint32), so
token ids never live in Python lists; small in-memory corpora stay as numpy arrays. A long
document is encoded a chunk at a time (`Tokenizer.encode_stream`, exact), so its ids are never
one Python list either.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import DataError
from ..files import fsync_file, raise_os_error, temp_name

log = logging.getLogger("psann.lm")
_ENCODE_CHUNK = 512  # documents per encode_batch call, and at most about this many characters:
_ENCODE_CHARS = 1 << 20  # the ids of one call are Python lists (8-36 bytes per token) for a moment
LONG_DOC_CHARS = 1 << 18  # a longer document is encoded in chunks of about this many characters


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenCorpus:
    tokens: np.ndarray      # 1-D ids, every document wrapped in BOS ... EOS
    doc_starts: np.ndarray  # int64, len n_docs + 1; document i is tokens[doc_starts[i]:doc_starts[i+1]]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts.shape[0]) - 1


def encode_documents(docs: Iterable, tokenizer, dtype: np.dtype) -> Iterator[Iterator[np.ndarray]]:
    """Per document (BOS ... EOS), its ids as arrays of `dtype`: short documents are encoded in
    batches (one array each); a long one, a str of more than LONG_DOC_CHARS characters or an
    iterable of text pieces (a LongDocument), streams chunk by chunk. Consume each document's
    arrays before asking for the next document."""
    chunk_chars = LONG_DOC_CHARS
    batch: list[str] = []
    batch_chars = 0

    def flush():
        nonlocal batch_chars
        encoded = tokenizer.encode_batch(batch, add_bos=True, add_eos=True) if batch else []
        batch.clear()
        batch_chars = 0
        return (iter([np.asarray(ids, dtype=dtype)]) for ids in encoded)

    for doc in docs:
        if isinstance(doc, str) and len(doc) <= chunk_chars:
            batch.append(doc)
            batch_chars += len(doc)
            if len(batch) == _ENCODE_CHUNK or batch_chars >= _ENCODE_CHARS:
                yield from flush()
            continue
        yield from flush()
        yield (np.asarray(ids, dtype=dtype)
               for ids in tokenizer.encode_stream(doc, add_bos=True, add_eos=True, chunk_chars=chunk_chars))
    yield from flush()


class _Sink:
    """Where encode_corpus puts ids: a temporary file renamed to `path` on close, or memory."""

    def __init__(self, path: Path | None, dtype: np.dtype):
        self.path, self.dtype, self.chunks = path, dtype, []
        self.tmp = self.fh = None
        if path is not None:
            self.tmp = temp_name(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.tmp, "wb")
            except OSError as exc:
                raise_os_error(exc, path, "writing")

    def write(self, ids: np.ndarray) -> None:
        if self.fh is None:
            self.chunks.append(ids)
            return
        try:
            self.fh.write(ids.tobytes())
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")

    def close(self, n_tokens: int) -> np.ndarray:
        if self.fh is None:
            return np.concatenate(self.chunks) if self.chunks else np.zeros(0, self.dtype)
        try:
            self.fh.close()
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")
        return np.memmap(self.path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)


def encode_corpus(docs: Sequence[str], tokenizer, out_path: str | os.PathLike | None = None) -> TokenCorpus:
    """Encode documents with BOS/EOS; to `out_path` as a memmap when given (temp file, then rename)."""
    dtype = token_dtype(tokenizer.vocab_size)
    sink = _Sink(Path(out_path) if out_path is not None else None, dtype)
    lengths: list[int] = []
    try:
        for arrays in encode_documents(docs, tokenizer, dtype):
            n = 0
            for ids in arrays:
                sink.write(ids)
                n += ids.shape[0]
            lengths.append(n)
    except BaseException:
        sink.discard()
        raise
    doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    return TokenCorpus(sink.close(int(doc_starts[-1])), doc_starts)


def split_documents_for_validation(docs: list[str], val_split: float, seed: int) -> tuple[list[str], list[str]]:
    """Document-level split by seed. One document is split at a whitespace near its tail instead."""
    if not docs:
        raise DataError("no text to train on: every document is empty. Pass non-empty strings or files.")
    if val_split <= 0:
        return docs, []
    n_val = int(len(docs) * val_split)
    if n_val == 0 and len(docs) == 1:
        text = docs[0]
        cut = text.rfind(" ", 0, int(len(text) * (1 - val_split)) + 1)
        if cut <= 0 or cut >= len(text) - 1:
            log.warning("data: a single short document cannot be split for validation (val_split=%s); "
                        "training without a validation set.", val_split)
            return docs, []
        return [text[:cut]], [text[cut + 1:]]
    if n_val == 0:
        log.warning("data: val_split=%s of %d documents rounds to none; training without a validation set. "
                    "Add documents or raise val_split.", val_split, len(docs))
        return docs, []
    order = np.random.default_rng(seed).permutation(len(docs))
    val_idx = set(order[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])
