"""The Simplified SLM guide's scripts (seed 002), as written with tiny sizes: prepare_tinystories.py
from a local file, train.py on the prepared directory (byte-level, its flags and defaults, its
logs), resuming from the run, and generate.py (single, batch, samples, interactive)."""

import csv
import io
import json
import sys

import pytest

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.migrate import slm

TINY_MODEL = {"model_type": "hgrn_bit", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1,
              "num_heads": 1, "expand_ratio": 1, "hidden_ratio": 2, "attn_mode": "fused_recurrent",
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slm")
    (root / "ts.txt").write_text("<|endoftext|>".join(generate_stories(120, seed=2)), encoding="utf-8")
    (root / "slm_tiny.json").write_text(json.dumps(TINY_MODEL))
    data = root / "data/tinystories_small"
    assert slm.prepare_main(["--output_dir", str(data), "--max_seq_length", "64", "--max_samples", "100",
                             "--input", str(root / "ts.txt")]) == 0
    out = root / "checkpoints/my_run"
    assert slm.train_main(["--model_config", str(root / "slm_tiny.json"), "--data_path", str(data), "--batch_size", "4",
                           "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--max_steps", "4",
                           "--warmup_steps", "1", "--scheduler", "linear", "--mixed_precision", "none",
                           "--eval_interval", "2", "--save_interval", "2", "--log_interval", "1",
                           "--output_dir", str(out)]) == 0
    return root, data, out


def test_prepare_writes_the_splits_and_prints_the_statistics(run, capsys):
    root, data, _ = run
    assert slm.prepare_main(["--output_dir", str(root / "again"), "--max_seq_length", "64", "--max_samples", "100",
                             "--input", str(root / "ts.txt")]) == 0
    printed = capsys.readouterr().out
    info = json.loads((data / "dataset_info.json").read_text())
    assert printed.startswith("Dataset Statistics\n==================\nNumber of original samples: ")
    assert f"Training sequences: {info['train']['sequences']:,}" in printed
    assert info["train"]["samples"] == 100 and info["validation"]["samples"] == 2 and info["max_seq_length"] == 64
    stories = (data / "train.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    assert len(stories) == 100 and info["train"]["bytes"] == sum(len(s.encode()) for s in stories)


def test_train_writes_its_logs_checkpoints_and_honours_its_flags(run):
    _, _, out = run
    saved = json.loads((out / "checkpoints/final/config.json").read_text())["config"]
    train = saved["train"]
    assert (train["micro_batch_size"], train["grad_accum_steps"], train["batch_tokens"]) == (4, 2, 4 * 2 * 64)
    assert train["lr_schedule"] == "linear" and train["weight_decay"] == 0.01 and train["amp"] == "fp32"
    assert saved["data"]["tokenizer"] == "byte" and (saved["model"]["base"], saved["model"]["layer_type"]) == ("byte", "hgrn_bit")
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "grad_norm", "bpb"} <= set(rows[0])
    assert float(rows[0]["bpb"]) == pytest.approx(float(rows[0]["loss"]) / 0.6931471805599453)
    evals = list(csv.DictReader(open(out / "eval_log.csv")))
    assert [int(r["step"]) for r in evals] == [2, 4] and "bpb" in evals[0]
    assert (out / "checkpoints/step_0000002").is_dir() and (out / "checkpoints/best").is_dir()
    assert list((out / "tensorboard").iterdir())


def test_resume_from_the_run_directory_and_refuse_pt_files(run, capsys):
    _, _, out = run
    assert slm.train_main(["--resume_from", str(out), "--max_steps", "6", "--batch_size", "4",
                           "--gradient_accumulation_steps", "2", "--mixed_precision", "none", "--log_interval", "1",
                           "--eval_interval", "2", "--save_interval", "2"]) == 0
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    train = json.loads((out / "checkpoints/final/config.json").read_text())["config"]["train"]
    assert train["batch_tokens"] == 4 * 2 * 64  # the checkpoint's context length, not the default
    capsys.readouterr()
    assert slm.train_main(["--resume_from", str(out / "step_5000.pt")]) == 2
    assert "checkpoints are directories" in capsys.readouterr().err


def test_generate_single_batch_samples_and_file(run, tmp_path, capsys):
    _, _, out = run
    (tmp_path / "prompts.txt").write_text("Once upon a time\nThe story begins\n", encoding="utf-8")
    assert slm.generate_main(["--model_path", str(out), "--prompt_file", str(tmp_path / "prompts.txt"),
                              "--output_file", str(tmp_path / "outputs.txt"), "--max_tokens", "6", "--seed", "0"]) == 0
    written = (tmp_path / "outputs.txt").read_text(encoding="utf-8").split("\n\n")
    assert written[0].startswith("Once upon a time") and written[1].startswith("The story begins")
    assert slm.generate_main(["--model_path", str(out), "--prompt", "The story begins", "--num_samples", "3",
                              "--max_tokens", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("The story begins") >= 3


def test_generate_defaults_and_interactive_continuation(run, monkeypatch, capsys):
    from psann.lm import psannLM

    _, _, out = run
    seen = {}
    real = psannLM.generate

    def spy(self, prompt, **options):
        seen.update(options)
        return real(self, prompt, **options)

    monkeypatch.setattr(psannLM, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/temp 0\n/topk x\nHello\n/quit\nnever read\n"))
    assert slm.generate_main(["--model_path", str(out), "--interactive", "--max_tokens", "5"]) == 0
    lines = capsys.readouterr()
    assert lines.out.count("Hello") == 2 and "error: /topk 'x'" in lines.err
    assert seen == {"max_new_tokens": 5, "temperature": 0.0, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.0}


def test_prepare_without_input_needs_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert slm.prepare_main(["--output_dir", str(tmp_path / "d"), "--max_samples", "10"]) == 2
    assert "roneneldan/TinyStories" in capsys.readouterr().err and not (tmp_path / "d" / "train.txt").exists()


def test_evaluate_model_writes_its_results(run, tmp_path):
    _, data, out = run
    assert slm.evaluate_main(["--model_path", str(out), "--data_dir", str(data),
                              "--output_dir", str(tmp_path / "evaluation_results")]) == 0
    results = json.loads((tmp_path / "evaluation_results/evaluation_results.json").read_text())
    assert {"bpb", "perplexity", "accuracy", "top5_accuracy", "utf8_validity"} <= set(results)
    assert 0 < results["bpb"] < 9 and 0 <= results["accuracy"] <= results["top5_accuracy"] <= 1
    assert results["data"].endswith("validation.txt") and results["model_path"].endswith("checkpoints/best")


def test_run_experiment_trains_evaluates_and_samples(run, tmp_path, monkeypatch):
    root, data, _ = run
    monkeypatch.chdir(tmp_path)
    experiment = {
        "experiment_name": "my_experiment",
        "model": {"config_file": str(root / "slm_tiny.json"), "type": "flat"},
        "data": {"data_dir": str(data), "max_seq_length": 64},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "max_steps": 2,
                     "warmup_steps": 1, "scheduler": "cosine", "mixed_precision": "none", "eval_interval": 1,
                     "save_interval": 1, "log_interval": 1},
        "output": {"checkpoint_dir": "./checkpoints/my_experiment", "log_dir": "./logs/my_experiment"},
        "generation": {"prompts": ["Once upon a time"], "max_tokens": 8},
    }
    (tmp_path / "my_experiment.json").write_text(json.dumps(experiment))
    assert slm.run_experiment_main(["--config", "my_experiment.json"]) == 0
    logs = tmp_path / "logs/my_experiment"
    assert [r["step"] for r in csv.DictReader(open(logs / "training_log.csv"))] == ["1", "2"]
    assert (logs / "eval_log.csv").is_file() and (logs / "tensorboard").is_dir()  # tensorboard is in the dev extra
    assert (tmp_path / "checkpoints/my_experiment/checkpoints/step_0000001").is_dir()
    results = tmp_path / "results/my_experiment"
    assert json.loads((results / "evaluation_results.json").read_text())["bpb"] > 0
    assert (results / "generations.txt").read_text(encoding="utf-8").startswith("Once upon a time")
    summary = json.loads((results / "experiment_summary.json").read_text())
    assert summary["experiment_name"] == "my_experiment" and summary["evaluation"]["bpb"] > 0
    experiment["model"]["type"] = "hnet_bit"
    (tmp_path / "wrong.json").write_text(json.dumps(experiment))
    assert slm.run_experiment_main(["--config", "wrong.json"]) == 2
    experiment["training"]["learning_rte"] = 1.0
    (tmp_path / "typo.json").write_text(json.dumps(experiment))
    assert slm.run_experiment_main(["--config", "typo.json"]) == 2


def test_a_directory_of_text_files_is_a_dataset(run, tmp_path):
    root, _, _ = run
    texts = tmp_path / "my_texts"
    texts.mkdir()
    for i, story in enumerate(generate_stories(20, seed=9)):
        (texts / f"story_{i:02d}.txt").write_text(story, encoding="utf-8")
    out = tmp_path / "run"
    assert slm.train_main(["--model_config", str(root / "slm_tiny.json"), "--data_path", str(texts), "--batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--max_steps", "2", "--warmup_steps", "1",
                           "--mixed_precision", "none", "--max_seq_length", "64", "--output_dir", str(out)]) == 0
    data = json.loads((out / "checkpoints/final/config.json").read_text())["config"]["data"]
    assert len(data["train_files"]) == 20 and data["val_split"] == 0.1 and data["max_length"] == 64
