"""The from-scratch BPE trainer: exact semantics against a naive reference, streaming, workers."""

import logging
import random
from collections import Counter

import pytest

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.errors import ConfigError, DataError
from psann.lm.tokenizers import bpe_train
from psann.lm.tokenizers.bpe_train import GPT2_PATTERN, bpe_merges, count_pretokens, iter_blocks, train_bpe

SPECIAL = "<|endoftext|>"


def naive_merges(word_counts: dict[bytes, int], n_merges: int) -> list[tuple[bytes, bytes]]:
    """Recount every pair after every merge; pick (count, pair) max. Slow and obviously right."""
    words = {tuple(bytes([c]) for c in w): f for w, f in word_counts.items()}
    merges = []
    for _ in range(n_merges):
        counts = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                counts[p] += f
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        merged = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + f
        words = merged
    return merges


def sample_text(seed: int) -> str:
    rng = random.Random(seed)
    stories = generate_stories(30, seed=seed)
    noise = "".join(rng.choice("aab  \n\n\tçé漢字🙂123!?'s") for _ in range(3000))
    return f"{SPECIAL}".join(stories[:15]) + noise + SPECIAL + "\n\n".join(stories[15:])


@pytest.mark.parametrize("seed,n_merges", [(0, 300), (1, 120)])
def test_merges_equal_the_naive_reference(seed, n_merges, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(sample_text(seed), encoding="utf-8")
    vocab, merges = train_bpe(path, 256 + 1 + n_merges, [SPECIAL], num_workers=1, progress=False)
    counts = count_pretokens(path.read_text(encoding="utf-8"), GPT2_PATTERN, [SPECIAL])
    assert merges == naive_merges(dict(counts), n_merges)
    assert len(vocab) == 256 + 1 + n_merges and vocab[0] == SPECIAL.encode()
    assert all(vocab[257 + i] == a + b for i, (a, b) in enumerate(merges))


def test_ties_go_to_the_lexicographically_greater_pair():
    words = {b"BAA": 3, b"AB": 3}
    vocab = {i: bytes([i]) for i in range(256)}
    merges = bpe_merges(words, 2, 0, vocab)
    assert merges == [(b"B", b"A"), (b"BA", b"A")] == naive_merges(words, 2)


def test_nothing_merges_across_special_tokens(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("hello<|endoftext|>" * 50) + "<|pad|>world" * 20, encoding="utf-8")
    vocab, merges = train_bpe(path, 300, [SPECIAL, "<|pad|>"], num_workers=1, progress=False)
    for token_id, token in vocab.items():
        if token_id >= 2:
            assert b"<|endoftext|>" not in token and b"<|pad|>" not in token
    assert not any(b"|" in a + b for a, b in merges)  # the specials' characters never appear in text


def test_longest_special_token_wins():
    counts = count_pretokens("a<|end|>b<|endoftext|>c", GPT2_PATTERN, ["<|end|>", SPECIAL])
    assert counts == Counter({b"a": 1, b"b": 1, b"c": 1})


@pytest.mark.parametrize("specials", [[SPECIAL], []])
def test_blocks_cut_only_at_safe_boundaries(specials, tmp_path):
    path = tmp_path / "c.txt"
    text = sample_text(3)
    path.write_text(text, encoding="utf-8")
    blocks = list(iter_blocks(path, specials, block_chars=997))
    assert len(blocks) > 10 and "".join(blocks) == text
    pieces = Counter()
    for block in blocks:
        pieces.update(count_pretokens(block, GPT2_PATTERN, specials))
    assert pieces == count_pretokens(text, GPT2_PATTERN, specials)


def test_result_does_not_depend_on_worker_count(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text(sample_text(4) * 3, encoding="utf-8")
    monkeypatch.setattr(bpe_train, "BLOCK_CHARS", 4000)  # several blocks, so the pool is used
    one = train_bpe(path, 400, [SPECIAL], num_workers=1, progress=False)
    two = train_bpe(path, 400, [SPECIAL], num_workers=2, progress=False)
    assert one == two


def test_bad_input(tmp_path, caplog):
    with pytest.raises(DataError, match="not found"):
        train_bpe(tmp_path / "missing.txt", 300)
    empty = tmp_path / "empty.txt"
    empty.write_text(SPECIAL * 3, encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        train_bpe(empty, 300, [SPECIAL], progress=False)
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe(empty, 257, [SPECIAL, "<|pad|>"])
    with pytest.raises(ConfigError, match="too large"):
        train_bpe(empty, bpe_train.MAX_VOCAB + 1, [SPECIAL])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 ol\xff\xfe d " * 10)
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        vocab, _ = train_bpe(bad, 270, progress=False)
    assert "30 invalid UTF-8" in caplog.text
