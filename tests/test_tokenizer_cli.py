"""`psannlm tokenizer train | encode | stats`, driven as a user would."""

import json
import os
import subprocess
import sys

import numpy as np

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.tokenizers import load_tokenizer


def psannlm(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "psann.cli", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_encode_stats(tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "<|endoftext|>".join(generate_stories(120, seed=9)) + " tail 🙂\n\n  spaces"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "tok"
    trained = json.loads(psannlm("tokenizer", "train", "--input", str(corpus), "--vocab-size", "500",
                                 "--special-token", "<|endoftext|>", "--out", str(out)).stdout)
    # 256 bytes, <|endoftext|>, the four chat tokens reserved by default and BOS/PAD, all within --vocab-size
    assert trained["special_tokens"] == ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                         "<|bos|>", "<|pad|>"]
    assert trained["merges"] == 500 - 263 and (out / "vocab.json").exists() and (out / "merges.txt").exists()
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and tok.vocab_size == trained["vocab_size"] == 500
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])[0] == tok.special_token_ids["<|user|>"]

    ids_path = tmp_path / "ids.npy"
    encoded = json.loads(psannlm("tokenizer", "encode", "--tokenizer", str(out), "--input", str(corpus),
                                 "--out", str(ids_path)).stdout)
    ids = np.load(ids_path)
    assert ids.dtype == np.uint16 and encoded["tokens"] == len(ids)
    assert ids.tolist() == tok.encode(text)
    assert not list(tmp_path.glob("*.tmp*"))

    stats = json.loads(psannlm("tokenizer", "stats", "--tokenizer", str(out), "--input", str(corpus),
                               "--docs", "10").stdout)
    assert stats["docs"] == 10 and 2.0 < stats["bytes_per_token"] < 8.0

    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    sample = generate_stories(1, seed=99)[0]
    assert hf.encode(sample).ids == tok.encode(sample)


def test_bad_input_is_named(tmp_path):
    missing = psannlm("tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                      "--out", str(tmp_path / "t"), check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr
    small = tmp_path / "s.txt"
    small.write_text("hello", encoding="utf-8")
    too_small = psannlm("tokenizer", "train", "--input", str(small), "--vocab-size", "100",
                        "--out", str(tmp_path / "t"), check=False)
    assert too_small.returncode == 2 and "--vocab-size 100 is too small" in too_small.stderr
    assert "at least 263" in too_small.stderr
