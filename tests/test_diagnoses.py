"""Bad input to generate, chat, eval and tokenizer gets a diagnosis: exit code 2 and an `error: ...`
line that names the problem, the flag the user typed and the fix; never a traceback, never a score
for nothing."""

import io
import json

import pytest
import torch

from psann.cli import main
from psann.lm.config import ModelConfig, RunConfig
from psann.lm.data.demo_corpus import generate_stories
from psann.lm.data.tokens import write_documents
from psann.lm.data.shards import Windows
from psann.lm.data.shards import ShardedTokens
from psann.lm.errors import DataError
from psann.lm.eval.evaluate import evaluate_loss, evaluate_text, utf8_validity
from psann.lm.objectives import objective_for
from psann.lm.eval.mc import score_rows
from psann.lm.infer.chat import ChatSession, chat_loop
from psann.lm.models import build_model
from psann.lm.tokenizers import build_tokenizer, load_tokenizer
from psann.lm.train.checkpoint import save_checkpoint

TEXTS = ["little tom went to the market.", "ann bought three apples."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained tiny checkpoint: every check here fails before the weights matter."""
    tok = build_tokenizer("char", TEXTS)
    config = ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=32)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "c"
    save_checkpoint(directory, build_model(config), tok, RunConfig(model=config))
    return str(directory)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n\n\t \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café au lait\nolé\n".encode("latin-1"))
    (tmp_path / "text.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "adir").mkdir()
    return tmp_path


def fails(capfd, *argv) -> str:
    """Run `psannlm argv` expecting a diagnosis: exit 2, `error: ...` on stderr, no traceback."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err
    return err


# 1. nothing to score is an error, not perplexity 1.00
@pytest.mark.parametrize("name", ["empty.txt", "blank.txt"])
def test_eval_on_a_file_without_text_is_an_error(ckpt, files, capfd, name):
    err = fails(capfd, "eval", "--ckpt", ckpt, "--data", str(files / "text.txt"), str(files / name))
    assert f"--data {files / name} has no text to score" in err


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl"])
def test_eval_mc_on_a_file_without_rows_is_an_error(ckpt, files, capfd, name):
    err = fails(capfd, "eval", "mc", "--ckpt", ckpt, "--data", str(files / name), "--device", "cpu")
    assert f"{files / name} has no rows" in err


def test_python_evaluation_of_nothing_raises(ckpt, tmp_path):
    from psann.lm.train.checkpoint import load_checkpoint

    model, tok, config = load_checkpoint(ckpt, "cpu")
    for docs in ([], ["", "  \n"]):
        with pytest.raises(DataError, match="no text to score"):
            evaluate_text(model, tok, docs, objective_for(config.model), 4, torch.device("cpu"))
    write_documents(tmp_path, tok, {"train": []})
    empty = Windows(ShardedTokens(tmp_path), 32, pad_id=tok.pad_id)
    with pytest.raises(DataError, match="no text to score"):
        evaluate_loss(model, empty, 4, torch.device("cpu"))
    with pytest.raises(DataError, match="no questions to score"):
        score_rows(None, [], batch_size=4)
    with pytest.raises(DataError, match="no samples"):
        utf8_validity([])


# 2. prompt files
def test_prompt_file_problems_are_named(ckpt, files, capfd):
    err = fails(capfd, "generate", "--ckpt", ckpt, "--prompt-file", str(files / "blank.txt"))
    assert f"--prompt-file {files / 'blank.txt'} is empty" in err and "give --prompt" not in err
    err = fails(capfd, "generate", "--ckpt", ckpt, "--prompt-file", str(files / "nope.txt"))
    assert f"--prompt-file {files / 'nope.txt'} not found" in err
    err = fails(capfd, "generate", "--ckpt", ckpt, "--prompt-file", str(files / "adir"))
    assert "is a directory" in err
    err = fails(capfd, "generate", "--ckpt", ckpt, "--prompt-file", str(files / "latin1.txt"))
    assert f"--prompt-file {files / 'latin1.txt'} is not UTF-8 text (invalid byte at offset 3)" in err
    err = fails(capfd, "generate", "--ckpt", ckpt)
    assert "give --prompt TEXT" in err


# 3. --device, on every command that takes it
DEVICE_COMMANDS = [["generate", "--ckpt", "C", "--prompt", "x"], ["chat", "--ckpt", "C"],
                   ["eval", "--ckpt", "C", "--data", "D"], ["eval", "mc", "--ckpt", "C", "--data", "D"],
                   ["bench", "suite"], ["report", "R"]]


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_device_errors_name_device(ckpt, files, capfd, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [{"C": ckpt, "D": str(files / "text.txt"), "R": str(files)}.get(a, a) for a in command]
    err = fails(capfd, *argv, "--device", "cuda")
    assert "'--device' is cuda but no CUDA device is visible; use --device auto or cpu." in err
    assert "train.device" not in err
    err = fails(capfd, *argv, "--device", "gpu")
    assert "'--device' 'gpu' is not a device" in err


# 4. --vocab-size is the exact number of ids
@pytest.mark.parametrize("extra", [[], ["--no-chat-tokens"], ["--special-token", "<s>"]], ids=str)
@pytest.mark.parametrize("size", [270, 300])
def test_tokenizer_train_vocab_size_is_exact(files, capfd, extra, size):
    from tokenizers import Tokenizer

    corpus = files / "corpus.txt"
    corpus.write_text("<|endoftext|>".join(generate_stories(20, seed=3)), encoding="utf-8")
    out = files / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", str(size), "--out", str(out), *extra]) == 0
    report = json.loads(capfd.readouterr().out)
    tok = load_tokenizer(out)
    assert report["vocab_size"] == tok.vocab_size == size
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == size
    assert set(report["special_tokens"]) == set(tok.special_token_ids)  # the roles' tokens are counted too


def test_tokenizer_train_says_when_the_corpus_is_too_small(files, capfd, caplog):
    corpus = files / "corpus.txt"
    corpus.write_text("abab abab", encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(files / "t")]) == 0
    assert json.loads(capfd.readouterr().out)["vocab_size"] < 400
    assert "not the 400 of --vocab-size; train on more text" in caplog.text


# 5. --print-config
@pytest.mark.parametrize("command", [["tokenizer", "train"], ["tokenizer", "encode"], ["tokenizer", "stats"],
                                     ["eval"], ["eval", "mc"], ["data", "build"]], ids=" ".join)
def test_print_config_needs_no_other_option(capfd, command):
    assert main([*command, "--print-config"]) == 0
    options = json.loads(capfd.readouterr().out)
    if command == ["tokenizer", "train"]:
        assert options["special_tokens"] == ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                             "<|bos|>", "<|pad|>"]


def test_print_config_shows_given_options(capfd):
    assert main(["tokenizer", "train", "--input", "a.txt", "--vocab-size", "512", "--out", "t", "--print-config"]) == 0
    options = json.loads(capfd.readouterr().out)
    assert options["vocab_size"] == 512 and options["input"] == ["a.txt"]


# 6. errors name the flag typed, not a config key
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0.0, got -1.0"),
    (["--top-p", "0"], "--top-p must be > 0.0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--steps", "4"], "--steps does not apply to a causal model's sampler"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be at least 1, got -3"),
    (["--num-samples", "0"], "argument --num-samples: must be at least 1, got 0"),
    (["--stop", ""], "--stop '' would end every reply"),
    (["--interactive"], "--interactive reads messages from the terminal"),
])
def test_generation_errors_name_the_flag(ckpt, capfd, flags, message):
    err = fails(capfd, "generate", "--ckpt", ckpt, "--prompt", "x", *flags)
    assert message in err and "generate." not in err


def test_chat_errors_name_the_flag_and_the_command(ckpt, capfd):
    err = fails(capfd, "chat", "--ckpt", ckpt, "--temperature", "-1")
    assert "--temperature must be >= 0.0" in err
    from psann.lm import psannLM

    out = io.StringIO()
    chat_loop(ChatSession(psannLM.load(ckpt), max_new_tokens=2), stdin=io.StringIO("/temp -1\n/quit\n"), out=out)
    assert "cannot set temperature to '-1': /temp must be >= 0.0" in out.getvalue()


def test_tokenizer_errors_name_the_flag(files, capfd):
    err = fails(capfd, "tokenizer", "train", "--input", str(files / "text.txt"), "--vocab-size", "100",
                "--out", str(files / "t"))
    assert "--vocab-size 100 is too small" in err and "at least 263" in err
    err = fails(capfd, "tokenizer", "train", "--input", str(files / "text.txt"), "--vocab-size", "300",
                "--num-workers", "0", "--out", str(files / "t"))
    assert "argument --num-workers: must be at least 1" in err


def test_checkpoint_problems_are_diagnosed(files, capfd):
    err = fails(capfd, "generate", "--ckpt", str(files / "nope"), "--prompt", "x")
    assert "checkpoint not found" in err
    err = fails(capfd, "eval", "--ckpt", str(files / "adir"), "--data", str(files / "text.txt"))
    assert str(files / "adir") in err


# 7. other bad input that used to end in a traceback or a silent wrong answer
def test_eval_data_problems(ckpt, files, capfd, caplog):
    err = fails(capfd, "eval", "--ckpt", ckpt, "--data", str(files / "missing"))  # was scored as the text "missing"
    assert f"--data {files / 'missing'} not found" in err
    err = fails(capfd, "eval", "--ckpt", ckpt, "--data", str(files / "adir"))
    assert "is a directory" in err
    err = fails(capfd, "eval", "--ckpt", ckpt, "--data", str(files / "text.txt"), "--batch-size", "0")
    assert "argument --batch-size: must be at least 1, got 0" in err
    # invalid UTF-8 is replaced with a warning, as in training
    assert main(["eval", "--ckpt", ckpt, "--data", str(files / "latin1.txt"), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["tokens"] > 0
    assert "2 invalid UTF-8 byte sequence(s) replaced" in caplog.text


def test_eval_mc_non_utf8_file(ckpt, files, capfd):
    err = fails(capfd, "eval", "mc", "--ckpt", ckpt, "--data", str(files / "latin1.txt"), "--device", "cpu")
    assert f"{files / 'latin1.txt'} is not UTF-8 text (invalid byte at offset" in err


def test_tokenizer_output_and_input_problems(files, capfd, caplog):
    corpus = files / "text.txt"
    (files / "afile").write_text("x", encoding="utf-8")
    err = fails(capfd, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(files / "afile"))
    assert f"--out {files / 'afile'} is a file" in err
    tok = files / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "270", "--out", str(tok)]) == 0
    err = fails(capfd, "tokenizer", "encode", "--tokenizer", str(tok), "--input", str(corpus), "--out", str(files / "adir"))
    assert f"--out {files / 'adir'} is a directory" in err
    err = fails(capfd, "tokenizer", "stats", "--tokenizer", str(tok), "--input", str(files / "blank.txt"))
    assert "has no text to measure" in err
    assert main(["tokenizer", "encode", "--tokenizer", str(tok), "--input", str(files / "latin1.txt"),
                 "--out", str(files / "ids.npy")]) == 0
    assert "2 invalid UTF-8 byte sequence(s) replaced" in caplog.text


def test_chat_reads_non_utf8_input_with_replacement(ckpt):
    from psann.lm import psannLM

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n/quit\n"), encoding="utf-8")  # strict, as in a UTF-8 locale
    out = io.StringIO()
    assert chat_loop(ChatSession(psannLM.load(ckpt), max_new_tokens=2), stdin=stdin, out=out) == 0
    assert "assistant> " in out.getvalue()
