"""The CS336-style document's commands (seed 003), as written, on psannlm: BPE training with
LOG_LEVEL, tokenizing to a uint16 .npy from vocab.json + merges.txt, training on .npy arrays
with its flags, and bytes/token over two corpora."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from psann.cli import main as psannlm
from psann.lm.data.demo_corpus import generate_stories
from psann.lm.errors import DataError
from psann.lm.tokenizers.bpe import BPETokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """TinyStories-like train/valid files and a 10k-style vocab/merges pair named as CS336 names them."""
    root = tmp_path_factory.mktemp("cs336")
    stories = generate_stories(240, seed=3)
    (root / "data").mkdir()
    (root / "data/TinyStoriesV2-GPT4-train.txt").write_text(EOT.join(stories[:200]), encoding="utf-8")
    (root / "data/TinyStoriesV2-GPT4-valid.txt").write_text(EOT.join(stories[200:]), encoding="utf-8")
    assert psannlm(["tokenizer", "train", "--input", str(root / "data/TinyStoriesV2-GPT4-train.txt"),
                    "--vocab-size", "400", "--out", str(root / "tok")]) == 0
    (root / "bpe_tokenizer").mkdir()
    vocab = root / "bpe_tokenizer/TinyStoriesV2-GPT4-train.txt-10k_vocab.json"
    merges = root / "bpe_tokenizer/TinyStoriesV2-GPT4-train.txt-10k_merges.txt"
    shutil.copy(root / "tok/vocab.json", vocab)
    shutil.copy(root / "tok/merges.txt", merges)
    return root, vocab, merges


def _tokenize(root, vocab, merges, split):
    out = root / f"output/file/npy/TinyStoriesV2-GPT4-{split}-10k.npy"
    assert psannlm(["tokenizer", "encode", "--input", str(root / f"data/TinyStoriesV2-GPT4-{split}.txt"),
                    "--vocab", str(vocab), "--merges", str(merges), "--output", str(out)]) == 0
    return out


def test_tokenize_dataset_writes_uint16_ids_from_vocab_and_merges(corpus, capsys):
    root, vocab, merges = corpus
    out = _tokenize(root, vocab, merges, "valid")
    ids = np.load(out)
    tok = BPETokenizer.from_files(vocab, merges)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode((root / "data/TinyStoriesV2-GPT4-valid.txt").read_text(encoding="utf-8"))
    assert EOT in tok.decode(ids.tolist(), skip_special_tokens=False)  # story boundaries kept as the special token
    assert json.loads(capsys.readouterr().out)["tokenizer"].endswith("TinyStoriesV2-GPT4-valid-10k.tokenizer")


def test_train_on_npy_arrays_with_the_documents_flags(corpus, tmp_path, monkeypatch):
    root, vocab, merges = corpus
    train, val = _tokenize(root, vocab, merges, "train"), _tokenize(root, vocab, merges, "valid")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--train_data", str(train), "--val_data", str(val), "--wandb", "--out_dir", "runs/tinystories_run",
            "--device", "cpu", "--batch_size", "4", "--max_iters", "4", "--lr", "5e-4",
            # tiny sizes through the same script's own model flags
            "--context_length", "32", "--d_model", "32", "--num_layers", "1", "--num_heads", "2", "--d_ff", "64",
            "--eval_interval", "2", "--eval_iters", "2"]
    assert psannlm(argv) == 0
    run = tmp_path / "runs/tinystories_run"
    saved = json.loads((run / "checkpoints/final/config.json").read_text())["config"]
    assert saved["train"]["max_steps"] == 4 and saved["train"]["lr"] == 5e-4 and saved["train"]["batch_tokens"] == 4 * 32
    assert saved["data"]["train_token_files"] == [str(train)] and saved["model"]["d_mlp"] == 64
    assert "wandb" in saved["train"]["loggers"] and list((run / "wandb").glob("offline-run-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    from psann.lm import psannLM

    lm = psannLM.load(run / "checkpoints/final")
    assert lm.tokenizer.vocab_size == BPETokenizer.from_files(vocab, merges).vocab_size


def test_cs336_model_shape_is_the_default_without_a_config(corpus, capsys):
    import yaml

    root, vocab, merges = corpus
    train = _tokenize(root, vocab, merges, "valid")
    capsys.readouterr()
    assert psannlm(["train", "--train_data", str(train), "--batch_size", "64", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["d_mlp"]) == (512, 4, 16, 1344)
    assert config["data"]["max_length"] == 256 and config["train"]["batch_tokens"] == 64 * 256


def test_a_token_array_is_one_packed_stream(corpus):
    from psann.lm import psannLMDataPrep
    from psann.lm.config import DataConfig

    root, vocab, merges = corpus
    train = _tokenize(root, vocab, merges, "valid")
    ids = np.load(train)
    dp = psannLMDataPrep(config=DataConfig(train_token_files=[str(train)], max_length=32))
    x, y = dp.train_windows.batch([0, 1])
    assert x[0].tolist() == ids[:32].tolist() and y[0].tolist() == ids[1:33].tolist()
    assert x[1, 0] == ids[32] and dp.sampling == "random"  # drawn at random starts, as get_batch does


def test_token_arrays_without_their_tokenizer_or_with_foreign_ids_are_refused(corpus, tmp_path):
    from psann.lm import psannLMDataPrep
    from psann.lm.config import DataConfig

    root, vocab, merges = corpus
    np.save(tmp_path / "ids.npy", np.array([1, 2, 3], np.uint16))
    with pytest.raises(DataError, match="no tokenizer for .*ids.npy"):
        psannLMDataPrep(config=DataConfig(train_token_files=[str(tmp_path / "ids.npy")]))
    np.save(tmp_path / "big.npy", np.array([1, 60000], np.uint16))
    with pytest.raises(DataError, match="token id 60000, outside the tokenizer's"):
        psannLMDataPrep(config=DataConfig(train_token_files=[str(tmp_path / "big.npy")],
                                          tokenizer_model_path=str(root / "tok")))
    with pytest.raises(DataError, match="nope.npy not found"):
        psannLMDataPrep(config=DataConfig(train_token_files=[str(tmp_path / "nope.npy")]))


def test_bytes_per_token_over_two_corpora(corpus, capsys):
    root, vocab, merges = corpus
    train, valid = root / "data/TinyStoriesV2-GPT4-train.txt", root / "data/TinyStoriesV2-GPT4-valid.txt"
    assert psannlm(["tokenizer", "stats", "--input", str(train), "--vocab", str(vocab), "--merges", str(merges),
                    "--owt-text", str(valid), "--owt-vocab", str(vocab), "--owt-merges", str(merges),
                    "--n", "5", "--seed", "42"]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert [c["docs"] for c in report["corpora"]] == [5, 5]
    tok = BPETokenizer.from_files(vocab, merges)
    first = report["corpora"][0]
    assert first["bytes_per_token"] == round(first["bytes"] / first["tokens"], 3) and first["vocab_size"] == tok.vocab_size
    summary = printed.err.strip().splitlines()[-1]  # the sentence the document asks for, on stderr
    assert "TinyStoriesV2-GPT4-train.txt (" in summary and "(5 sampled docs, seed 42)" in summary


def test_bpe_training_logs_top_pairs_at_debug_only(corpus, caplog):
    root, _, _ = corpus
    text = root / "data/TinyStoriesV2-GPT4-valid.txt"
    with caplog.at_level(logging.INFO, logger="psann.lm"):
        psannlm(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--out", str(root / "info_tok")])
    assert "pre-tokens" in caplog.text and "top 10" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="psann.lm"):
        psannlm(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--out", str(root / "debug_tok")])
    assert "top 10 pre-token splits" in caplog.text and "merges, " in caplog.text and "merge 1:" in caplog.text


def test_log_level_environment_variable_sets_the_level(corpus):
    root, _, _ = corpus
    argv = [sys.executable, "-c", "import sys; from psann.cli import main; sys.exit(main(sys.argv[1:]))", "tokenizer",
            "train", "--input", str(root / "data/TinyStoriesV2-GPT4-valid.txt"), "--vocab-size", "280",
            "--out", str(root / "env_tok")]
    debug = subprocess.run(argv, env={**os.environ, "LOG_LEVEL": "DEBUG"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 0 and "top 10 pre-token splits" in debug.stderr
    info = subprocess.run(argv, env={**os.environ, "LOG_LEVEL": "INFO"}, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "pre-tokens" in info.stderr and "top 10" not in info.stderr
