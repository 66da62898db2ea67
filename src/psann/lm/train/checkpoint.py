"""Checkpoint directories: weights (safetensors), config (JSON), tokenizer, and training state.

Layout of a checkpoint directory:
    model.safetensors     weights (tied tensors stored once)
    config.json           format version + the resolved run config
    tokenizer/            the tokenizer's own files
    trainer_state.json    step, tokens seen, loader position, best val loss      (training checkpoints)
    optimizer.pt          optimizer / loss-scaler state and RNG states          (training checkpoints)

A checkpoint is written to a temporary sibling and renamed into place, so a crash never leaves
a half-written directory under the final name. Loading reads tensors only: safetensors for
weights and `torch.load(weights_only=True)` for optimizer state, so no pickled code ever runs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..tokenizers import load_tokenizer

FORMAT = "psann-lm-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, STATE, OPTIMIZER = "model.safetensors", "config.json", "tokenizer", "trainer_state.json", "optimizer.pt"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, tokenizer, config: RunConfig, *,
                    trainer_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically; an existing directory of the same name is replaced."""
    from psann import __version__

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_model(_unwrap(model), str(tmp / WEIGHTS))
        _write_json(tmp / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                   "psann_version": __version__, "config": config.to_dict()})
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            _write_json(tmp / STATE, trainer_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        if directory.exists():  # swap: old aside, new in, old removed
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def read_checkpoint_config(directory: str | os.PathLike) -> RunConfig:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}. Pass the directory written by training "
                              "(e.g. runs/<name>/checkpoints/final).")
    if not directory.is_dir():
        raise CheckpointError(f"a checkpoint is a directory (model.safetensors, config.json, tokenizer/); {directory} is a file.")
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}. "
                              "It may have been interrupted while copying; use another checkpoint of the run.")
    try:
        meta = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG} is not valid JSON ({exc}); the checkpoint is corrupt.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} was not written by psann-lm (config.json has no '{FORMAT}' marker).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format v{meta.get('format_version')} "
                              f"(psann-lm {meta.get('psann_version')}); this psann-lm reads v{FORMAT_VERSION}. "
                              "Install the psann-lm version that wrote it.")
    try:
        return RunConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: its config no longer validates ({exc}); it was written by an "
                              "incompatible psann-lm version.") from exc


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, run_config). The model is built from the stored config, then filled."""
    from ..models import build_model

    directory = Path(directory)
    config = read_checkpoint_config(directory)
    model = build_model(config.model)
    load_weights(model, directory)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{config.model.vocab_size}; the tokenizer directory does not belong to these weights.")
    return model.to(device), tokenizer, config


def load_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    path = Path(directory) / WEIGHTS
    try:
        missing, unexpected = load_model(_unwrap(model), str(path), strict=False)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read weights {path}: {exc}. The file is corrupt or truncated; "
                              "use another checkpoint.") from exc
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit the model built from its config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}).")


def load_training_state(directory: str | os.PathLike) -> tuple[dict, dict]:
    """-> (trainer_state, optimizer_state) for resuming."""
    directory = Path(directory)
    missing = [n for n in (STATE, OPTIMIZER) if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"{directory} cannot be resumed: missing {', '.join(missing)} (it holds weights only, "
                              "e.g. 'best'). Resume from a step_* or final checkpoint, or use train.init_from.")
    state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    try:
        opt = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {directory / OPTIMIZER}: {exc}") from exc
    return state, opt


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The resumable checkpoint with the highest step under run_dir/checkpoints."""
    root = Path(run_dir) / "checkpoints"
    best_step, best = -1, None
    for child in root.glob("*") if root.exists() else []:
        state_file = child / STATE
        if child.name.startswith(".") or not state_file.exists():
            continue
        step = json.loads(state_file.read_text(encoding="utf-8")).get("step", -1)
        if step > best_step:
            best_step, best = step, child
    if best is None:
        raise CheckpointError(f"no resumable checkpoint under {root}; train first or name a checkpoint directory.")
    return best
