"""Documents -> token ids (BOS doc EOS) -> token-shard files, and the seeded document-level
validation split.

The token-shard format (read by shards.py): a directory with index.json (dtype, vocabulary,
tokenizer fingerprint, and per split its shards: tokens, documents, largest id, sha256), the
tokenizer, and per shard `{split}_{n:05d}.bin` (raw ids, uint16 when the vocabulary fits, else
uint32), `.docs.npy` (the start of every document) and, for SFT data, `.mask.bin` (one byte per
token: whether it is a target). `psannlm data build` writes it from sources through filters and
worker processes (build.py); `write_documents` writes it for texts and SFT examples in one pass.
A long document is encoded a chunk at a time (`Tokenizer.encode_stream`, exact), so its ids are
never one Python list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DataError
from ..files import fsync_dir, fsync_file, raise_os_error, temp_name, write_atomic
from ..tokenizers import tokenizer_fingerprint

log = logging.getLogger("psann.lm")
_ENCODE_CHUNK = 512  # documents per encode_batch call, and at most about this many characters:
_ENCODE_CHARS = 1 << 20  # the ids of one call are Python lists (8-36 bytes per token) for a moment
LONG_DOC_CHARS = 1 << 18  # a longer document is encoded in chunks of about this many characters
INDEX_FILE, FORMAT, FORMAT_VERSION = "index.json", "psann-token-shards", 1
# Hash of each shard file in the index. sha256 runs on the CPU's SHA instructions: 1.65 GB/s on the
# 2-core EPYC where blake2b does 0.8 GB/s (docs/results/huge_document.md).
SHARD_HASH = "sha256"
_SCAN_BYTES = 1 << 23


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


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


def scan_shard(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(SHARD_HASH hex digest, largest token id or -1) of a shard file, in one pass."""
    digest, top = hashlib.new(SHARD_HASH), -1
    with open(path, "rb") as fh:
        while block := fh.read(_SCAN_BYTES):
            digest.update(block)
            ids = np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize)
            if ids.shape[0]:
                top = max(top, int(ids.max()))
    return digest.hexdigest(), top


class ShardWriter:
    """Appends documents to a temporary file of its own (files.temp_name); `close` renames it to
    ``{split}_{n:05d}.bin`` and returns its index entry. OS errors name the shard and the cause."""

    def __init__(self, out: Path, split: str, index: int, dtype: np.dtype, npy: bool, masked: bool = False):
        self.out, self.split, self.index, self.dtype, self.npy = out, split, index, np.dtype(dtype), npy
        self.name = f"{split}_{index:05d}"
        self.path = out / f"{self.name}.bin"
        self.tmp = temp_name(self.path)
        self.mask_path = out / f"{self.name}.mask.bin" if masked else None
        self.mask_tmp = temp_name(self.mask_path) if masked else None
        self.tokens, self.doc_starts = 0, []
        self.fh = self._open(self.tmp)
        self.mask_fh = self._open(self.mask_tmp) if masked else None

    def _open(self, tmp: Path):
        try:
            return open(tmp, "wb")
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """A whole document; a masked shard takes each token's target flag too (SFT answers)."""
        self.begin()
        if self.mask_fh is not None:
            try:
                self.mask_fh.write(np.asarray(mask, dtype=np.uint8).tobytes())
            except OSError as exc:
                raise_os_error(exc, self.mask_path, "writing")
        self.write(ids)

    def begin(self) -> None:
        """Start a document, to be written in one or more `write`s."""
        self.doc_starts.append(self.tokens)

    def write(self, ids: np.ndarray) -> None:
        try:
            self.fh.write(ids.tobytes())
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")
        self.tokens += int(ids.shape[0])

    def undo(self) -> None:
        """Drop the document begun last (a filter removed it after part of it was written)."""
        self.tokens = self.doc_starts.pop()
        try:
            self.fh.seek(self.tokens * self.dtype.itemsize)
            self.fh.truncate()
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")

    def close(self) -> dict:
        try:
            return self._finish()
        except OSError as exc:
            raise_os_error(exc, self.path, "writing")

    def _finish(self) -> dict:
        self.fh.close()
        digest, max_id = scan_shard(self.tmp, self.dtype)  # one pass over a file still in the page cache
        docs = self.out / f"{self.name}.docs.npy"
        self._save_npy(docs, np.asarray(self.doc_starts, dtype=np.int64))
        if self.npy:
            self._save_npy(self.out / f"{self.name}.npy", np.memmap(self.tmp, dtype=self.dtype, mode="r")
                           if self.tokens else np.zeros(0, self.dtype))
        entry = {"file": self.path.name, "docs_file": docs.name, "tokens": self.tokens,
                 "documents": len(self.doc_starts), "max_id": max_id, SHARD_HASH: digest}
        if self.mask_fh is not None:
            self.mask_fh.close()
            self._publish(self.mask_tmp, self.mask_path)
            entry["mask_file"] = self.mask_path.name
        self._publish(self.tmp, self.path)
        fsync_dir(self.out)
        return entry

    @staticmethod
    def _publish(tmp: Path, path: Path) -> None:
        fsync_file(tmp)
        os.replace(tmp, path)

    @staticmethod
    def _save_npy(path: Path, array: np.ndarray) -> None:
        tmp = temp_name(path)
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        ShardWriter._publish(tmp, path)

    def discard(self) -> None:
        for fh in (self.fh, self.mask_fh):
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass  # a full disk may fail the last flush too; the file goes anyway
        self.tmp.unlink(missing_ok=True)
        if self.mask_tmp is not None:
            self.mask_tmp.unlink(missing_ok=True)


def index_head(tokenizer, dtype: np.dtype, fingerprint: str, shards: dict[str, list[dict]]) -> dict:
    """The index fields every reader needs (shards.read_index checks them)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "tokenizer": "tokenizer", "tokenizer_fingerprint": fingerprint, "tokenizer_kind": tokenizer.kind,
            "shards": shards, "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in shards}}


def write_documents(out: str | os.PathLike, tokenizer, splits: dict[str, Iterable], *, masked: bool = False,
                    encoded: bool = False, sources: Iterable[str] = ()) -> dict:
    """A small build, without filters or workers, in the format `build_dataset` writes: each
    split's documents into one shard. Texts (str or LongDocument) are encoded here, a long one
    as it streams; with `encoded`, documents are arrays of ids written as they are (token
    arrays); with `masked`, (ids, target flags) pairs (SFT). Training on texts, token arrays or
    SFT files builds them this way into the run's data cache."""
    out = Path(out)
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX_FILE).unlink(missing_ok=True)  # a dataset again only once every shard is in place
    except OSError as exc:
        raise_os_error(exc, out, "writing")
    shards: dict[str, list[dict]] = {}
    for split, docs in splits.items():
        writer = ShardWriter(out, split, 0, dtype, npy=False, masked=masked)
        try:
            if masked:
                for ids, flags in docs:
                    writer.add(np.asarray(ids, dtype=dtype), flags)
            elif encoded:
                for ids in docs:
                    writer.begin()
                    for start in range(0, len(ids), 1 << 24):  # a memory-mapped array, a piece at a time
                        writer.write(np.asarray(ids[start:start + (1 << 24)], dtype=dtype))
            else:
                for arrays in encode_documents(docs, tokenizer, dtype):
                    writer.begin()
                    for ids in arrays:
                        writer.write(ids)
        except BaseException:
            writer.discard()
            raise
        if writer.tokens:
            shards[split] = [writer.close()]
        else:
            shards[split] = []
            writer.discard()
    tokenizer.save(out / "tokenizer")
    index = {**index_head(tokenizer, dtype, tokenizer_fingerprint(tokenizer), shards), "sources": list(sources)}
    write_atomic(out / INDEX_FILE, json.dumps(index, indent=2))
    return index


def token_array_tokenizer(path: str | os.PathLike) -> Path:
    """Where `psannlm tokenizer encode` saves the tokenizer of X.npy: X.tokenizer/ beside it."""
    return Path(path).with_suffix(".tokenizer")


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
