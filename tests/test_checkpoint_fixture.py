"""Checkpoints written by an earlier psann-lm (tests/fixtures/checkpoints, made at commit bd13671 by
tests/fixtures/make_checkpoint_fixture.py) still load, generate the text they generated then, and
resume training. A failure here means a change broke existing checkpoints; regenerate the fixture
only when the checkpoint format version changes on purpose."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from psann.cli import main as psannlm
from psann.lm import psannLM, psannLMDataPrep
from psann.lm.errors import ConfigError

SCRIPT = Path(__file__).resolve().parent / "fixtures" / "make_checkpoint_fixture.py"
_spec = importlib.util.spec_from_file_location("make_checkpoint_fixture", SCRIPT)
made = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(made)  # TEXT, DATA, MODEL, TRAIN, ...: how the fixture was trained
EXPECTED = json.loads((made.OUT / "expected.json").read_text(encoding="utf-8"))
# Defaults that changed after the fixture was made: resuming its run takes the settings it ran with
# (test_resume_under_changed_defaults_names_the_key shows the error without them).
THEN = {"model": dict(qk_norm=False), "train": dict(optimizer="adamw", lr_schedule="cosine"),
        "data": dict(sampling="shuffle")}


def final(run: str) -> Path:
    return made.OUT / run / "checkpoints" / "final"


@pytest.mark.parametrize("run", list(made.RUNS))
def test_final_checkpoint_loads_and_generates_the_recorded_text(run):
    expected = EXPECTED["runs"][run]
    lm = psannLM.load(final(run))
    assert lm.num_parameters() == expected["num_parameters"]
    assert lm.generate(EXPECTED["prompt"], **expected["generate"]) == expected["text"]


@pytest.mark.parametrize("run", list(made.RUNS))
def test_generate_cli_prints_the_recorded_text(run, capsys):
    expected, prompt = EXPECTED["runs"][run], EXPECTED["prompt"]
    flags = [x for key, value in expected["generate"].items() for x in (f"--{key.replace('_', '-')}", str(value))]
    assert psannlm(["generate", "--ckpt", str(final(run)), "--prompt", prompt, *flags]) == 0
    assert capsys.readouterr().out == f"--- {prompt!r}\n{prompt}{expected['text']}\n\n"


def test_causal_run_resumes_from_its_step_checkpoint(tmp_path):
    run_dir = tmp_path / "causal"
    shutil.copytree(made.OUT / "causal", run_dir)  # never write into tests/fixtures
    step = run_dir / "checkpoints" / EXPECTED["step_checkpoint"]
    dp = psannLMDataPrep(made.TEXT, **{**made.DATA, **THEN["data"], "tokenizer_model_path": str(step / "tokenizer")})
    lm = psannLM(**made.MODEL, **THEN["model"], **made.RUNS["causal"]).fit(
        dp, resume_from=str(step), max_steps=made.MAX_STEPS + 2, checkpoint_dir=str(run_dir), **made.TRAIN, **THEN["train"])
    assert lm.last_run["steps"] == made.MAX_STEPS + 2
    state = json.loads((run_dir / "checkpoints/final/trainer_state.json").read_text(encoding="utf-8"))
    assert state["step"] == made.MAX_STEPS + 2
    before, after = load_file(step / "model.safetensors"), load_file(run_dir / "checkpoints/final/model.safetensors")
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the two steps trained


def test_resume_under_changed_defaults_names_the_key(tmp_path):
    run_dir = tmp_path / "causal"
    shutil.copytree(made.OUT / "causal", run_dir)
    step = run_dir / "checkpoints" / EXPECTED["step_checkpoint"]
    dp = psannLMDataPrep(made.TEXT, **{**made.DATA, "tokenizer_model_path": str(step / "tokenizer")})
    with pytest.raises(ConfigError, match="'model.qk_norm' is None here but False in the checkpoint"):
        psannLM(**made.MODEL).fit(dp, resume_from=str(step), max_steps=made.MAX_STEPS + 2,
                                  checkpoint_dir=str(run_dir), **made.TRAIN)
