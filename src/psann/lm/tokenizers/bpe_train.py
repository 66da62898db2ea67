"""Byte-level BPE training from scratch, with the standard semantics.

- Text is split on the special tokens first (nothing merges across them), then pre-tokenised with
  the GPT-2 regex (configurable); merges never cross pre-token boundaries.
- Vocabulary: special tokens, then the 256 byte values, then one entry per merge.
- Each step merges the most frequent adjacent pair; ties go to the lexicographically greater pair
  compared as byte strings.

Speed comes from counting each distinct pre-token once, updating pair counts incrementally (only
words that contain the merged pair change, and in them only the pairs next to the merge; an index
maps pairs to words), a lazy max-heap of plain tuples, and words held as strings of token ids so
a merge is one `str.replace`.
The file is read in blocks that end at special-token (or safe whitespace) boundaries and
pre-tokenised in worker processes, so memory grows with the number of distinct pre-tokens, not
with the file size; the result does not depend on the number of workers.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import Counter, defaultdict
from operator import add
from pathlib import Path
from typing import Iterator, Sequence

import regex
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..files import CountingDecoder
from ..workers import process_context

log = logging.getLogger("psann.lm")

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")
BLOCK_CHARS = 1 << 20  # ~1M characters per pre-tokenisation task
MAX_VOCAB = 0x10FFFF  # the merge loop holds token ids as str characters
TOP_K = 10  # pairs and pre-tokens listed at LOG_LEVEL=DEBUG


def _special_splitter(special_tokens: Sequence[str]):
    if not special_tokens:
        return None
    # Longest first so that overlapping specials match the longest.
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in alternatives))


def _count_strings(text: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Counter of pre-token strings in `text`, special tokens removed (never merged across)."""
    splitter = _special_splitter(special_tokens)
    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for piece in (splitter.split(text) if splitter else [text]):
        counts.update(compiled.findall(piece))  # counted as str, encoded once per distinct piece
    return counts


def count_pretokens(text: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Counter of pre-token byte strings in `text`, special tokens removed (never merged across)."""
    return Counter({piece.encode("utf-8"): n for piece, n in _count_strings(text, pattern, special_tokens).items()})


def _count_block(args: tuple[str, str, tuple[str, ...]]) -> Counter:
    return _count_strings(*args)


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


def iter_blocks(path: Path, special_tokens: Sequence[str], block_chars: int | None = None) -> Iterator[str]:
    """Stream the file as text blocks that end at safe boundaries; warns about invalid UTF-8."""
    block_chars = block_chars or BLOCK_CHARS
    decoder = CountingDecoder()
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


_INVERT = bytes(range(255, -1, -1))


def _descending_key(token: bytes) -> str:
    """A string whose ascending order is the descending byte order of `token` (prefix-free thanks
    to the terminator), so heap tuples break count ties toward the greater pair in C."""
    return token.translate(_INVERT).decode("latin-1") + "\u0100"


def bpe_merges(word_counts: dict[bytes, int], n_merges: int, first_id: int,
               vocab: dict[int, bytes], progress: bool = False) -> list[tuple[bytes, bytes]]:
    """Run up to `n_merges` merges over pre-token counts; extends `vocab` in place.

    A word is a str whose characters are token ids (chr(id)); a pair is the 2-character string of
    its ids, so merging is `str.replace` (left to right, non-overlapping: the BPE rule) and the
    count updates touch only the pairs that change."""
    byte_to_char = {c: first_id + c for c in range(256)}
    words = [w.decode("latin-1").translate(byte_to_char) for w in word_counts]
    freqs = list(word_counts.values())
    order = {i: _descending_key(t) for i, t in vocab.items()}
    pair_counts: dict[str, int] = defaultdict(int)
    pair_words: dict[str, set[int]] = defaultdict(set)  # pair -> words that may contain it
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in map(add, word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    # Lazy max-heap: (-count, tie-break keys, pair); entries whose count is out of date are skipped.
    heap = [(-c, order[ord(p[0])], order[ord(p[1])], p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    next_id = max(vocab) + 1
    debug = log.isEnabledFor(logging.DEBUG)
    report_every = max(1, n_merges // 10)
    bar = tqdm(total=n_merges, disable=not progress, unit="merge", desc="bpe")
    while len(merges) < n_merges and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue
        a, b = ord(pair[0]), ord(pair[1])
        if debug:
            if len(merges) % report_every == 0:  # LOG_LEVEL=DEBUG: the pair table every tenth of the run
                _log_top_pairs(pair_counts, vocab, len(merges))
            log.debug("bpe: merge %d: %r + %r (count %d)", len(merges) + 1, vocab[a], vocab[b], -neg_count)
        new = chr(next_id)
        vocab[next_id] = vocab[a] + vocab[b]
        order[next_id] = _descending_key(vocab[next_id])
        merges.append((vocab[a], vocab[b]))
        next_id += 1
        delta: dict[str, int] = defaultdict(int)
        for index in pair_words.pop(pair):
            word = words[index]
            merged = word.replace(pair, new)
            if len(merged) == len(word):
                continue  # stale index entry
            freq = freqs[index]
            words[index] = merged
            if len(word) - len(merged) == 1 and a != b:
                # One occurrence (the common case): only its neighbours' pairs change.
                i = word.index(pair)
                if i:
                    delta[word[i - 1] + pair[0]] -= freq
                    changed = word[i - 1] + new
                    delta[changed] += freq
                    pair_words[changed].add(index)
                if i + 2 < len(word):
                    delta[pair[1] + word[i + 2]] -= freq
                    changed = new + word[i + 2]
                    delta[changed] += freq
                    pair_words[changed].add(index)
                continue
            for old in map(add, word, word[1:]):
                delta[old] -= freq
            for changed in map(add, merged, merged[1:]):
                delta[changed] += freq
                if new in changed:
                    pair_words[changed].add(index)
        delta.pop(pair, None)
        del pair_counts[pair]  # every occurrence was merged
        for changed, d in delta.items():
            if d:
                count = pair_counts[changed] + d
                if count > 0:
                    pair_counts[changed] = count
                    heapq.heappush(heap, (-count, order[ord(changed[0])], order[ord(changed[1])], changed))
                else:
                    del pair_counts[changed]
                    pair_words.pop(changed, None)
        bar.update(1)
    bar.close()
    return merges


def _log_top_pairs(pair_counts: dict[str, int], vocab: dict[int, bytes], done: int) -> None:
    top = heapq.nlargest(TOP_K, pair_counts.items(), key=lambda item: item[1])
    log.debug("bpe: after %d merges, %d distinct pairs; top %d: %s", done, len(pair_counts), len(top),
              ", ".join(f"{vocab[ord(p[0])] + vocab[ord(p[1])]!r}={c}" for p, c in top))


def train_bpe(input_path: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
              special_tokens: Sequence[str] = (), *, pattern: str = GPT2_PATTERN, num_workers: int | None = None,
              progress: bool = True, size_key: str = "vocab_size") -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on one or more text files -> (vocab id -> bytes, merges in creation order).

    The vocabulary holds exactly `vocab_size` ids (special tokens included) unless the corpus runs out
    of pairs to merge first. `size_key` names the option vocab_size came from (--vocab-size), for messages."""
    paths = [Path(input_path)] if isinstance(input_path, (str, os.PathLike)) else [Path(p) for p in input_path]
    for path in paths:
        if not path.is_file():
            raise DataError(f"BPE training input not found (or not a file): {path}")
    special_tokens = list(dict.fromkeys(special_tokens))
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ConfigError(f"{size_key} {vocab_size} is too small: it must hold the 256 byte values and "
                          f"{len(special_tokens)} special token(s), so at least {minimum}.")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"{size_key} {vocab_size} is too large: at most {MAX_VOCAB} is supported.")
    workers = num_workers or os.cpu_count() or 1
    if sum(p.stat().st_size for p in paths) <= BLOCK_CHARS:
        workers = 1  # one block: a process pool would only add its start-up time
    tasks = ((block, pattern, tuple(special_tokens)) for path in paths for block in iter_blocks(path, special_tokens))
    word_counts: Counter = Counter()
    if workers > 1:
        with process_context().Pool(workers) as pool:
            for counts in pool.imap(_count_block, tasks):
                word_counts.update(counts)
    else:
        for task in tasks:
            word_counts.update(_count_block(task))
    word_counts = Counter({piece.encode("utf-8"): n for piece, n in word_counts.items()})
    if not word_counts:
        raise DataError(f"{', '.join(map(str, paths))}: no text to train on (empty, or only special tokens).")
    log.info("bpe: %s pre-tokens (%s distinct) from %s; learning up to %d merges", f"{sum(word_counts.values()):,}",
             f"{len(word_counts):,}", ", ".join(map(str, paths)), vocab_size - minimum)
    if log.isEnabledFor(logging.DEBUG):
        top = word_counts.most_common(TOP_K)
        log.debug("bpe: top %d pre-token splits: %s", len(top), ", ".join(f"{w!r}={n}" for w, n in top))
    vocab: dict[int, bytes] = {i: t.encode("utf-8") for i, t in enumerate(special_tokens)}
    vocab.update({len(special_tokens) + i: bytes([i]) for i in range(256)})
    # Sorted so the merge order never depends on worker scheduling or dict insertion order.
    ordered = dict(sorted(word_counts.items()))
    merges = bpe_merges(ordered, vocab_size - minimum, len(special_tokens), vocab, progress=progress)
    if len(vocab) < vocab_size:
        log.info("bpe: the corpus supports only %d merges, so the vocabulary has %d ids, not the %d of %s; "
                 "train on more text to fill it.", len(merges), len(vocab), vocab_size, size_key)
    return vocab, merges
