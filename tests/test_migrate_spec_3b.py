"""The 3B plan's one-command target (seed 001) at tiny size: scripts/train_psann_lm.py with
--hf-tokenizer-repo/--hf-tokenizer-filename (read from a local Hugging Face cache the test
builds, offline), --data-manifest, and --out-ckpt .../final_model.pt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from psann.lm.data.demo_corpus import generate_stories
from psann.lm.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REPO, COMMIT = "acme/tiny-tokenizer", "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(cache: Path, texts: list[str]) -> None:
    """The layout huggingface_hub reads: models--ORG--NAME/{refs/main, snapshots/<commit>/FILES}."""
    pytest.importorskip("huggingface_hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    tok = build_tokenizer("tokenizers", texts, vocab_size=300)
    tok.save(cache.parent / "saved_tok")
    (snapshot / "tokenizer.json").write_bytes((cache.parent / "saved_tok" / "tokenizer.json").read_bytes())
    (snapshot / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                  "pad_token": "<pad>", "unk_token": "<unk>"}))


def test_target_command_with_a_hub_tokenizer_a_manifest_and_a_pt_file(tmp_path):
    stories = generate_stories(80, seed=4)
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard_{i}.txt")
        shards[-1].write_text("<|endoftext|>".join(stories[i::2]), encoding="utf-8")
    (tmp_path / "manifest.txt").write_text("\n".join(map(str, shards)) + "\n")
    _hf_cache(tmp_path / "hub", stories)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONUNBUFFERED="1")
    out = tmp_path / "runs/psann_3b"
    cmd = [sys.executable, "scripts/train_psann_lm.py", "--base", "waveresnet", "--d-model", "32", "--n-layers", "1",
           "--n-heads", "2", "--tokenizer-backend", "tokenizers", "--hf-tokenizer-repo", REPO,
           "--hf-tokenizer-filename", "tokenizer.json", "--data-manifest", str(tmp_path / "manifest.txt"),
           "--max-length", "32", "--batch-tokens", "128", "--max-steps", "2", "--checkpoint-dir", str(out),
           "--out-ckpt", str(out / "final_model.pt"), "--exact-dedup", "--preflight",
           "--train.device=cpu", "--train.amp=fp32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, _, rest = proc.stdout.partition("\n")
    assert json.loads(first)["preflight"]["round_trip"] == "ok"
    assert json.loads(rest)["out_ckpt"] == str(out / "final_model.pt")
    payload = torch.load(out / "final_model.pt", weights_only=True)  # plain tensors and data: no code runs
    weights = load_file(out / "checkpoints/final/model.safetensors")
    assert set(payload["model"]) == set(weights) and all(torch.equal(payload["model"][k], weights[k]) for k in weights)
    assert payload["config"]["config"]["model"]["base"] == "waveresnet"
    assert (out / "data/index.json").is_file()  # the manifest was built into token shards with the hub tokenizer
    index = json.loads((out / "data/index.json").read_text())
    assert index["tokenizer_kind"] == "tokenizers" and "exact_dedup" in index["filters"]


def test_a_repo_missing_from_the_offline_cache_is_named(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    cmd = [sys.executable, "scripts/train_psann_lm.py", "--hf-tokenizer-repo", "acme/missing", "--print-config"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot get tokenizer.json of acme/missing" in proc.stderr


def test_filters_without_a_given_tokenizer_and_a_failing_preflight_stop_loudly(tmp_path):
    (tmp_path / "a.txt").write_text("naïve café " * 20, encoding="utf-8")
    (tmp_path / "m.txt").write_text(str(tmp_path / "a.txt") + "\n")
    base = [sys.executable, "scripts/train_psann_lm.py", "--data-manifest", str(tmp_path / "m.txt"),
            "--checkpoint-dir", str(tmp_path / "run"), "--max-steps", "1"]
    proc = subprocess.run([*base, "--english"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the filters run while --data-manifest is built" in proc.stderr
    tok = build_tokenizer("char", ["plain ascii text only"])  # no 'ï' or 'é': they come back as unknown
    tok.save(tmp_path / "char_tok")
    proc = subprocess.run([*base, "--tokenizer-model-path", str(tmp_path / "char_tok"), "--preflight"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "do not survive encode -> decode" in proc.stderr
    assert not (tmp_path / "run" / "data").exists()  # stopped before anything was built
