"""Huge documents: read in blocks and encoded in pieces, with ids identical to encoding them whole,
for every tokenizer backend (the build and data prep streaming one: test_data_faults.py)."""

from __future__ import annotations

import functools
import itertools
import json
import random
import tempfile
from pathlib import Path

import pytest

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.data.text import CountingDecoder, LongDocument, documents, split_documents, split_pieces, text_blocks
from psann.lm.tokenizers import build_tokenizer
from psann.lm.tokenizers.base import CUT_BEFORE_SPACE, CUT_BETWEEN_PRETOKENS, cut_text
from psann.lm.tokenizers.bpe import BPETokenizer
from psann.lm.tokenizers.bpe_train import GPT2_PATTERN, GPT4_PATTERN, train_bpe

EOT = "<|endoftext|>"
STORIES = generate_stories(120, seed=3)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(STORIES, vocab_size=500)


def _hard_text(rng: random.Random, n: int) -> str:
    """Words, whitespace runs, newlines, multibyte characters, special-token text and U+2581."""
    atoms = ["the", "cat", "sat", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "é", "日本語", "😀", "'s", "don't",
             ".", ",", "1234567", EOT, "<|user|>", "</s>", "<s>", "<pad>", "\u2581", "\u00a0", "e\u0301", "x", "ﬁ"]
    return "".join(rng.choice(atoms) for _ in range(n))


def _training_texts():
    return STORIES[:80] + ["café naïve 日本語 😀 \t tabs ﬁ"] * 3


@functools.lru_cache(maxsize=None)
def _trained(kind):
    if kind == "bpe-gpt4":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.txt"
            path.write_text(EOT.join(_training_texts()), encoding="utf-8")
            vocab, merges = train_bpe(path, 450, [EOT], pattern=GPT4_PATTERN, num_workers=1, progress=False)
        return BPETokenizer(vocab, merges, [EOT, "<|user|>"], pattern=GPT4_PATTERN)
    if kind == "bpe-unranked":  # ids not in merge order and overlapping specials: the non-native path
        base = BPETokenizer.train(_training_texts(), vocab_size=450)
        vocab = {i: t for i, t in base._id_to_bytes.items() if i not in base._special_id_set}
        order = sorted(vocab, key=lambda i: (len(vocab[i]) > 1, -i if len(vocab[i]) > 1 else i))
        shuffled = {new: vocab[old] for new, old in enumerate(order)}
        return BPETokenizer(shuffled, base.merges, [EOT, EOT + EOT, "<|user|>"])
    return build_tokenizer(kind, _training_texts(), vocab_size=400)


BACKENDS = ["byte", "char", "bpe", "bpe-gpt4", "bpe-unranked", "sentencepiece", "tokenizers"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param, _trained(request.param)


def test_streamed_ids_equal_whole_document_ids(backend):
    name, tok = backend
    assert tok._stream_cuts() is not None  # every backend we train can be cut
    if name == "bpe-unranked":
        assert tok._native_specials is None
    rng = random.Random(BACKENDS.index(name))
    texts = [_hard_text(rng, rng.randint(0, 250)) for _ in range(40)] + [" ".join(STORIES[:6])]
    n_chunks = 0
    for text in texts:
        want = tok.encode(text, add_bos=True, add_eos=True)
        for chunk_chars in (1, 3, 8, 40):
            bounds = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 12)))
            pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
            chunks = list(tok.encode_stream(iter(pieces), add_bos=True, add_eos=True, chunk_chars=chunk_chars))
            assert [i for ids in chunks for i in ids] == want, (name, chunk_chars, text)
            n_chunks += len(chunks)
    assert n_chunks > 10 * len(texts)  # many cuts really happened


def test_every_cut_before_a_space_is_exact(bpe):
    text = f"abc   {EOT}   de f\n\n g 日本 😀 x{EOT} {EOT}{EOT} y"
    want = bpe.encode(text)
    for m in CUT_BEFORE_SPACE.finditer(text):
        assert bpe.encode(text[:m.end()]) + bpe.encode(text[m.end():]) == want, m.end()
    chunks = list(cut_text([text], CUT_BEFORE_SPACE, bpe._unsplittable(), chunk_chars=1))
    assert "".join(chunks) == text and len(chunks) > 5
    assert all(not a[-1].isspace() and b[0] == " " for a, b in zip(chunks, chunks[1:]))


JA_WORDS = ["日本語", "東京", "今日", "天気", "私", "は", "が", "を", "に", "の", "です", "ます", "した", "テキスト",
            "データ", "コンピューター", "学校", "先生", "読む", "書く", "ことば", "ひらがな", "カタカナ", "漢字", "人々"]
JA_MARKS = ["、", "。", "「", "」", "！", "？", "\n", "１２３", "2024年", "（", "）", "・", "…"]


def _japanese(rng: random.Random, n: int) -> str:
    """About n characters of Japanese-like text with punctuation and no ASCII space."""
    parts, size = [], 0
    while size < n:
        part = "".join(rng.choice(JA_WORDS) for _ in range(rng.randint(1, 12))) + rng.choice(JA_MARKS)
        parts.append(part)
        size += len(part)
    return "".join(parts)[:n]


def _minified_json(rng: random.Random, depth: int = 0):
    if depth > 3 or rng.random() < 0.3:
        return rng.choice([rng.randint(-10**9, 10**9), rng.random() * 1e6, True, None, "it's", "naïve café", "東京",
                           "a\nb\t\"q\"", "😀x", "", "x" * rng.randint(1, 30), EOT])
    if rng.random() < 0.5:
        return [_minified_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {rng.choice(["id", "name", "vals", "k9", "ÄÖ", "ключ", "_x"]) + str(i): _minified_json(rng, depth + 1)
            for i in range(rng.randint(0, 5))}


def _no_space_texts(rng: random.Random, n: int = 600) -> list[str]:
    """CJK, minified JSON, long digit runs, mixed scripts: hardly an ASCII space in them."""
    mixed = ["Привет", "мир", "Ελλάδα", "مرحبا", "שלום", "한국어", "中文字", "ab", "'s", "'LL", "don't", "x²", "½", "Ⅻ",
             "e\u0301", "😀", "👍🏽", "-", "_", "=>", "...", "\n", "\r\n", "\t", "\u00a0", "\u3000", "\u2581", "12", "٣٤",
             "１", EOT, "<|user|>", " "]
    return [
        _japanese(rng, n),
        "".join(rng.choice("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年") for _ in range(n // 2)) + "。" * 3,
        json.dumps([_minified_json(rng) for _ in range(8)], ensure_ascii=False, separators=(",", ":"))[:n * 2],
        "".join(rng.choice("0123456789") for _ in range(n)),
        ",".join(str(rng.randint(0, 10**12)) for _ in range(n // 10)),
        "".join(rng.choice(["1", "22", "333", "4444", "x", ".", "\n", "'", "s"]) for _ in range(n // 2)),
        "".join(rng.choice(mixed) for _ in range(n // 3)),
    ]


def test_text_without_spaces_streams_exactly(backend):
    name, tok = backend
    rng = random.Random(7 + BACKENDS.index(name))
    cuts_found = 0
    for text in _no_space_texts(rng):
        want = tok.encode(text, add_bos=True, add_eos=True)
        for chunk_chars in (1, 3, 8, 40):
            bounds = sorted(rng.sample(range(len(text) + 1), 20))
            pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
            chunks = list(tok.encode_stream(iter(pieces), add_eos=True, add_bos=True, chunk_chars=chunk_chars))
            assert [i for ids in chunks for i in ids] == want, (name, chunk_chars, text)
            cuts_found += len(chunks) - 3
    if name != "sentencepiece":  # byte, char: anywhere; byte-level BPE: at the ends of letter/number runs
        assert cuts_found > 1000


def _cut_places(tok, text: str) -> list[int]:
    chunks = list(cut_text([text], tok._stream_cuts(), tok._unsplittable(), chunk_chars=1))
    assert "".join(chunks) == text
    return list(itertools.accumulate(map(len, chunks)))[:-1]


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_every_pretoken_cut_is_exact_for_the_pattern(pattern):
    """The pattern alone (after the encoder's surrogate clean-up), on short random strings of the
    characters its alternatives tell apart: a small vocabulary could hide a changed pre-token."""
    import regex

    from psann.lm.tokenizers.bpe import _clean_text

    def pre(text):
        return regex.findall(pattern, _clean_text(text))

    alphabet = list("abstlvermdSTLVERMDſ'’\"{}:,.-0123456789½²Ⅳ日本。、ー々１\n\r\t \u00a0\u3000\u2581\u0301😀") + [
        "'s", "'ll", "'VE", " \n", "\r\n", "  ", "\n\n", " 1", " a", " .",
        "\ud840\udc00", "\ud835\udfce", "\ud83d", "\udc00"]  # a pair: a letter, a digit; lone halves
    rng = random.Random(11)
    checked = 0
    for _ in range(15000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        whole = pre(text)
        for m in CUT_BETWEEN_PRETOKENS.finditer(text):
            assert pre(text[:m.end()]) + pre(text[m.end():]) == whole, (text, m.end())
            checked += 1
    assert checked > 25000


@pytest.mark.parametrize("name", ["bpe", "bpe-gpt4", "bpe-unranked", "tokenizers"])
def test_every_pretoken_cut_is_exact_for_the_tokenizer(name):
    """Each place the byte-level BPE backends may cut, one at a time, through the real encoders
    (tiktoken, Hugging Face) with specials, surrogates (bpe only) and many scripts in the text."""
    tok = _trained(name)
    assert tok._stream_cuts() is CUT_BETWEEN_PRETOKENS
    rng = random.Random(13)
    extra = ["\ud840\udc00", "\ud83d\ude00", "\ud83d", "\udc00"] if name != "tokenizers" else []  # HF refuses them
    texts = _no_space_texts(rng, 150) + [_hard_text(rng, 60) for _ in range(40)]
    texts += ["".join(rng.choice(["日本", "a", "1", "。", *extra, EOT, "<|user|>", "'s", "\n", " "]) for _ in range(40))
              for _ in range(40)]
    checked = 0
    for text in texts:
        want = tok.encode(text)
        for p in _cut_places(tok, text):
            assert tok.encode(text[:p]) + tok.encode(text[p:]) == want, (name, text, p)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("name", ["bpe", "bpe-gpt4", "tokenizers"])
def test_japanese_without_spaces_is_encoded_in_bounded_chunks(name, monkeypatch):
    """200,000 characters of Japanese (no ASCII space) fed 1,000 at a time: no encode call sees
    more than twice the buffer, and the ids are those of the whole text."""
    tok = _trained(name)
    text = _japanese(random.Random(17), 200_000)
    assert " " not in text and len(text) == 200_000
    want = tok.encode(text)
    seen: list[int] = []
    cls = type(tok)
    real = cls._encode_text
    monkeypatch.setattr(cls, "_encode_text", lambda self, t: seen.append(len(t)) or real(self, t))
    pieces = (text[i:i + 1000] for i in range(0, len(text), 1000))
    if isinstance(tok, BPETokenizer):
        got = list(tok.encode_iterable(pieces, buffer_chars=4096))  # what `psannlm tokenizer encode` uses
    else:
        got = [i for ids in tok.encode_stream(pieces, chunk_chars=4096) for i in ids]
    assert got == want
    assert sum(seen) == len(text) and max(seen) <= 2 * 4096 and len(seen) >= len(text) // (2 * 4096)


def test_letters_newer_than_the_encoders_tables_are_not_cut(tmp_path):
    """U+323B0 (Unicode 17) is a letter to the `regex` module but unassigned, like punctuation, to
    tiktoken and Hugging Face (Unicode 16), which join it with the "." after it: no cut there. The
    vocabulary merges each pair into one token, so a split pre-token would show in the ids."""
    from psann.lm.tokenizers.hf import HFTokenizer

    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for pair in ("\U000323B0.", "\u0558.", "\u65e5."):  # the last is old: cut as usual
        raw = pair.encode("utf-8")
        for k in range(1, len(raw)):
            if raw[:k + 1] not in vocab.values():
                merges.append((raw[:k], raw[k:k + 1]))
                vocab[len(vocab)] = raw[:k + 1]
    bpe = BPETokenizer(vocab, merges, [EOT])
    hf = HFTokenizer.from_file(bpe.to_hf(tmp_path))
    for tok in (bpe, hf):
        for new_letter in ("\U000323B0", "\u0558"):
            text = (new_letter + "." + "\u65e5.") * 30
            whole = tok.encode(text)
            assert len(whole) == 3 * 30  # "<new letter>." one token (the encoder does not split it), "日", "."
            streamed = list(tok.encode_stream(text, chunk_chars=1))
            assert [i for ids in streamed for i in ids] == whole and len(streamed) > 20  # cut after "日" only


def test_one_huge_pretoken_is_held_whole_but_stays_exact(bpe):
    """Letters with no punctuation are one pre-token: nowhere to cut exactly, so it is encoded at once."""
    text = "あいうえお" * 2000 + "。" + "かきくけこ" * 10
    got = list(bpe.encode_stream((text[i:i + 100] for i in range(0, len(text), 100)), chunk_chars=64))
    assert [i for ids in got for i in ids] == bpe.encode(text) and len(got) <= 3


def test_models_that_need_the_whole_text_are_not_cut(tmp_path):
    import io

    import sentencepiece
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    from psann.lm.tokenizers.hf import HFTokenizer
    from psann.lm.tokenizers.spm import SentencePieceTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(STORIES * 2), model_writer=model, vocab_size=300,
                                             model_type="unigram", minloglevel=2)  # nmt_nfkc, dummy prefix
    spm = SentencePieceTokenizer(model.getvalue())
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(STORIES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        show_progress=False))
    for tok in (spm, HFTokenizer(hf)):
        assert tok._stream_cuts() is None
        text = "  Once  upon a time,   THE end. " * 20
        got = [i for ids in tok.encode_stream(text, add_eos=True, chunk_chars=8) for i in ids]
        assert got == tok.encode(text, add_eos=True)


def test_reader_splits_across_block_edges_like_str_split(tmp_path):
    rng = random.Random(5)
    for trial in range(60):
        sep = rng.choice([None, "\n", "\n\n", EOT, "\r\n"])
        text = "".join(rng.choice(["ab", " ", "\n", "\r\n", "\r", "é", "😀", EOT, "\n\n", "  \n"]) for _ in range(80))
        path = tmp_path / f"t{trial}.txt"
        raw = text.encode("utf-8") + (b"\xff" if trial % 7 == 0 else b"")
        path.write_bytes(raw)
        for universal in (False, True):
            expect_text = raw.decode("utf-8", errors="replace")
            if universal:
                expect_text = expect_text.replace("\r\n", "\n").replace("\r", "\n")
            expected = [d.strip() for d in ([expect_text] if sep is None else expect_text.split(sep))]
            decoder = CountingDecoder()
            blocks = text_blocks(path, decoder, universal, block_bytes=rng.randint(1, 9))
            got = [d.text() if isinstance(d, LongDocument) else d
                   for d in documents(split_pieces(blocks, sep, block_chars=rng.randint(1, 12)))]
            assert got == expected, (sep, text, universal)
            assert decoder.bad == (trial % 7 == 0) and decoder.first_bad == (len(text.encode()) if decoder.bad else -1)
    assert split_documents(" a \n\n b ", "\n\n") == ["a", "b"]


def test_long_document_is_read_in_pieces_and_stripped():
    docs = documents(split_pieces(iter(["   ", "  hello ", "  world  ", "   "]), None, block_chars=3))
    doc = next(docs)
    assert isinstance(doc, LongDocument)
    pieces = list(doc)
    assert "".join(pieces) == "hello   world" and max(map(len, pieces)) <= 9 and next(docs, None) is None
    docs = documents(split_pieces(iter(["x" * 10, "\n\n", "next"]), "\n\n", block_chars=5))
    assert isinstance(next(docs), LongDocument) and next(docs) == "next"  # the unread one is skipped
    assert list(documents(split_pieces(iter(["    ", "   "]), None, block_chars=2))) == [""]  # only whitespace
