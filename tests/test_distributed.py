"""Data parallelism on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 train exactly like one
process with the same global batch; distributed checkpoints resume under 2 ranks and under 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import run  # noqa: E402

from psann.lm.errors import ConfigError  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"


def torchrun(options: dict, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           json.dumps(options)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def val_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if r["kind"] == "val"]


def assert_close_weights(a_dir: Path, b_dir: Path, rel: float = 1e-5) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
        assert diff < rel, (k, float(diff))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    run({"checkpoint_dir": str(root / "single")})
    torchrun({"checkpoint_dir": str(root / "ddp")})
    torchrun({"checkpoint_dir": str(root / "fsdp"), "fsdp": "full_shard"})
    return root


def test_ddp_and_fsdp_match_one_process(runs):
    single = losses(runs / "single")
    assert len(single) == 6
    for mode in ("ddp", "fsdp"):
        assert losses(runs / mode) == pytest.approx(single, rel=1e-5), mode
        assert val_losses(runs / mode) == pytest.approx(val_losses(runs / "single"), rel=1e-5), mode
        assert_close_weights(runs / "single/checkpoints/final", runs / mode / "checkpoints/final")
    for mode in ("ddp", "fsdp"):
        state = json.loads((runs / mode / "checkpoints/final/trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["parallel"] == mode
    assert (runs / "fsdp/checkpoints/step_0000003/dcp").is_dir()
    assert not (runs / "fsdp/checkpoints/step_0000003/model.safetensors").exists()  # shards only


def test_sharded_checkpoint_resumes_under_two_ranks_and_one(runs, tmp_path):
    step3 = str(runs / "fsdp/checkpoints/step_0000003")
    torchrun({"checkpoint_dir": str(tmp_path / "two"), "fsdp": "full_shard", "resume_from": step3})
    run({"checkpoint_dir": str(tmp_path / "one"), "resume_from": step3})
    for resumed in ("two", "one"):
        assert losses(tmp_path / resumed) == pytest.approx(losses(runs / "fsdp")[3:], rel=1e-5), resumed
        assert_close_weights(runs / "fsdp/checkpoints/final", tmp_path / resumed / "checkpoints/final")


def test_resume_refuses_an_optimizer_whose_state_differs(runs, tmp_path):
    # auto is Muon in one process, but the FSDP run's state is AdamW's: named, not a missing-key error
    with pytest.raises(ConfigError, match="holds adamw's optimizer state .* train.optimizer=adamw"):
        run({"checkpoint_dir": str(tmp_path / "one"), "optimizer": "auto",
             "resume_from": str(runs / "fsdp/checkpoints/step_0000003")})


def test_ddp_muon_matches_one_process(tmp_path):
    run({"checkpoint_dir": str(tmp_path / "single"), "optimizer": "muon"})
    torchrun({"checkpoint_dir": str(tmp_path / "ddp"), "optimizer": "auto"})  # auto under DDP: Muon
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    # torch.optim.Muon orthogonalises in bf16, so the all-reduce's last-bit gradient differences show
    assert_close_weights(tmp_path / "single/checkpoints/final", tmp_path / "ddp/checkpoints/final", rel=1e-2)


def test_ddp_checkpoint_resumes_in_one_process(runs, tmp_path):
    run({"checkpoint_dir": str(tmp_path / "one"), "resume_from": str(runs / "ddp/checkpoints/step_0000003")})
    assert losses(tmp_path / "one") == pytest.approx(losses(runs / "ddp")[3:], rel=1e-5)
    assert_close_weights(runs / "ddp/checkpoints/final", tmp_path / "one/checkpoints/final")


def test_sharded_step_checkpoint_loads_for_inference(runs):
    from psann.lm import psannLM

    lm = psannLM.load(runs / "fsdp/checkpoints/step_0000003")
    reference = psannLM.load(runs / "fsdp/checkpoints/final")
    assert lm.num_parameters() == reference.num_parameters()
    assert not all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), reference.model.parameters()))
    assert lm.generate("the red", max_new_tokens=5, temperature=0)


@pytest.mark.parametrize("options", [{"fsdp": "shard_grad_op", "async_checkpoint": True}, {"fsdp": "hybrid"},
                                     {"optimizer": "zero_adamw"}],
                         ids=["shard_grad_op", "hybrid", "zero"])
def test_other_sharding_modes_match_one_process(runs, tmp_path, options):
    torchrun({"checkpoint_dir": str(tmp_path / "run"), **options})
    assert losses(tmp_path / "run") == pytest.approx(losses(runs / "single"), rel=1e-5)
    assert_close_weights(runs / "single/checkpoints/final", tmp_path / "run/checkpoints/final")
    if options.get("async_checkpoint"):  # the background save completed and was renamed into place
        assert (tmp_path / "run/checkpoints/step_0000006/dcp/.metadata").exists()
        assert not list((tmp_path / "run/checkpoints").glob(".*"))
    if "optimizer" in options:  # ZeRO state is gathered for the checkpoint and resumes in 2 ranks
        torchrun({"checkpoint_dir": str(tmp_path / "resumed"), **options,
                  "resume_from": str(tmp_path / "run/checkpoints/step_0000003")})
        assert_close_weights(tmp_path / "run/checkpoints/final", tmp_path / "resumed/checkpoints/final")


def test_dry_run_matches_a_hand_count(capsys):
    from psann.lm.train.cli import main

    # d=8, 1 layer, 2 heads, vocab 10, tied head, SwiGLU hidden 64, QK-norm:
    # embed 80 + norms 8+8+8 + q/k norms 4+4 + qkv 8x24 + out 8x8 + gate_up 8x128 + down 64x8 = 1904 parameters.
    n = 80 + 24 + 8 + 192 + 64 + 1024 + 512
    args = ["--base", "transformer", "--d-model", "8", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "10",
            "--max-length", "4", "--batch-tokens", "64", "--fsdp", "full_shard", "--world-size", "2", "--amp", "fp32",
            "--max-tokens", "1000000", "--gpu", "A100", "--mfu", "0.5", "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plan["parameters"] == n
    assert plan["flops_per_token"] == 6 * n + 12 * 1 * 8 * 4  # embedding counted once, as the tied head
    mem = plan["memory_gb_per_gpu"]
    gib = 2**30
    assert mem["params"] * gib == pytest.approx(4 * n / 2) and mem["grads"] * gib == pytest.approx(4 * n / 2)
    assert mem["optimizer"] * gib == pytest.approx(8 * n / 2)  # AdamW's two fp32 moments, sharded over 2
    assert plan["micro_batch_windows"] == 8  # 16 windows of 4 per step over 2 ranks
    # fp32 on A100: 19.5 TFLOP/s; time = tokens x FLOPs/token / (GPUs x peak x MFU)
    assert plan["days"] * 86400 == pytest.approx(1e6 * plan["flops_per_token"] / (2 * 19.5e12 * 0.5))


def test_dry_run_counts_muon_state_where_auto_picks_it(capsys):
    from psann.lm.train.cli import main

    # the model of test_dry_run_matches_a_hand_count in one process: Muon's one fp32 momentum on the
    # block matrices (qkv 192 + out 64 + gate_up 1024 + down 512), AdamW's two on the rest (112)
    args = ["--base", "transformer", "--d-model", "8", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "10",
            "--max-length", "4", "--batch-tokens", "64", "--amp", "fp32", "--max-tokens", "1000000", "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plan["optimizer"] == "muon"
    assert plan["memory_gb_per_gpu"]["optimizer"] * 2**30 == pytest.approx(4 * 1792 + 8 * 112)


def test_spec_flags_are_config_keys(capsys):
    from psann.lm.train.cli import main

    preset = Path(__file__).parents[1] / "examples/lm/configs/psann_3b.yaml"
    assert main(["--config", str(preset), "--base", "respsann", "--grad-accum-steps", "8",
                 "--fsdp", "hybrid", "--save-interval-steps", "500", "--print-config"]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["base"] == "respsann" and cfg["model"]["d_model"] == 3072
    assert cfg["train"]["grad_accum_steps"] == 8 and cfg["train"]["fsdp"] == "hybrid"
    assert cfg["train"]["save_interval_steps"] == 500 and cfg["train"]["grad_checkpoint"] is True


def test_data_manifest_builds_shards_then_trains_and_exports(tmp_path, capsys):
    from psann.lm import psannLM
    from psann.lm.data.demo_corpus import generate_stories
    from psann.lm.tokenizers.bpe import BPETokenizer
    from psann.lm.train.cli import main

    stories = generate_stories(120, seed=3)
    BPETokenizer.train(stories, vocab_size=400).save(tmp_path / "tok")
    for i in range(2):
        (tmp_path / f"shard{i}.txt").write_text("<|endoftext|>".join(stories[i::2]), encoding="utf-8")
    (tmp_path / "manifest.txt").write_text("shard0.txt\nshard1.txt\n", encoding="utf-8")
    run = tmp_path / "run"
    args = ["--data-manifest", str(tmp_path / "manifest.txt"), "--tokenizer-model-path", str(tmp_path / "tok"),
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--max-length", "32", "--batch-tokens", "128",
            "--max-steps", "2", "--checkpoint-dir", str(run), "--out-ckpt", str(tmp_path / "export"),
            "--train.progress=false", "--train.plot=false", "--train.device=cpu"]
    assert main(args) == 0
    index = json.loads((run / "data/index.json").read_text())
    assert len(index["sources"]) == 2 and index["tokens"]["train"] > 0
    assert f"path: {run}/data" in (run / "config.yaml").read_text()
    assert psannLM.load(tmp_path / "export").generate("Once", max_new_tokens=3, temperature=0) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_validation_exits_cleanly_without_cuda(tmp_path):
    script = Path(__file__).parents[1] / "scripts/run_gpu_validation.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA device" in done.stdout and not any(tmp_path.iterdir())
