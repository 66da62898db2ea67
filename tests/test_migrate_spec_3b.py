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
from psann.lm.errors import ConfigError
from psann.lm.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REPO, COMMIT = "acme/tiny-tokenizer", "0123456789abcdef0123456789abcdef01234567"


def _hub(cache: Path, files: dict[str, bytes], repo_id: str = REPO) -> None:
    """The layout huggingface_hub reads: models--ORG--NAME/{refs/main, snapshots/<commit>/FILES}."""
    pytest.importorskip("huggingface_hub")
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)


SPECIAL_MAP = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}).encode()


def _hf_cache(cache: Path, texts: list[str]) -> None:
    tok = build_tokenizer("tokenizers", texts, vocab_size=300)
    tok.save(cache.parent / "saved_tok")
    _hub(cache, {"tokenizer.json": (cache.parent / "saved_tok" / "tokenizer.json").read_bytes(),
                 "special_tokens_map.json": SPECIAL_MAP})


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
           "--out-ckpt", str(out / "final_model.pt"), "--exact-dedup", "--preflight", "--export-dir", str(out / "export"),
           "--train.device=cpu", "--train.amp=fp32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, _, rest = proc.stdout.partition("\n")
    assert json.loads(first)["preflight"]["round_trip"] == "ok"
    summary = json.loads(rest)
    assert summary["out_ckpt"] == str(out / "final_model.pt") and summary["export_dir"] == str(out / "export")
    payload = torch.load(out / "final_model.pt", weights_only=True)  # plain tensors and data: no code runs
    weights = load_file(out / "checkpoints/final/model.safetensors")
    assert set(payload["model"]) == set(weights) and all(torch.equal(payload["model"][k], weights[k]) for k in weights)
    assert payload["config"]["config"]["model"]["base"] == "waveresnet"
    assert (out / "data/index.json").is_file()  # the manifest was built into token shards with the hub tokenizer
    index = json.loads((out / "data/index.json").read_text())
    assert index["tokenizer_kind"] == "tokenizers" and "exact_dedup" in index["filters"]
    # the export bundle: a sealed checkpoint plus the HF tokenizer files, metadata and a model card
    bundle = out / "export"
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["base"] == "waveresnet" and meta["trained"]["steps"] == 2 and meta["tokenizer"]["kind"] == "tokenizers"
    assert (bundle / "README.md").read_text().startswith("---\nlibrary_name: psann-lm\n")
    from tokenizers import Tokenizer

    from psann.lm import psannLM

    hf_ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(stories[0], add_special_tokens=False).ids
    lm = psannLM.load(str(bundle))  # its manifest covers the added files too
    assert hf_ids == lm.tokenizer.encode(stories[0])
    assert json.loads((bundle / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


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


def test_lm_eval_custom_model_form_reads_a_pt_and_a_tokenizer_from_the_hub(tmp_path):
    """The plan's lm-eval example (--model custom, custom_model_class, hf_repo/hf_filename, tokenizer_*),
    run through scripts/run_lm_eval_psann.py: scores equal those of the checkpoint directory."""
    pytest.importorskip("lm_eval")
    from psann.lm.eval.harness import PsannLM, lm_eval_argv
    from psann.lm.train.exports import export_state_dict
    from test_eval_mc import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "c", tokenizer="tokenizers")
    export_state_dict(ckpt, tmp_path / "final.pt")
    _hub(tmp_path / "hub", {"psannlm_chat_final.pt": (tmp_path / "final.pt").read_bytes(),
                            "tokenizer_final/tokenizer.json": (Path(ckpt) / "tokenizer/tokenizer.json").read_bytes(),
                            "tokenizer_final/special_tokens_map.json": SPECIAL_MAP}, "acme/psannlm-chat")
    args = ("custom_model_class=psann_adapter.PSANNLM,hf_repo=acme/psannlm-chat,hf_filename=psannlm_chat_final.pt,"
            "tokenizer_backend=tokenizers,tokenizer_model_path=tokenizer_final/tokenizer.json,"
            "tokenizer_special_map_path=tokenizer_final/special_tokens_map.json")
    argv = lm_eval_argv(["--model", "custom", "--model_args", args, "--batch_size", "auto"], None, None, [])
    assert argv[argv.index("--model") + 1] == "psann"
    pairs = [("little tom went to the", " market"), ("little ann", " went home.")]
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:  # in this process: huggingface_hub read the environment at import
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        hub = PsannLM.create_from_arg_string(args, {"device": "cpu", "batch_size": "auto", "max_batch_size": 8})
        with pytest.raises(ConfigError, match="psann models only"):
            PsannLM.create_from_arg_string(args.replace("psann_adapter.PSANNLM", "my.Model"), {"device": "cpu"})
    assert hub.batch_size == 8  # nothing runs out of memory here: the search keeps its start
    local = PsannLM(ckpt=ckpt, device="cpu")
    assert hub.scorer.loglikelihood(pairs, 2) == local.scorer.loglikelihood(pairs, 2)
    with pytest.raises(ConfigError, match="beside the tokenizer"):
        PsannLM(ckpt=str(tmp_path / "final.pt"), device="cpu", tokenizer_model_path=str(Path(ckpt) / "tokenizer"),
                tokenizer_special_map_path=str(tmp_path / "elsewhere/special_tokens_map.json"))


def test_export_bundle_of_a_bpe_checkpoint_is_sealed_and_hf_readable(tmp_path):
    from tokenizers import Tokenizer

    from psann.lm.errors import CheckpointError
    from psann.lm.train.exports import export_bundle
    from psann.lm.train.checkpoint import verify_checkpoint
    from test_eval_mc import TEXTS, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "c")  # psann's own BPE: written as an HF tokenizer.json with equal ids
    bundle = export_bundle(ckpt, tmp_path / "bundle")
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["tokenizer"]["hf_files"] == ["tokenizer.json", "special_tokens_map.json"]
    assert meta["trained"] == {"steps": None, "tokens_seen": None}  # an untrained checkpoint says so
    from psann.lm.tokenizers import load_tokenizer

    psann_tok = load_tokenizer(bundle / "tokenizer")
    hf = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    assert all(hf.encode(t, add_special_tokens=False).ids == psann_tok.encode(t) for t in TEXTS[:5])
    verify_checkpoint(bundle)
    (bundle / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="metadata.json"):
        verify_checkpoint(bundle)
