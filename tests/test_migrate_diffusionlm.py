"""The diffusionlm document's console scripts (seed 004), driven by their TOML layouts: tokenizer,
memmaps, masked-diffusion training (single process and the DDP entry point), inference, and
--print-config on all."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.migrate import diffusionlm as dl
from psann.lm.migrate import diffusionlm_bench as bdl
from psann.lm.tokenizers.bpe import BPETokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "diffusionlm"
TINY = """
[model]
context_length = 32
d_model = 32
num_layers = 1
num_heads = 2
d_ff = 64
device = "cpu"
dtype = "float32"
noise_epsilon = 1e-3

[optimizer]
lr = 3e-3
warmup_iters = 1

[training]
batch_size = 4
max_iters = 4
eval_interval = 2
eval_iters = 2
out_dir = "runs/diffusionlm"

[data]
np_dat_train_path = "data/train.dat"
total_train_tokens = {total}
np_dat_valid_path = "data/valid.dat"

[logging]
backend = "console"
architecture = "TransformerLM"
dataset = "TinyStoriesV2-GPT4"
log_norms = true

[wandb]
entity = "your-entity"
project = "your-project"
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The example tokenizer and make-data TOMLs run as written (paths relative to the directory)."""
    root = tmp_path_factory.mktemp("diffusionlm")
    stories = generate_stories(160, seed=5)
    (root / "data").mkdir()
    (root / "data/TinyStoriesV2-GPT4-train.txt").write_text("<|endoftext|>".join(stories[:140]), encoding="utf-8")
    (root / "data/valid.txt").write_text("<|endoftext|>".join(stories[140:]), encoding="utf-8")
    tokenizer = (EXAMPLES / "train_tokenizer.toml").read_text().replace("vocab_size = 10000", "vocab_size = 400")
    (root / "train_tokenizer.toml").write_text(tokenizer)
    shutil.copy(EXAMPLES / "make_data.toml", root / "make_data.toml")
    valid = (EXAMPLES / "make_data.toml").read_text().replace("TinyStoriesV2-GPT4-train.txt", "valid.txt")
    (root / "make_valid.toml").write_text(valid.replace("data/train.dat", "data/valid.dat"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert dl.train_tokenizer_main(["--config", "train_tokenizer.toml"]) == 0
        assert dl.make_data_main(["--config", "make_data.toml"]) == 0
        assert dl.make_data_main(["--config", "make_valid.toml"]) == 0
    return root


def test_tokenizer_and_memmaps_from_their_tomls(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert (workdir / "bpe_tokenizer/vocab.json").is_file() and (workdir / "bpe_tokenizer/merges.txt").is_file()
    ids = np.fromfile(workdir / "data/train.dat", dtype=np.uint16)  # a raw memmap, no header
    tok = BPETokenizer.from_files(workdir / "bpe_tokenizer/vocab.json", workdir / "bpe_tokenizer/merges.txt")
    assert ids.tolist() == tok.encode((workdir / "data/TinyStoriesV2-GPT4-train.txt").read_text(encoding="utf-8"))
    assert (workdir / "data/train.tokenizer").is_dir()
    capsys.readouterr()
    assert dl.make_data_main(["--config", "make_data.toml"]) == 0  # a rerun replaces the file and says its size
    assert json.loads(capsys.readouterr().out)["tokens"] == len(ids)


def test_train_and_infer_from_their_tomls(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    total = (workdir / "data/train.dat").stat().st_size // 2
    (workdir / "train.toml").write_text(TINY.format(total=total))
    assert dl.train_main(["--config", "train.toml", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["toml"]["optimizer"]["weight_decay"] == 0.1  # the layout's defaults, filled in
    assert printed["psann"]["model"]["objective"] == "diffusion" and printed["psann"]["train"]["batch_tokens"] == 128
    assert dl.train_main(["--config", "train.toml"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"kind"')]
    train_lines = [line for line in lines if line["kind"] == "train"]  # the console backend: JSON lines for jq
    assert train_lines and {"loss", "lr", "grad_l2_norm", "weight_l2_norm", "act_rms.blocks.0"} <= set(
        train_lines[-1]["metrics"])
    run = workdir / "runs/diffusionlm"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    infer = (EXAMPLES / "infer.toml").read_text().replace("gen_length = 64", "gen_length = 8")
    (workdir / "infer.toml").write_text(infer.replace("steps = 64", "steps = 8").replace("block_length = 32",
                                                                                            "block_length = 4"))
    capsys.readouterr()
    assert dl.infer_main(["--config", "infer.toml"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"]["prompt"] == "Once upon a time" and isinstance(line["text"]["output"], str)
    assert line["params"]["temperature"] == 0.0 and line["params"]["eos_token_id"] is not None
    assert line["params"]["block_length"] == 4 and line["metrics"]["latency_ms"] > 0
    (workdir / "bad_mask.toml").write_text(infer.replace("# mask_id = 10000", "mask_id = 3"))
    assert dl.infer_main(["--config", "bad_mask.toml"]) == 2
    assert "was trained with mask token" in capsys.readouterr().err
    _benchmarks_from_their_tomls(workdir, capsys)


def _benchmarks_from_their_tomls(workdir, capsys):
    """bench_infer_latency (with the perplexity summary over the validation memmap) and bench_tokenizer."""
    bench = (EXAMPLES / "bench_infer.toml").read_text().replace("gen_length = 64", "gen_length = 8")
    bench = bench.replace("steps = 64", "steps = 8").replace("block_length = 32", "block_length = 4")
    bench = bench.replace("repeats = 5", "repeats = 3").replace("data/tinystories_valid.dat", "data/valid.dat")
    total = (workdir / "data/valid.dat").stat().st_size // 2
    (workdir / "bench_infer.toml").write_text(bench.replace("# total_val_tokens = 123456", f"total_val_tokens = {total}"))
    assert bdl.infer_latency_main(["--config", "bench_infer.toml"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    timed = [line for line in lines if line["kind"] == "bench_infer"]
    assert len(timed) == 3 and all(t["metrics"]["forward_passes"] == 8 for t in timed)  # one pass per step
    summary = next(line for line in lines if line["kind"] == "bench_infer_summary")
    assert summary["params"]["steps"] == 8 and summary["params"]["block_length"] == 4
    # block 1 reads 4 masked positions, then 3, 2, 1 of them as the canvas fills; block 2 the same
    assert 0 < summary["metrics"]["avg_mask_ratio"] < 1 and summary["metrics"]["tokens_per_s_median"] > 0
    ppl = next(line for line in lines if line["kind"] == "perplexity")["metrics"]
    assert ppl["perplexity_bound"] > 1 and ppl["tokens"] > 0
    (workdir / "bench_wrong.toml").write_text(bench.replace("# total_val_tokens = 123456", "total_val_tokens = 5"))
    assert bdl.infer_latency_main(["--config", "bench_wrong.toml"]) == 2
    assert f"holds {total} tokens" in capsys.readouterr().err

    text = (EXAMPLES / "bench_tokenizer.toml").read_text().replace("tokenizer/", "bpe_tokenizer/")
    (workdir / "bench_tokenizer.toml").write_text(text.replace("data/tinystories_valid.txt", "data/valid.txt"))
    assert bdl.tokenizer_main(["--config", "bench_tokenizer.toml"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["metrics"]["round_trip"] and line["metrics"]["tokens"] == total
    assert line["metrics"]["encode_bytes_per_s"] > 0 and line["metrics"]["decode_tokens_per_s"] > 0
    (workdir / "bench_both.toml").write_text(text.replace('text_path = "data/tinystories_valid.txt"',
                                                          'text_path = "x"\ntexts = ["y"]'))
    assert bdl.tokenizer_main(["--config", "bench_both.toml"]) == 2
    assert "one of the two" in capsys.readouterr().err


def test_ddp_entry_point_shards_the_optimizer_state(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    text = (EXAMPLES / "train_ddp.toml").read_text()
    (workdir / "ddp.toml").write_text(text)
    assert dl.train_ddp_main(["--config", "ddp.toml", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["psann"]["train"]["optimizer"] == "zero_adamw"
    (workdir / "ddp_nccl.toml").write_text(text.replace('backend = "gloo"', 'backend = "nccl"'))
    assert dl.train_ddp_main(["--config", "ddp_nccl.toml", "--print-config"]) == 2
    assert "[ddp].backend='nccl' with [model].device='cpu'; use gloo" in capsys.readouterr().err


def test_unknown_keys_wrong_totals_and_missing_files_are_named(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (workdir / "typo.toml").write_text("[model]\nd_modle = 32\n")
    assert dl.train_main(["--config", "typo.toml"]) == 2
    assert "unknown key [model].d_modle. Did you mean 'd_model'?" in capsys.readouterr().err
    (workdir / "total.toml").write_text(TINY.format(total=7))
    assert dl.train_main(["--config", "total.toml"]) == 2
    assert "total_train_tokens=7 but data/train.dat holds" in capsys.readouterr().err
    assert dl.infer_main(["--config", "missing.toml"]) == 2
    assert "--config missing.toml not found" in capsys.readouterr().err


def test_console_scripts_are_installed_and_print_their_config():
    script = Path(sys.executable).parent / "diffusionlm-train"
    if not script.exists():
        pytest.skip("the package's console scripts are not installed in this environment")
    out = subprocess.run([str(script), "--config", str(EXAMPLES / "train.toml"), "--print-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["toml"]["logging"]["dataset"] == "TinyStoriesV2-GPT4"


def test_ddp_entry_point_under_torchrun_with_two_ranks(workdir, tmp_path):
    """The document's command, torchrun --nproc-per-node 2 $(which diffusionlm-train-ddp), on gloo:
    two ranks train with the AdamW state sharded, and only rank 0 prints and writes."""
    script = Path(sys.executable).parent / "diffusionlm-train-ddp"
    if not script.exists():
        pytest.skip("the package's console scripts are not installed in this environment")
    text = TINY.format(total=(workdir / "data/train.dat").stat().st_size // 2).replace("log_norms = true", "")
    text = text.replace("max_iters = 4", "max_iters = 2").replace("eval_interval = 2", "eval_interval = 0")
    (tmp_path / "ddp.toml").write_text(text.replace('out_dir = "runs/diffusionlm"', f'out_dir = "{tmp_path / "run"}"')
                                       + '\n[ddp]\nbackend = "gloo"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "--config", str(tmp_path / "ddp.toml")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind"')]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [2]  # rank 0 only, once
    summary = json.loads(done.stdout[done.stdout.index("{\n"):])
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp" and summary["steps"] == 2
    config = json.loads((tmp_path / "run/checkpoints/final/config.json").read_text())["config"]
    assert config["train"]["optimizer"] == "zero_adamw"
