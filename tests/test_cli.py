"""The command line, driven as a user would: subprocesses with real arguments."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The spec's CPU quickstart config through `python -m psann.lm.train.cli`, shortened by overrides."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run("-m", "psann.lm.train.cli", "--config", "examples/lm/configs/waveresnet_cpu.yaml",
               "--train.max_steps=12", "--train.eval_interval_steps=6", "--model.n_layers=2",
               f"--train.checkpoint_dir={out}", "--train.progress=false")
    return out, json.loads(proc.stdout)


def test_train_cli_honours_config_and_overrides(trained_run):
    out, summary = trained_run
    assert summary["steps"] == 12 and Path(summary["final_checkpoint"]).is_dir()
    saved = json.loads((out / "checkpoints/final/config.json").read_text())["config"]
    assert saved["model"]["n_layers"] == 2 and saved["train"]["max_steps"] == 12
    assert saved["train"]["lr"] == 2e-3 and saved["data"]["max_length"] == 128  # from the YAML file
    val = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert [r["step"] for r in val] == [6, 12]
    assert (out / "data" / "index.json").exists()  # data.cache_dir (a token-shard build) defaults into the run


def test_generate_cli(trained_run):
    out, _ = trained_run
    proc = run("-m", "psann.cli", "generate", "--ckpt", str(out / "checkpoints/final"), "--prompt", "Once upon",
               "--prompt", "The cat", "--num-samples", "2", "--max-new-tokens", "8", "--seed", "1")
    assert proc.stdout.count("--- 'Once upon'") == 2 and proc.stdout.count("--- 'The cat'") == 2
    prompts = out / "prompts.txt"
    prompts.write_text("First prompt\n\nSecond prompt\n", encoding="utf-8")
    proc = run("-m", "psann.cli", "generate", "--ckpt", str(out / "checkpoints/final"), "--prompt-file", str(prompts),
               "--max-new-tokens", "4")
    assert "--- 'First prompt'" in proc.stdout and "--- 'Second prompt'" in proc.stdout and proc.stdout.count("--- ") == 2
    greedy = [run("-m", "psann.cli", "generate", "--ckpt", str(out / "checkpoints/final"), "--prompt", "A",
                  "--temperature", "0", "--max-new-tokens", "8").stdout for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_eval_cli(trained_run):
    out, _ = trained_run
    proc = run("-m", "psann.cli", "eval", "--ckpt", str(out / "checkpoints/final"), "--data",
               "examples/lm/sample_texts.txt", "--json")
    result = json.loads(proc.stdout)
    assert result["tokens"] > 1000 and 0 < result["loss"] < 10 and result["bits_per_byte"] > 0
    assert 0 < result["accuracy"] <= result["top5_accuracy"] <= 1 and result["utf8_valid"] is None  # not a byte model
    # BPB spreads the token loss over the bytes: summed nats / ln 2 / bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])


def test_print_config_and_errors():
    proc = run("-m", "psann.cli", "train", "--config", "examples/lm/configs/waveresnet_cpu.yaml",
               "--train.lr=5e-4", "--print-config")
    assert "lr: 0.0005" in proc.stdout and "d_model: 128" in proc.stdout
    bad = run("-m", "psann.cli", "train", "--config", "examples/lm/configs/waveresnet_cpu.yaml",
              "--train.learning_rate=1", check=False)
    assert bad.returncode == 2 and "unknown key 'train.learning_rate'" in bad.stderr
    missing = run("-m", "psann.cli", "generate", "--ckpt", "no/such/dir", "--prompt", "x", check=False)
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr
    bad_arg = run("-m", "psann.cli", "train", "--learning-rate", "1", check=False)
    assert bad_arg.returncode == 2 and "--train.lr=3e-4" in bad_arg.stderr


def test_demo_smoke(tmp_path):
    proc = run("-m", "psann.cli", "demo", "--out", str(tmp_path / "demo"), "--corpus-bytes", "200000",
               "--train.max_steps=6", "--train.eval_interval_steps=3", "--generate.max_new_tokens=10",
               "--train.progress=false", "--chat", "4")
    assert "=== samples ===" in proc.stdout and "validation loss" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["steps"] == 6 and summary["corpus_bytes"] >= 200000
    assert (tmp_path / "demo" / "loss_curve.png").exists()
    # --chat: fine-tuned on story requests, then a two-turn conversation
    assert proc.stdout.count("assistant> ") == 2 and "user> Tell me a story about Lily" in proc.stdout
    chat = json.loads((Path(summary["chat_checkpoint"]) / "config.json").read_text())["config"]
    assert chat["train"]["max_steps"] == 4 and chat["data"]["sft_files"][0].endswith("demo_chat.jsonl")


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "psannlm"]
    assert ep.value == "psann.cli:main"


def test_run_tests_script_keeps_artefacts(tmp_path):
    """scripts/run_tests.py: pytest's exit code, and stdout.log, junit.xml, summary.json, system.json."""
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_three.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n\n"
        "@pytest.mark.skip(reason='shown')\ndef test_skipped():\n    pass\n", encoding="utf-8")
    out = tmp_path / "report"
    proc = run("scripts/run_tests.py", "--out", str(out), "--", str(tests), "-q", "-p", "no:cacheprovider", check=False)
    assert proc.returncode == 1 and "1 failed, 1 passed, 1 skipped" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["counts"] == {"tests": 3, "passed": 1, "failed": 1, "errors": 0,
                                                                "skipped": 1}
    assert "1 failed, 1 passed, 1 skipped" in (out / "stdout.log").read_text()
    system = json.loads((out / "system.json").read_text())
    assert system["versions"]["torch"] and system["device"]["type"] in ("cpu", "cuda")
    report = json.loads((out / "pytest_report.json").read_text())  # pytest-json-report, in the dev extra
    assert report["summary"] == {"passed": 1, "failed": 1, "skipped": 1, "total": 3, "collected": 3}


def test_gpu_validation_checks_have_names_and_only_picks_them():
    listed = run("scripts/run_gpu_validation.py", "--list").stdout.split()
    assert [name for name in listed if name.startswith("GPU-")] == ["GPU-01", "GPU-02", "GPU-03", "GPU-04"]
    bad = run("scripts/run_gpu_validation.py", "--only", "GPU-03,GPU-09", check=False)
    assert bad.returncode == 2 and "unknown check(s) GPU-09" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        only = run("scripts/run_gpu_validation.py", "--only", "GPU-03")
        assert "no CUDA device" in only.stdout and "GPU-03" in only.stdout


def test_the_library_configures_no_output_and_python_m_psann_runs_the_cli():
    """Importing psann.lm adds a NullHandler only; the commands set up their stderr lines."""
    code = ("import logging, psann.lm, psann.lm.api\n"
            "handlers = logging.getLogger('psann.lm').handlers\n"
            "assert [type(h).__name__ for h in handlers] == ['NullHandler'], handlers\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    done = subprocess.run([sys.executable, "-m", "psann", "tokenizer", "stats", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage: psannlm tokenizer stats" in done.stdout


def test_cli_conventions_help_overrides_suggestions_and_print_config(capsys):
    from psann.cli import main
    from psann.lm.config import config_keys

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for section, field, _ in config_keys():  # every key, with its type and default, from the validation metadata
        assert f"--{section}.{field.name}  {field.type} (default " in help_text
    assert main(["train", "--train.lr", "3e-4", "--model.n_layers=3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.0003" in printed and "n_layers: 3" in printed  # both override spellings
    with pytest.raises(SystemExit):
        main(["trian"])
    assert "Did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", "x", "--temprature", "1"])
    assert "Did you mean '--temperature'?" in capsys.readouterr().err
    assert main(["train", "--train.lrr=3", "--print-config"]) == 2
    assert "Did you mean 'lr'?" in capsys.readouterr().err
    assert main(["tokenizer", "--print-config"]) == 0  # a group lists its subcommands' options
    assert {"train", "encode", "stats"} <= set(json.loads(capsys.readouterr().out))
