"""A checkpoint in other shapes: a copy (`--out-ckpt DIR`), one PyTorch file (`--out-ckpt X.pt`,
read back by `load_exported`), and an export bundle for a model hub (`--export-dir DIR`).

An export bundle is a complete psann-lm checkpoint (model.safetensors, config.json, tokenizer/,
sealed by its manifest, so `psannLM.load(DIR)` and every command read it) plus, beside them:
    tokenizer.json, special_tokens_map.json   the tokenizer in Hugging Face's format, when it has one
    metadata.json                             what the model is: family, size, tokenizer, training
    README.md                                 a model card whose front matter the hub reads
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from psann import __version__

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..files import fsync_file, read_json, temp_name
from ..models import build_model
from ..tokenizers import load_tokenizer, tokenizer_fingerprint
from .checkpoint import (CONFIG, FORMAT, STATE, TOKENIZER, WEIGHTS, load_torch, published_as, read_checkpoint_config,
                         resolve_checkpoint, save_torch, verify_checkpoint, writing)

HF_TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")


def copy_checkpoint(source: str | os.PathLike, directory: str | os.PathLike, add=None) -> Path:
    """The weights, config and tokenizer of checkpoint `source` (verified) copied to `directory`,
    sealed and published like a save (an existing one is replaced only once the copy is complete).
    `add(source, tmp)` may write more files into the copy before it is sealed."""
    source, directory = resolve_checkpoint(source), Path(directory)
    verify_checkpoint(source, WEIGHTS, CONFIG, TOKENIZER)
    tmp = temp_name(directory)
    with published_as(directory, tmp), writing(tmp):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        shutil.copy2(source / WEIGHTS, tmp / WEIGHTS)
        shutil.copy2(source / CONFIG, tmp / CONFIG)
        shutil.copytree(source / TOKENIZER, tmp / TOKENIZER)
        if add is not None:
            add(source, tmp)
    return directory


def export_state_dict(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The weights of checkpoint `source` (verified) as one PyTorch file {"model": state dict,
    "config": the run config}, tensors and plain data only, so torch.load(weights_only=True) reads
    it. The tokenizer stays in the checkpoint directory, which the file names."""
    source, path = resolve_checkpoint(source), Path(path)
    verify_checkpoint(source, WEIGHTS, CONFIG)
    payload = {"model": load_file(source / WEIGHTS), "config": read_json(source / CONFIG, CheckpointError, "config"),
               "tokenizer_dir": str((source / TOKENIZER).resolve())}
    tmp = temp_name(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_torch(payload, tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer=None):
    """-> (model, tokenizer, run_config) from a file export_state_dict wrote. The tokenizer is
    `tokenizer` when given, else the checkpoint directory's the file names."""
    path = Path(path)
    payload = load_torch(path)
    payload = payload if isinstance(payload, dict) else {}
    meta = payload.get("config")
    if not (isinstance(payload.get("model"), dict) and isinstance(meta, dict) and meta.get("format") == FORMAT):
        raise CheckpointError(f"{path} is not a psann-lm weights file (expected the 'model' and 'config' that "
                              "--out-ckpt X.pt writes); for a checkpoint directory pass the directory.")
    try:
        config = RunConfig.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its config does not validate ({exc}).") from exc
    model = build_model(config.model)
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes: {str(exc)[:300]}") from None
    state = model.state_dict()
    stored = {state[k].data_ptr() for k in payload["model"] if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in stored]  # a tied weight is stored once
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}).")
    if tokenizer is None:
        source = Path(str(payload.get("tokenizer_dir", "")))
        if not source.is_dir():
            raise CheckpointError(f"{path} names its tokenizer at {source}, which is not here; give the tokenizer "
                                  "(e.g. tokenizer_model_path=tokenizer.json).")
        tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{config.model.vocab_size}; it is not the tokenizer these weights were trained with.")
    return model.to(device), tokenizer, config


def _hf_tokenizer(tokenizer, saved: Path, out: Path) -> list[str]:
    """Write `tokenizer` in Hugging Face's format into `out`; -> the files written (none for kinds
    that have no tokenizer.json: byte, char, sentencepiece)."""
    if tokenizer.kind == "bpe":
        tokenizer.to_hf(out)
    elif tokenizer.kind == "tokenizers":
        for name in HF_TOKENIZER_FILES:
            shutil.copy2(saved / name, out / name)
    else:
        return []
    return list(HF_TOKENIZER_FILES)


def _metadata(source: Path, tokenizer, hf_files: list[str]) -> dict:
    config = read_checkpoint_config(source)
    model = config.model
    state = json.loads((source / STATE).read_text(encoding="utf-8")) if (source / STATE).is_file() else {}
    return {"format": "psann-lm-export", "psann_version": __version__, "base": model.base,
            "objective": model.objective, "vocab_size": model.vocab_size, "max_seq_len": model.max_seq_len,
            "d_model": model.d_model, "n_layers": model.n_layers,
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer_fingerprint(tokenizer),
                          "vocab_size": tokenizer.vocab_size, "hf_files": hf_files},
            "trained": {"steps": state.get("step"), "tokens_seen": state.get("tokens_seen")},
            "source_checkpoint": str(source.resolve())}


def _model_card(meta: dict, name: str) -> str:
    tokenizer = meta["tokenizer"]
    hf = ("`tokenizer.json` + `special_tokens_map.json` load with `tokenizers.Tokenizer.from_file`."
          if tokenizer["hf_files"] else f"The {tokenizer['kind']} tokenizer is in `tokenizer/` (psann-lm's format).")
    trained = meta["trained"]
    return (f"---\nlibrary_name: psann-lm\ntags:\n- psann-lm\n- {meta['base']}\n- {meta['objective']}\n---\n\n"
            f"# {name}\n\nA psann-lm {meta['base']} language model ({meta['objective']} objective, "
            f"{meta['n_layers']} layers, width {meta['d_model']}, context {meta['max_seq_len']}, vocabulary "
            f"{meta['vocab_size']}), trained for {trained['steps']} steps on {trained['tokens_seen']} tokens.\n\n"
            f"```python\nfrom psann.lm import psannLM\n\nlm = psannLM.load(\"{name}\")\nprint(lm.generate(\"Once upon a "
            f"time\"))\n```\n\n{hf} `metadata.json` holds the details.\n")


def export_bundle(source: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write the bundle of checkpoint `source` to `directory` (replaced only once complete)."""
    def add(checkpoint: Path, tmp: Path) -> None:
        tokenizer = load_tokenizer(checkpoint / TOKENIZER)
        meta = _metadata(checkpoint, tokenizer, _hf_tokenizer(tokenizer, checkpoint / TOKENIZER, tmp))
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(meta, Path(directory).name), encoding="utf-8")

    return copy_checkpoint(source, directory, add)
