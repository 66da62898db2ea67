"""Tests for psann.lm.tokenizers: every backend, save/load, model_path loading, errors."""

from __future__ import annotations

import random

import json
import sys
import logging

import pytest
import sentencepiece
import tokenizers

from psann.lm.errors import CheckpointError, ConfigError, DataError
from psann.lm.infer.generate import IncrementalText
from psann.lm.tokenizers import (
    TOKENIZER_KINDS,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from psann.lm.tokenizers.base import META_FILE

CORPUS = [
    "Once upon a time there was a little girl who lived in a village near the forest.\n"
    "Whenever she went out, the little girl wore a red riding cloak.",
    "The quick brown fox jumps over the lazy dog. The dog was not amused.\n\nThe end.",
    "Café, naïve, façade, über, jalapeño — accents are ordinary text. 日本語もある。",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
] * 3
TINY = ["hello world", "goodnight moon"]
SAMPLES = [
    "Once upon a time",
    "plain ASCII, with punctuation! And digits: 12345.",
    "Unicode: héllo wörld, ñandú, Ελληνικά, 中文, emoji 👋🏽🚀 and ZWJ 👩‍👩‍👧",
    "line one\nline two\n\n  indented line\n",
    "\nleading newline, trailing spaces   ",
    " leading space and\ttabs\t\t",
]
SUBWORD_KINDS = ["sentencepiece", "tokenizers"]
LOSSLESS_KINDS = ["byte", *SUBWORD_KINDS]


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {kind: build_tokenizer(kind, CORPUS, vocab_size=400) for kind in ["byte", "char", *SUBWORD_KINDS]}


@pytest.mark.parametrize("kind", LOSSLESS_KINDS)
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained, kind, text):
    tok = trained[kind]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids  # byte fallback / byte-level: nothing is unknown
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", LOSSLESS_KINDS)
def test_separately_encoded_pieces_concatenate(trained, kind):
    # Data pipelines encode documents one by one and join the ids; streaming
    # generation decodes growing id lists. Neither may insert or lose spaces.
    tok = trained[kind]
    parts = ["Once upon", " a time", "\nthe end"]
    joined = [i for part in parts for i in tok.encode(part)]
    assert tok.decode(joined) == "".join(parts)


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", *SUBWORD_KINDS])
def test_incremental_text_equals_a_whole_decode_at_every_token(trained, kind, monkeypatch):
    # Streaming (chat, the server) decodes only the tail of the growing ids; at every token it must
    # give what decoding them all gives: characters split across byte tokens, special tokens, spaces.
    tok = trained[kind] if kind in trained else build_tokenizer(kind, CORPUS, vocab_size=400)
    ids = [i for text in SAMPLES for i in tok.encode(text, add_bos=True, add_eos=True)]
    rng = random.Random(0)
    ids += [rng.randrange(tok.vocab_size) for _ in range(200)]  # any ids: stray continuation bytes too
    stream, decoded = IncrementalText(tok), []
    real = tok.decode
    for n in range(1, len(ids) + 1):
        expected = real(ids[:n], skip_special_tokens=True)
        monkeypatch.setattr(tok, "decode", lambda part, **kw: decoded.append(len(part)) or real(part, **kw))
        assert stream.text(ids[:n]) == expected, n
        monkeypatch.undo()
    assert max(decoded) < len(ids) // 4  # the tail, not the whole list


def test_char_round_trip_and_unknown_chars(trained):
    tok = trained["char"]
    text = "The quick brown fox\n\nwas not amused."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("fox 🦊")
    assert ids[-1] == tok.unk_id and ids[:3] == tok.encode("fox")
    assert tok.encode("\t") == [tok.unk_id]  # never seen in training
    # ids 0..3 are specials, then the training characters in sorted order.
    assert tok.chars == sorted(tok.chars) and len(tok.chars) + 4 == tok.vocab_size


@pytest.mark.parametrize("kind", ["byte", "char", *SUBWORD_KINDS])
def test_special_ids_distinct_and_in_range(trained, kind):
    tok = trained[kind]
    specials = [tok.pad_id, tok.bos_id, tok.eos_id] + ([tok.unk_id] if tok.unk_id is not None else [])
    assert len(set(specials)) == len(specials)
    assert all(0 <= i < tok.vocab_size for i in specials)
    assert tok.special_ids() == set(specials)


@pytest.mark.parametrize("kind", ["byte", "char", *SUBWORD_KINDS])
def test_bos_eos_only_when_asked(trained, kind):
    tok = trained[kind]
    plain = tok.encode("the dog")
    assert tok.eos_id not in plain and tok.bos_id not in plain
    assert tok.encode("the dog", add_bos=True) == [tok.bos_id, *plain]
    assert tok.encode("the dog", add_eos=True) == [*plain, tok.eos_id]
    both = tok.encode("the dog", add_bos=True, add_eos=True)
    assert both == [tok.bos_id, *plain, tok.eos_id]
    assert tok.decode(both, skip_special_tokens=True) == "the dog"
    shown = tok.decode(both)  # special tokens are shown unless asked to skip them
    assert shown.endswith("the dog" + tok.special_tokens()[tok.eos_id])
    batch = tok.encode_batch(["the dog", "a fox"], add_bos=True)
    assert batch == [tok.encode("the dog", add_bos=True), tok.encode("a fox", add_bos=True)]


@pytest.mark.parametrize("kind", ["byte", "char", *SUBWORD_KINDS])
def test_save_load_identical(trained, kind, tmp_path):
    tok = trained[kind]
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / META_FILE).read_text())
    assert meta["kind"] == kind and meta["format_version"] == 1
    for loaded in (load_tokenizer(tmp_path / "tok"), build_tokenizer("auto", model_path=str(tmp_path / "tok"))):
        assert type(loaded) is type(tok)
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.unk_id) == (
            tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


@pytest.mark.parametrize("kind", ["char", *SUBWORD_KINDS])
def test_training_is_deterministic(trained, kind):
    again = build_tokenizer(kind, CORPUS, vocab_size=400)
    assert again.encode_batch(SAMPLES) == trained[kind].encode_batch(SAMPLES)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(trained[kind])
    other = build_tokenizer(kind, CORPUS[:2], vocab_size=400)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(again)


@pytest.mark.parametrize("kind", SUBWORD_KINDS)
def test_tiny_corpus_trains_with_default_vocab(kind):
    tok = build_tokenizer(kind, TINY)  # default vocab_size (8000) is only a soft bound
    assert tok.vocab_size < 8000
    ids = tok.encode("Once upon a time")
    assert ids and tok.unk_id not in ids
    assert tok.decode(ids) == "Once upon a time"


def test_sentencepiece_long_lines_are_used(tmp_path):
    # One 30k-character line is above sentencepiece's max_sentence_length; it must be
    # chunked rather than silently dropped, or the trainer would see no text at all.
    line = " ".join(["abracadabra"] * 2500)
    tok = build_tokenizer("sentencepiece", [line], vocab_size=300)
    assert len(tok.encode("abracadabra")) <= 3
    assert tok.decode(tok.encode(line)) == line


def test_char_vocab_size_keeps_most_frequent():
    tok = build_tokenizer("simple", ["aaaa bbb cc d"], vocab_size=7)  # "simple" = char
    assert tok.kind == "char"
    # Counts: a=4, " "=3, b=3, c=2, d=1; three slots keep the three most frequent.
    assert tok.chars == [" ", "a", "b"]
    assert tok.encode("c d") == [tok.unk_id, 4, tok.unk_id]


def test_external_sentencepiece_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    # Library defaults: unk=0, bos=1, eos=2 and no pad piece at all.
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "ext"), vocab_size=120,
        hard_vocab_limit=False, minloglevel=2,
    )
    model = tmp_path / "ext.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = build_tokenizer("auto", model_path=str(model))
    assert tok.kind == "sentencepiece"
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert tok.pad_id == sp.get_piece_size() and tok.vocab_size == sp.get_piece_size() + 1
    assert tok.encode("the little dog") == sp.encode("the little dog")
    assert tok.decode([tok.pad_id, *tok.encode("the dog")], skip_special_tokens=True) == "the dog"
    with pytest.raises(ConfigError, match="sentencepiece"):
        build_tokenizer("tokenizers", model_path=str(model))


def _gpt2_style_tokenizer_json(path):
    """A byte-level BPE with only <|endoftext|>, like GPT-2, written to ``path``."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(path))
    return tok


def test_external_tokenizer_json_without_map(tmp_path):
    ref = _gpt2_style_tokenizer_json(tmp_path / "tokenizer.json")
    tok = build_tokenizer("tokenizers", model_path=str(tmp_path))  # a directory works too
    assert tok.eos_id == ref.token_to_id("<|endoftext|>")
    # GPT-2 has no separate bos/pad: they are added as new specials at the end.
    assert tok.bos_id >= ref.get_vocab_size() and tok.pad_id >= ref.get_vocab_size()
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and tok.unk_id is None
    assert tok.encode("The lazy dog") == ref.encode("The lazy dog").ids
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]


def test_external_tokenizer_json_with_special_tokens_map(tmp_path):
    ref = _gpt2_style_tokenizer_json(tmp_path / "tokenizer.json")
    ref.add_special_tokens(["<start>", "<stop>"])
    ref.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<start>", "eos_token": {"content": "<stop>"}, "pad_token": "<|endoftext|>"}))
    tok = build_tokenizer("auto", model_path=str(tmp_path / "tokenizer.json"))
    assert tok.kind == "tokenizers"
    assert tok.bos_id == ref.token_to_id("<start>")
    assert tok.eos_id == ref.token_to_id("<stop>")
    assert tok.pad_id == ref.token_to_id("<|endoftext|>")
    assert tok.vocab_size == ref.get_vocab_size()  # nothing had to be added


def test_hf_saved_file_loads_in_tokenizers_library(trained, tmp_path):
    tok = trained["tokenizers"]
    tok.save(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in SAMPLES:
        assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text)
    roles = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert raw.token_to_id(roles["bos_token"]) == tok.bos_id
    assert raw.token_to_id(roles["eos_token"]) == tok.eos_id
    assert raw.token_to_id(roles["pad_token"]) == tok.pad_id


def test_literal_special_token_text_is_plain_text(trained):
    for kind in ["byte", "char", *SUBWORD_KINDS]:
        tok = trained[kind]
        eos_text = tok.special_tokens()[tok.eos_id]
        ids = tok.encode(f"a{eos_text}b")
        assert tok.eos_id not in ids, kind


def test_unknown_kind_suggests_closest():
    with pytest.raises(ConfigError, match="Did you mean 'sentencepiece'"):
        build_tokenizer("sentencepeice", TINY)
    assert "simple" in TOKENIZER_KINDS and "auto" in TOKENIZER_KINDS


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        build_tokenizer("auto", model_path=str(missing))
    assert isinstance(info.value, DataError)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("kind", ["char", *SUBWORD_KINDS, "auto"])
@pytest.mark.parametrize("texts", [[], ["", ""], "", iter([])])
def test_empty_texts_raise_data_error(kind, texts):
    with pytest.raises(DataError, match="no text"):
        build_tokenizer(kind, texts)


def test_byte_tokenizer_needs_no_text_and_decodes_invalid_bytes():
    tok = build_tokenizer("byte")
    assert tok.vocab_size == 256 and (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0xFD, 0xFE, 0xFF, None)
    assert tok.encode("é") == [0xC3, 0xA9]
    # pad/bos/eos are bytes UTF-8 never uses, so no text can produce them
    rng = random.Random(0)
    text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]))
                   for _ in range(20000)) + "\ud800"  # a lone surrogate too
    assert max(tok.encode(text)) < 0xF5
    text = tok.decode([0xC3, ord("a"), 0xE2, 0x82, tok.eos_id, 0xF0], skip_special_tokens=True)  # broken UTF-8
    assert "\ufffd" in text and "a" in text and "<eos>" not in text
    assert "<eos>" in tok.decode([ord("a"), tok.eos_id])
    assert tok.decode([5000, -1, 104, 105]) == "\ufffd\ufffdhi"  # out-of-range ids never crash


def test_load_errors(trained, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    trained["sentencepiece"].save(tmp_path / "sp")
    (tmp_path / "sp" / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "sp")
    trained["char"].save(tmp_path / "ch")
    meta_path = tmp_path / "ch" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_tokenizer(tmp_path / "ch")
    meta_path.write_text(json.dumps({**meta, "kind": "wordpiece"}))
    with pytest.raises(CheckpointError, match="wordpiece"):
        load_tokenizer(tmp_path / "ch")


def test_auto_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="psann.lm"):
        tok = build_tokenizer("auto", TINY)
    assert tok.kind == "sentencepiece"  # both libraries are installed; sentencepiece wins
    assert any("auto" in r.message and "sentencepiece" in r.message for r in caplog.records)


def test_auto_falls_back_when_sentencepiece_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import now fails
    with caplog.at_level(logging.INFO, logger="psann.lm"):
        tok = build_tokenizer("auto", TINY)
    assert tok.kind == "tokenizers"
    assert any("sentencepiece is not" in r.message for r in caplog.records)


@pytest.mark.parametrize("kind", ["byte", "char", *SUBWORD_KINDS])
def test_decode_of_encode_is_the_text_special_tokens_included(trained, kind):
    tok = trained[kind]
    specials = list(tok.special_tokens().values())
    texts = ["the dog sat.", "  spaces  and\nlines\n"]
    if kind != "char":  # a char vocabulary holds only the characters it was trained on ('<' is <unk>)
        texts.append(f"the dog{specials[-1]} sat")  # a special token's text in the input comes back
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, (kind, text)
    ids = tok.encode("the dog", add_bos=True, add_eos=True)
    assert tok.decode(ids).endswith("the dog" + tok.special_tokens()[tok.eos_id])
