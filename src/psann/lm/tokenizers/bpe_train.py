"""Byte-level BPE training from scratch, with the standard semantics.

- Text is split on the special tokens first (nothing merges across them), then pre-tokenised with
  the GPT-2 regex (configurable); merges never cross pre-token boundaries.
- Vocabulary: special tokens, then the 256 byte values, then one entry per merge.
- Each step merges the most frequent adjacent pair; ties go to the lexicographically greater pair
  compared as byte strings.

Speed comes from counting each distinct pre-token once, updating pair counts incrementally (only
words that contain the merged pair change; an index maps pairs to words) and a lazy max-heap.
The file is read in blocks that end at special-token (or safe whitespace) boundaries and
pre-tokenised in worker processes, so memory grows with the number of distinct pre-tokens, not
with the file size; the result does not depend on the number of workers.
"""

from __future__ import annotations

import codecs
import heapq
import logging
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import regex
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError

log = logging.getLogger("psann.lm")

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")
BLOCK_CHARS = 1 << 22  # ~4M characters per pre-tokenisation task


def _special_splitter(special_tokens: Sequence[str]):
    if not special_tokens:
        return None
    # Longest first so that overlapping specials match the longest.
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in alternatives))


def count_pretokens(text: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Counter of pre-token byte strings in `text`, special tokens removed (never merged across)."""
    splitter = _special_splitter(special_tokens)
    pieces = splitter.split(text) if splitter else [text]
    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for piece in pieces:
        counts.update(m.group().encode("utf-8") for m in compiled.finditer(piece))
    return counts


def _count_block(args: tuple[str, str, tuple[str, ...]]) -> Counter:
    return count_pretokens(*args)


def _safe_cut(text: str, special_tokens: Sequence[str]) -> int:
    """An index where cutting `text` cannot change its pre-tokens: after the last special token,
    else before a space that follows a non-space character (pre-tokens start there)."""
    best = -1
    for token in special_tokens:
        at = text.rfind(token)
        if at >= 0:
            best = max(best, at + len(token))
    if best > 0:
        return best
    i = len(text) - 1
    while i > 0:
        i = text.rfind(" ", 0, i)
        if i <= 0:
            break
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
    return len(text)


class _CountingDecoder:
    """Incremental UTF-8 decoder that replaces invalid bytes and counts them."""

    def __init__(self):
        self.bad = 0
        name = f"psann_count_{id(self)}"

        def handler(exc: UnicodeDecodeError):
            self.bad += 1
            return "\ufffd", exc.end

        codecs.register_error(name, handler)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=name)

    def decode(self, data: bytes, final: bool = False) -> str:
        return self._decoder.decode(data, final)


def iter_blocks(path: Path, special_tokens: Sequence[str], block_chars: int | None = None) -> Iterator[str]:
    """Stream the file as text blocks that end at safe boundaries; warns about invalid UTF-8."""
    block_chars = block_chars or BLOCK_CHARS
    decoder = _CountingDecoder()
    carry = ""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block_chars)
            text = carry + decoder.decode(data, final=not data)
            if not data:
                if text:
                    yield text
                break
            cut = _safe_cut(text, special_tokens)
            yield text[:cut]
            carry = text[cut:]
    if decoder.bad:
        log.warning("%s: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD.", path, decoder.bad)


class _Entry:
    """Heap entry: higher count first, then the lexicographically greater byte pair."""

    __slots__ = ("count", "key", "pair")

    def __init__(self, count: int, key: tuple[bytes, bytes], pair: tuple[int, int]):
        self.count, self.key, self.pair = count, key, pair

    def __lt__(self, other: "_Entry") -> bool:
        if self.count != other.count:
            return self.count > other.count
        return self.key > other.key


def _merge_word(word: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def bpe_merges(word_counts: dict[bytes, int], n_merges: int, first_id: int,
               vocab: dict[int, bytes], progress: bool = False) -> list[tuple[bytes, bytes]]:
    """Run up to `n_merges` merges over pre-token counts; extends `vocab` in place."""
    words = [tuple(first_id + c for c in w) for w in word_counts]  # byte c has id first_id + c
    freqs = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    heap = [_Entry(c, (vocab[p[0]], vocab[p[1]]), p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    next_id = max(vocab) + 1
    bar = tqdm(total=n_merges, disable=not progress, unit="merge", desc="bpe")
    while len(merges) < n_merges and heap:
        entry = heapq.heappop(heap)
        if pair_counts.get(entry.pair, 0) != entry.count or entry.count <= 0:
            continue  # stale: the pair's count changed after this entry was pushed
        a, b = entry.pair
        new = next_id
        next_id += 1
        vocab[new] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        changed: set[tuple[int, int]] = set()
        for index in pair_words.pop(entry.pair):
            word = words[index]
            merged = _merge_word(word, a, b, new)
            if merged == word:
                continue  # stale index entry
            freq = freqs[index]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freq
                changed.add(pair)
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq
                pair_words[pair].add(index)
                changed.add(pair)
            words[index] = merged
        pair_counts.pop(entry.pair, None)
        for pair in changed:
            count = pair_counts.get(pair, 0)
            if count > 0:
                heapq.heappush(heap, _Entry(count, (vocab[pair[0]], vocab[pair[1]]), pair))
            else:
                pair_counts.pop(pair, None)
        bar.update(1)
    bar.close()
    return merges


def train_bpe(input_path: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
              special_tokens: Sequence[str] = (), *, pattern: str = GPT2_PATTERN, num_workers: int | None = None,
              progress: bool = True) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on one or more text files -> (vocab id -> bytes, merges in creation order)."""
    paths = [Path(input_path)] if isinstance(input_path, (str, os.PathLike)) else [Path(p) for p in input_path]
    for path in paths:
        if not path.is_file():
            raise DataError(f"BPE training input not found (or not a file): {path}")
    special_tokens = list(dict.fromkeys(special_tokens))
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size {vocab_size} is too small: it must hold the 256 byte values and "
                          f"{len(special_tokens)} special token(s), so at least {minimum}.")
    workers = num_workers or os.cpu_count() or 1
    if sum(p.stat().st_size for p in paths) <= BLOCK_CHARS:
        workers = 1  # one block: a process pool would only add its start-up time
    tasks = ((block, pattern, tuple(special_tokens)) for path in paths for block in iter_blocks(path, special_tokens))
    word_counts: Counter = Counter()
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for counts in pool.imap(_count_block, tasks):
                word_counts.update(counts)
    else:
        for task in tasks:
            word_counts.update(_count_block(task))
    if not word_counts:
        raise DataError(f"{', '.join(map(str, paths))}: no text to train on (empty, or only special tokens).")
    vocab: dict[int, bytes] = {i: t.encode("utf-8") for i, t in enumerate(special_tokens)}
    vocab.update({len(special_tokens) + i: bytes([i]) for i in range(256)})
    # Sorted so the merge order never depends on worker scheduling or dict insertion order.
    ordered = dict(sorted(word_counts.items()))
    merges = bpe_merges(ordered, vocab_size - minimum, len(special_tokens), vocab, progress=progress)
    if len(vocab) < vocab_size:
        log.info("bpe: the corpus supports only %d merges; vocabulary has %d entries (asked for %d).",
                 len(merges), len(vocab), vocab_size)
    return vocab, merges
