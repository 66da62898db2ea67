"""Documents -> one flat token array (BOS doc EOS BOS doc EOS ...), with document starts.

File corpora are written once to a raw memmap (uint16 when the vocabulary fits, else uint32), so
token ids never live in Python lists; small in-memory corpora stay as numpy arrays.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger("psann.lm")
_ENCODE_CHUNK = 512  # documents per encode_batch call


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


def encode_corpus(docs: Sequence[str], tokenizer, out_path: str | os.PathLike | None = None) -> TokenCorpus:
    """Encode documents with BOS/EOS; to `out_path` as a memmap when given (temp file, then rename)."""
    dtype = token_dtype(tokenizer.vocab_size)
    lengths: list[int] = []
    chunks: list[np.ndarray] = []
    sink = None
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = out_path.with_name(out_path.name + ".tmp")
        sink = open(tmp_path, "wb")
    try:
        for i in range(0, len(docs), _ENCODE_CHUNK):
            for ids in tokenizer.encode_batch(list(docs[i:i + _ENCODE_CHUNK]), add_bos=True, add_eos=True):
                arr = np.asarray(ids, dtype=dtype)
                lengths.append(arr.shape[0])
                if sink is not None:
                    sink.write(arr.tobytes())
                else:
                    chunks.append(arr)
    finally:
        if sink is not None:
            sink.close()
    doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    if sink is not None:
        os.replace(tmp_path, out_path)
        tokens = np.memmap(out_path, dtype=dtype, mode="r") if doc_starts[-1] else np.zeros(0, dtype)
    else:
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    return TokenCorpus(tokens, doc_starts)


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
