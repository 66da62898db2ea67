import logging

import numpy as np
import pytest
import torch

from psann.lm import psannLMDataPrep
from psann.lm.data.tokens import write_documents
from psann.lm.data.shards import IGNORE_INDEX, Loader, Windows
from psann.lm.data.shards import ShardedTokens
from psann.lm.data.text import read_text_file
from psann.lm.data.tokens import split_documents_for_validation
from psann.lm.tokenizers import build_tokenizer
from psann.lm.errors import CheckpointError, ConfigError, DataError

from conftest import shared_file


def stream_of(directory, *doc_lengths):
    """A token-shard split of documents with these lengths, holding the ids 10, 11, 12, ..."""
    tokens = np.arange(sum(doc_lengths)) + 10
    docs = np.split(tokens, np.cumsum(doc_lengths)[:-1])
    write_documents(directory, build_tokenizer("byte"), {"train": [(d, np.ones(len(d), bool)) for d in docs]},
                    masked=True)
    return ShardedTokens(directory)


@pytest.mark.parametrize("n_tokens,expected", [(1, 0), (2, 1), (9, 1), (10, 2), (17, 2), (18, 3)])
def test_packed_window_count_has_no_off_by_one(tmp_path, n_tokens, expected):
    assert len(Windows(stream_of(tmp_path, n_tokens), 8)) == expected


def test_packed_windows_cover_every_target_exactly_once(tmp_path):
    data = stream_of(tmp_path, 7, 12, 6)
    w = Windows(data, 8)
    x, y = w.batch(np.arange(len(w)))
    targets = y[y != IGNORE_INDEX]
    assert targets.tolist() == data.read(1, data.n_tokens).tolist()
    assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])  # shifted once
    assert w.n_target_tokens == data.n_tokens - 1


def test_unpacked_windows_stay_inside_documents(tmp_path):
    w = Windows(stream_of(tmp_path, 5, 20), 8, "documents")
    assert len(w) == 1 + 3  # ceil(4/8) + ceil(19/8)
    x, y = w.batch(np.array([0]))
    assert y[0, :4].tolist() == [11, 12, 13, 14] and (y[0, 4:] == IGNORE_INDEX).all()
    assert (x[0, 4:] == 0).all()  # padded with pad id


def test_loader_state_resumes_exactly_and_spans_epochs(tmp_path):
    w = Windows(stream_of(tmp_path, 200), 8)  # 25 windows
    a = Loader(w, 4, seed=3)
    seq = [a.next_batch()[0] for _ in range(15)]  # 60 windows: crosses two epoch boundaries
    assert all(s.shape[0] == 4 for s in seq) and a.consumed == 60
    b = Loader(w, 4, seed=3)
    for _ in range(6):
        b.next_batch()
    c = Loader(w, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(seq[6 + i], c.next_batch()[0]) for i in range(9))
    seen = torch.cat(seq[:6] + [seq[6][:1]])[:25, 0]  # first epoch: each window exactly once
    assert len(set(seen.tolist())) == 25


def test_loader_refuses_state_from_other_data(tmp_path):
    a = Loader(Windows(stream_of(tmp_path / "a", 200), 8), 4, seed=3)
    b = Loader(Windows(stream_of(tmp_path / "b", 100), 8), 4, seed=3)
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
    assert n == dp.train_windows.data.n_tokens - 1 and (y[0, n:] == IGNORE_INDEX).all()


def test_documents_are_wrapped_in_bos_eos():
    dp = psannLMDataPrep(["abc", "de"], tokenizer="char", max_length=16, val_split=0)
    tok = dp.tokenizer
    data = dp.train_windows.data
    assert data.read(0, data.n_tokens).tolist() == [tok.bos_id, *tok.encode("abc"), tok.eos_id,
                                                    tok.bos_id, *tok.encode("de"), tok.eos_id]


def test_file_corpus_is_built_into_uint16_shards_in_the_cache(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one story here.\n\nanother story there.\n\nthird.", encoding="utf-8")
    dp = psannLMDataPrep([str(f)], tokenizer="char", max_length=8, val_split=0, doc_separator="\n\n",
                         cache_dir=str(tmp_path / "cache"))
    data = dp.train_windows.data
    assert data.directory == tmp_path / "cache" and data.dtype == np.uint16
    assert len(data.doc_starts()) == 3 and (tmp_path / "cache" / "train_00000.bin").exists()
    assert ShardedTokens(tmp_path / "cache").n_tokens == data.n_tokens  # a dataset `data.path` can name
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*.tmp-*"))


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


def test_loader_resumes_from_the_states_of_the_loaders_before_it(tmp_path):
    w = Windows(stream_of(tmp_path, 200), 8)
    ahead = Loader(w, 4, seed=3)
    for _ in range(2):
        ahead.next_batch()
    shuffled = Loader(w, 4, seed=3)  # a checkpoint written before the loaders were one
    shuffled.load_state_dict({"consumed": 8, "seed": 3, "n_windows": 25, "shuffle": True})
    assert torch.equal(shuffled.next_batch()[0], ahead.next_batch()[0])
    sequential = Loader(w, 4, seed=1, mode="sequential")
    sequential.load_state_dict({"kind": "shards", "mode": "sequential", "bos_aligned": False, "seed": 1,
                                "n_tokens": 200, "consumed": 4})
    assert sequential.next_batch()[0][0, 0] == 10 + 4 * 8  # the fifth window
    with pytest.raises(CheckpointError, match="mode='random'"):
        sequential.load_state_dict({"kind": "shards", "mode": "random", "bos_aligned": False, "seed": 1,
                                    "n_tokens": 200, "consumed": 4})


def test_a_target_mask_of_the_wrong_size_is_refused(tmp_path):
    stream_of(tmp_path, 20)
    mask = tmp_path / "train_00000.mask.bin"
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(DataError, match="target mask .*train_00000.mask.bin is missing or has the wrong size"):
        ShardedTokens(tmp_path)


def test_texts_become_a_temporary_token_shard_build_removed_with_the_data():
    import gc

    dp = psannLMDataPrep(["one story here.", "another story there."], tokenizer="char", max_length=8, val_split=0)
    directory = dp.train_windows.data.directory
    assert (directory / "index.json").exists() and (directory / "tokenizer").is_dir()
    del dp
    gc.collect()
    assert not directory.exists()


def test_data_prep_takes_texts_or_a_config(tmp_path):
    from psann.lm.config import DataConfig

    (tmp_path / "a.txt").write_text("one story here. another story there.", encoding="utf-8")
    config = DataConfig(train_files=[str(tmp_path / "a.txt")], tokenizer="char", max_length=8, val_split=0)
    by_config = psannLMDataPrep(config=config)
    by_texts = psannLMDataPrep([str(tmp_path / "a.txt")], tokenizer="char", max_length=8, val_split=0)
    assert torch.equal(by_config.train_windows.batch([0, 1])[0], by_texts.train_windows.batch([0, 1])[0])
    for args in ({}, {"texts": ["x y"], "config": config}):
        with pytest.raises(DataError, match="texts .* or a DataConfig"):
            psannLMDataPrep(**args)


def test_texts_can_be_drawn_at_random_window_starts():
    rng = np.random.default_rng(0)
    text = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, 3000))]
    dp = psannLMDataPrep(text, tokenizer="char", max_length=16, val_split=0, sampling="random")
    x, y = dp.make_loader(64, seed=0).next_batch()
    packed, _ = dp.train_windows.batch(np.arange(len(dp.train_windows)))
    on_boundaries = sum(bool((packed == row).all(1).any()) for row in x)
    assert on_boundaries < 16  # a random start falls on a packed window's boundary 1 time in 16
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ConfigError, match="packed token stream"):
        psannLMDataPrep(text, tokenizer="char", max_length=16, pack_sequences=False, sampling="random")
