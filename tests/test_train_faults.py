"""Fault injection on the training run: non-finite steps, resumes that do not match, two writers,
replayed metrics, runs that fail before they start, and (slow) a run killed at random moments."""

import csv
import json
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import TrainConfig, load_config
from psann.lm.errors import BusyError, ConfigError, TrainingError
from psann.lm.train.resume import latest_checkpoint
from psann.lm.objectives.causal import CausalLM

ROOT = Path(__file__).resolve().parents[1]
TEXT = [f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
        enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "owl", "soft")] * 30)]
TINY = dict(d_model=32, n_layers=1, n_heads=4)
FAST = dict(amp="fp32", progress=False, plot=False, log_interval_steps=1, eval_interval_steps=0, device="cpu",
            batch_tokens=64, lr=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def dp():
    return psannLMDataPrep(TEXT, tokenizer="char", max_length=16, val_split=0.1, seed=0)


def all_finite(directory) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(Path(directory) / "model.safetensors").values())


def records(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("key,value", [("train.lr", "nan"), ("train.lr", "inf"), ("train.grad_clip", "-inf"),
                                       ("model.init_std", "nan"), ("model.sine_params", "{w0: .nan}"),
                                       ("train.betas", "[0.9, .inf]")])
def test_nan_and_inf_in_a_float_config_value_name_the_key(key, value):
    with pytest.raises(ConfigError, match=r"must be a finite number") as err:
        load_config(None, [f"--{key}={value}"])
    assert key.split(".")[1] in str(err.value)
    with pytest.raises(ConfigError, match="'train.lr' must be a finite number"):
        TrainConfig(lr=math.nan)


def _poison_losses(monkeypatch, bad_steps):
    """The loss of the steps in `bad_steps` (1-based; a callable or a set) comes out NaN."""
    real, calls = CausalLM.loss_sum, {"n": 0}
    is_bad = bad_steps if callable(bad_steps) else bad_steps.__contains__

    def loss_sum(self, logits, y, smoothing=0.0):
        calls["n"] += 1  # one micro-batch per step here
        total = real(self, logits, y, smoothing)
        return total * math.nan if is_bad(calls["n"]) else total

    monkeypatch.setattr(CausalLM, "loss_sum", loss_sum)


def test_a_non_finite_step_is_skipped_and_counted(dp, tmp_path, monkeypatch):
    _poison_losses(monkeypatch, {3})
    optimizer_steps = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: optimizer_steps.append(1))
    try:
        # AdamW: one optimizer to count (Muon's default pairs two)
        psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path), max_steps=6, save_interval_steps=1, optimizer="adamw",
                            **FAST)
    finally:
        handle.remove()
    assert len(optimizer_steps) == 5  # six steps; the poisoned one never reached the optimizer
    train = records(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 4, 5, 6] and train[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in train)
    a, b = (load_file(tmp_path / f"checkpoints/step_000000{i}/model.safetensors") for i in (2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped step changed no weight
    assert json.loads((tmp_path / "checkpoints/final/trainer_state.json").read_text())["skipped_steps"] == 1


def test_a_run_that_stays_non_finite_stops_and_leaves_the_last_good_checkpoint(dp, tmp_path, monkeypatch):
    _poison_losses(monkeypatch, lambda n: n >= 4)
    with pytest.raises(TrainingError, match=r"stopped at step 6: 3 steps in a row .*train.max_bad_steps=3.*lower train.lr"):
        psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path), max_steps=20, save_interval_steps=2, max_bad_steps=3,
                            **FAST)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["step_0000002", "step_0000004"]  # the stop comes before step 6's save
    assert all(all_finite(tmp_path / "checkpoints" / n) for n in names)
    assert latest_checkpoint(tmp_path).name == "step_0000004"


def test_a_diverging_learning_rate_stops_with_an_error_and_saves_nothing_non_finite(tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "t.txt").write_text("\n".join(TEXT), encoding="utf-8")
    config.write_text(f"model: {{d_model: 32, n_layers: 1, n_heads: 4}}\ndata: {{train_files: [{tmp_path / 't.txt'}], "
                      f"tokenizer: char, max_length: 16}}\ntrain: {{lr: 1.0e+6, max_steps: 60, batch_tokens: 64, "
                      f"warmup_steps: 0, save_interval_steps: 1, grad_clip: 0, progress: false, plot: false, amp: fp32, "
                      f"device: cpu, checkpoint_dir: {tmp_path / 'run'}}}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "psann.cli", "train", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: stopped at step" in proc.stderr and "non-finite" in proc.stderr
    saved = [p for p in (tmp_path / "run/checkpoints").iterdir() if not p.name.startswith(".")]
    assert saved and all(all_finite(p) for p in saved)
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "run"))


def _swapped_char_tokenizer(tokenizer, directory: Path) -> Path:
    """The same tokenizer with two ids swapped: same kind, same size, other ids."""
    tokenizer.save(directory)
    path = next(p for p in directory.iterdir() if p.suffix == ".json" and p.name != "tokenizer_config.json")
    data = json.loads(path.read_text())
    vocab = data["vocab"] if isinstance(data.get("vocab"), list) else data["chars"]
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]
    path.write_text(json.dumps(data))
    return directory


def test_resume_refuses_another_tokenizer_model_or_data(dp, tmp_path):
    psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "a"), max_steps=2, save_interval_steps=2, **FAST)
    step = str(tmp_path / "a/checkpoints/step_0000002")
    swapped = psannLMDataPrep(TEXT, tokenizer_model_path=str(_swapped_char_tokenizer(dp.tokenizer, tmp_path / "tok")),
                              max_length=16, val_split=0.1, seed=0)
    assert swapped.tokenizer.vocab_size == dp.tokenizer.vocab_size
    with pytest.raises(ConfigError, match="tokenizer .* is not the one"):
        psannLM(**TINY).fit(swapped, checkpoint_dir=str(tmp_path / "b"), resume_from=step, max_steps=4, **FAST)
    with pytest.raises(ConfigError, match=r"'model.n_layers' is 2 here but 1 in the checkpoint"):
        psannLM(**{**TINY, "n_layers": 2}).fit(dp, checkpoint_dir=str(tmp_path / "c"), resume_from=step, max_steps=4,
                                               **FAST)
    other_seed = psannLMDataPrep(TEXT, tokenizer="char", max_length=16, val_split=0.1, seed=5)
    with pytest.raises(ConfigError, match=r"'data.seed' is 5 here but 0 in the checkpoint.*train.init_from"):
        psannLM(**TINY).fit(other_seed, checkpoint_dir=str(tmp_path / "d"), resume_from=step, max_steps=4, **FAST)
    with pytest.raises(ConfigError, match="both set"):
        psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "e"), resume_from=step, init_from=step, max_steps=4,
                            **FAST)
    assert not any((tmp_path / n).exists() for n in "bcde")  # refused runs leave no directory behind


def test_resume_from_the_command_line_takes_the_checkpoints_settings(tmp_path):
    from psann.lm.train.cli import main as train_main

    (tmp_path / "t.txt").write_text("\n".join(TEXT), encoding="utf-8")
    files = psannLMDataPrep([tmp_path / "t.txt"], tokenizer="char", max_length=16, cache_dir=str(tmp_path / "cache"))
    psannLM(**TINY).fit(files, checkpoint_dir=str(tmp_path / "a"), max_steps=2, save_interval_steps=2, **FAST)
    step = tmp_path / "a/checkpoints/step_0000002"
    # no config file: the checkpoint holds the model and data settings
    assert train_main([f"--train.resume_from={step}", f"--train.checkpoint_dir={tmp_path / 'b'}", "--train.max_steps=3",
                       "--train.progress=false", "--train.plot=false", "--train.device=cpu"]) == 0
    saved = json.loads((tmp_path / "b/checkpoints/final/config.json").read_text())["config"]
    assert saved["model"] == json.loads((step / "config.json").read_text())["config"]["model"]
    assert json.loads((tmp_path / "b/checkpoints/final/trainer_state.json").read_text())["step"] == 3
    assert train_main([f"--train.resume_from={step}", f"--train.checkpoint_dir={tmp_path / 'c'}",
                       "--model.n_layers=3", "--train.device=cpu"]) == 2  # a named key that differs is refused


def test_resume_latest_without_a_run_directory_says_so(dp, tmp_path, monkeypatch, capsys):
    from psann.lm.train.cli import main as train_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="resume_from=latest needs train.checkpoint_dir"):
        psannLM(**TINY).fit(dp, resume_from="latest", max_steps=2, **FAST)
    assert train_main(["--train.resume_from=latest", "--data.train_files=[x.txt]"]) == 2
    assert "needs train.checkpoint_dir" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_training_leaves_no_stray_directory(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXT), encoding="utf-8")
    # batch_tokens below one window fails in the trainer, after the data cache was written in the run directory
    proc = subprocess.run([sys.executable, "-m", "psann.cli", "train", f"--data.train_files=[{tmp_path / 't.txt'}]",
                           "--data.tokenizer=char", "--data.max_length=16", "--train.batch_tokens=8",
                           "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=4", "--train.device=cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "batch_tokens" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("rope", [True, False])
def test_data_longer_than_the_model_context_is_a_config_error(dp, tmp_path, rope):
    with pytest.raises(ConfigError, match=r"'data.max_length' \(16\) is longer than .*'model.max_seq_len' \(8\)"):
        psannLM(**TINY, rope=rope, max_seq_len=8).fit(dp, checkpoint_dir=str(tmp_path), max_steps=1, **FAST)


HOLDER = textwrap.dedent("""
    import sys, time
    from psann.lm.files import DirectoryLock
    DirectoryLock(sys.argv[1], "training run").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_two_trainers_on_one_run_directory(dp, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"in use by another training run \(pid {holder.pid} on .*started"):
            psannLM(**TINY).fit(dp, checkpoint_dir=str(run), max_steps=1, **FAST)
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # a killed holder's lock file stays behind, and must not block the next run
        holder.wait()
    assert (run / ".lock").exists()
    psannLM(**TINY).fit(dp, checkpoint_dir=str(run), max_steps=1, **FAST)
    assert (run / "checkpoints/final").is_dir()


def test_a_resume_without_checkpoint_dir_locks_the_checkpoints_own_run(dp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    psannLM(**TINY).fit(dp, checkpoint_dir=str(run), max_steps=2, save_interval_steps=2, **FAST)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"pid {holder.pid}"):
            psannLM(**TINY).fit(dp, resume_from=str(run / "checkpoints/step_0000002"), max_steps=4, **FAST)
    finally:
        holder.kill()
        holder.wait()
    psannLM(**TINY).fit(dp, resume_from=str(run / "checkpoints/step_0000002"), max_steps=4, **FAST)
    assert json.loads((run / "checkpoints/final/trainer_state.json").read_text())["step"] == 4
    assert not (tmp_path / "runs").exists()  # the resumed run went on in its own directory


def test_resume_latest_from_the_command_line_after_a_kill_mid_swap(tmp_path):
    from psann.lm.train.cli import main as train_main

    (tmp_path / "t.txt").write_text("\n".join(TEXT), encoding="utf-8")
    run = tmp_path / "run"
    args = [f"--data.train_files=[{tmp_path / 't.txt'}]", "--data.tokenizer=char", "--data.max_length=16",
            "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=4", "--train.batch_tokens=64",
            "--train.device=cpu", "--train.progress=false", "--train.plot=false", f"--train.checkpoint_dir={run}",
            "--train.save_interval_steps=2"]
    assert train_main(args + ["--train.max_steps=2"]) == 0
    step = run / "checkpoints/step_0000002"
    step.rename(run / "checkpoints/.step_0000002.old-1-deadbeef")  # as a kill between the two renames leaves it
    assert train_main(args + ["--train.max_steps=3", "--train.resume_from=latest"]) == 0
    assert step.is_dir() and not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((run / "checkpoints/final/trainer_state.json").read_text())["step"] == 3


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path):
    from psann.lm.train.loggers import JsonlLogger

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
    logger = JsonlLogger(tmp_path, resume_step=2)
    logger.log({"kind": "train", "step": 3})
    logger.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def test_metrics_after_resume_hold_each_step_once(dp, tmp_path):
    opts = dict(FAST, max_steps=6, eval_interval_steps=2)
    psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path), save_interval_steps=3, **opts)
    psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path), resume_from=str(tmp_path / "checkpoints/step_0000003"),
                        **opts)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records(tmp_path, "val")] == [2, 4, 6]
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["kind"], r["step"]) for r in rows] == [("train", "1"), ("train", "2"), ("val", "2"), ("train", "3"),
                                                      ("train", "4"), ("val", "4"), ("train", "5"), ("train", "6"),
                                                      ("val", "6")]


# -- slow: a run killed at random moments ------------------------------------------------------
SOAK_STEPS = 200


def _soak_command(run_dir: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "psann.cli", "train", f"--data.train_files=[{corpus}]", "--data.tokenizer=char",
            "--data.max_length=32", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4",
            "--model.dropout=0.1", f"--train.max_steps={SOAK_STEPS}", "--train.batch_tokens=256",
            "--train.save_interval_steps=1", "--train.eval_interval_steps=25", "--train.log_interval_steps=1",
            "--train.progress=false", "--train.plot=false", "--train.device=cpu", "--train.amp=fp32",
            f"--train.checkpoint_dir={run_dir}"]


def _newest_step(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    steps = [int(p.name[5:]) for p in root.glob("step_*")] if root.exists() else []
    return max(steps, default=0)


@pytest.mark.slow
def test_a_run_killed_at_twenty_random_moments_ends_bit_identical(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 3), encoding="utf-8")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_soak_command(whole, corpus), check=True, capture_output=True, timeout=600)
    rng, kills = random.Random(0), 0
    while kills < 20:
        resume = ["--train.resume_from=latest"] if _newest_step(killed) else []
        before = _newest_step(killed)
        proc = subprocess.Popen(_soak_command(killed, corpus) + resume, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _newest_step(killed) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # training is under way once a new step is saved
        time.sleep(rng.uniform(0.0, 0.4))  # then die anywhere: mid-step, mid-save, mid-swap
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 20, f"the run finished after {kills} kills; make it longer"
    finished = subprocess.run(_soak_command(killed, corpus) + ["--train.resume_from=latest"], capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    a, b = (load_file(d / "checkpoints/final/model.safetensors") for d in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(killed)] == list(range(1, SOAK_STEPS + 1))
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
