import logging

import numpy as np
import pytest
import torch

from psann.lm import psannLMDataPrep
from psann.lm.data.loader import IGNORE_INDEX, TokenWindows, WindowLoader
from psann.lm.data.text import read_text_file
from psann.lm.data.tokens import TokenCorpus, split_documents_for_validation
from psann.lm.errors import CheckpointError, ConfigError, DataError

from conftest import shared_file


def corpus_of(*doc_lengths):
    tokens = np.arange(sum(doc_lengths), dtype=np.uint16) + 10
    starts = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return TokenCorpus(tokens, starts)


@pytest.mark.parametrize("n_tokens,expected", [(1, 0), (2, 1), (9, 1), (10, 2), (17, 2), (18, 3)])
def test_packed_window_count_has_no_off_by_one(n_tokens, expected):
    assert len(TokenWindows(corpus_of(n_tokens), 8, True, 0)) == expected


def test_packed_windows_cover_every_target_exactly_once():
    corpus = corpus_of(7, 12, 6)
    w = TokenWindows(corpus, 8, True, 0)
    x, y = w.batch(np.arange(len(w)))
    targets = y[y != IGNORE_INDEX]
    assert targets.tolist() == corpus.tokens[1:].astype(int).tolist()
    assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])  # shifted once
    assert w.n_target_tokens == corpus.n_tokens - 1


def test_unpacked_windows_stay_inside_documents():
    corpus = corpus_of(5, 20)
    w = TokenWindows(corpus, 8, False, 0)
    assert len(w) == 1 + 3  # ceil(4/8) + ceil(19/8)
    x, y = w.batch(np.array([0]))
    assert y[0, :4].tolist() == [11, 12, 13, 14] and (y[0, 4:] == IGNORE_INDEX).all()
    assert (x[0, 4:] == 0).all()  # padded with pad id


def test_loader_state_resumes_exactly_and_spans_epochs():
    w = TokenWindows(corpus_of(200), 8, True, 0)  # 25 windows
    a = WindowLoader(w, 4, seed=3)
    seq = [a.next_batch()[0] for _ in range(15)]  # 60 windows: crosses two epoch boundaries
    assert all(s.shape[0] == 4 for s in seq) and a.consumed == 60
    b = WindowLoader(w, 4, seed=3)
    for _ in range(6):
        b.next_batch()
    c = WindowLoader(w, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(seq[6 + i], c.next_batch()[0]) for i in range(9))
    seen = torch.cat(seq[:6] + [seq[6][:1]])[:25, 0]  # first epoch: each window exactly once
    assert len(set(seen.tolist())) == 25


def test_loader_refuses_state_from_other_data():
    a = WindowLoader(TokenWindows(corpus_of(200), 8, True, 0), 4, seed=3)
    b = WindowLoader(TokenWindows(corpus_of(100), 8, True, 0), 4, seed=3)
    with pytest.raises(CheckpointError, match="same data"):
        b.load_state_dict(a.state_dict())


def test_validation_split_by_document_is_seeded():
    docs = [f"doc {i}" for i in range(20)]
    tr1, va1 = split_documents_for_validation(docs, 0.2, seed=1)
    tr2, va2 = split_documents_for_validation(docs, 0.2, seed=1)
    _, va3 = split_documents_for_validation(docs, 0.2, seed=2)
    assert va1 == va2 and len(va1) == 4 and set(tr1) | set(va1) == set(docs) and not set(tr1) & set(va1)
    assert va1 != va3


def test_spec_quickstart_data_gives_a_window_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        dp = psannLMDataPrep(["hello world", "goodnight moon"], tokenizer="auto", max_length=256, pack_sequences=True)
    assert len(dp.train_windows) == 1
    assert "very small corpus" in caplog.text
    x, y = dp.train_windows.batch(np.array([0]))
    n = int((y != IGNORE_INDEX).sum())
    assert n == dp.train_corpus.n_tokens - 1 and (y[0, n:] == IGNORE_INDEX).all()


def test_documents_are_wrapped_in_bos_eos():
    dp = psannLMDataPrep(["abc", "de"], tokenizer="char", max_length=16, val_split=0)
    tok = dp.tokenizer
    assert dp.train_corpus.tokens.tolist() == [tok.bos_id, *tok.encode("abc"), tok.eos_id,
                                               tok.bos_id, *tok.encode("de"), tok.eos_id]


def test_file_corpus_is_a_uint16_memmap(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one story here.\n\nanother story there.\n\nthird.", encoding="utf-8")
    dp = psannLMDataPrep([str(f)], tokenizer="char", max_length=8, val_split=0, doc_separator="\n\n",
                         cache_dir=str(tmp_path / "cache"))
    assert isinstance(dp.train_corpus.tokens, np.memmap) and dp.train_corpus.tokens.dtype == np.uint16
    assert dp.train_corpus.n_docs == 3 and (tmp_path / "cache" / "train.bin").exists()
    assert not list((tmp_path / "cache").glob("*.tmp"))


@pytest.mark.parametrize("texts,match", [
    ([], "no texts"),
    (["", "   "], "empty"),
    (["missing/file.txt"], "not found"),
])
def test_bad_texts_are_clear(texts, match):
    with pytest.raises(DataError, match=match):
        psannLMDataPrep(texts, tokenizer="char")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        psannLMDataPrep([tmp_path], tokenizer="char")


def test_unknown_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="sentencepiece"):
        psannLMDataPrep(["hello"], tokenizer="sentencepeice")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, caplog):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xe9 au lait \xff\xfe ok \xef\xbf\xbd literal")
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        text = read_text_file(f)
    assert "3 invalid UTF-8" in caplog.text and "first at byte 3" in caplog.text
    assert text.count("\ufffd") == 4  # three replacements + one literal U+FFFD that was valid


def test_dickens_real_bad_bytes(caplog):
    path = shared_file("prose/dickens.txt")
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        text = read_text_file(path)
    assert "8 invalid UTF-8" in caplog.text and "166668" in caplog.text
    assert len(text) > 9_000_000


def test_doc_separator_names_mean_the_same_in_every_reader(tmp_path):
    from psann.lm.data.text import iter_documents, split_documents

    text = "one story<|endoftext|>two\n\nthree"
    assert split_documents(text, "eot") == split_documents(text, "<|endoftext|>") == ["one story", "two\n\nthree"]
    assert split_documents(text, "blank") == ["one story<|endoftext|>two", "three"]
    assert split_documents(text, "none") == [text]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert list(iter_documents([tmp_path / "a.txt"], "eot")) == ["one story", "two\n\nthree"]
