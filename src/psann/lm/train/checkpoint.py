"""Checkpoint directories: weights (safetensors), config (JSON), tokenizer, and training state.

Layout of a checkpoint directory:
    model.safetensors     weights (tied tensors stored once); FSDP step checkpoints have dcp/ instead
    config.json           format version + the resolved run config
    tokenizer/            the tokenizer's own files
    trainer_state.json    step, tokens seen, loader position, loss scaler, best val loss  (training)
    optimizer.pt          optimizer state keyed by parameter name (single process and DDP)
    dcp/                  FSDP: model and optimizer shards (torch.distributed.checkpoint)
    rng.pt                every rank's RNG states                                           (training)

A checkpoint is written to a temporary sibling and renamed into place, so a crash never leaves
a half-written directory under the final name. Loading reads tensors only: safetensors for
weights, `torch.load(weights_only=True)` and DCP for the rest, so no pickled code ever runs.
Optimizer state is keyed by parameter name (torch.distributed.checkpoint.state_dict), so either
form resumes under another world size or parallelism.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
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
SHARDED, RNG = "dcp", "rng.pt"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_checkpoint(directory: str | os.PathLike, model: nn.Module | None, tokenizer, config: RunConfig, *,
                    trainer_state: dict | None = None, optimizer_state: dict | None = None,
                    rng_state: dict | None = None, staged: Path | None = None) -> Path:
    """Write a checkpoint atomically; an existing directory of the same name is replaced.

    `model` None writes no weights file (a sharded checkpoint whose shards were already written
    into `staged`, the temporary directory that is then completed and renamed)."""
    from psann import __version__

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = staged or directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(exist_ok=staged is not None)
    try:
        if model is not None:
            save_model(model, str(tmp / WEIGHTS))
        _write_json(tmp / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                   "psann_version": __version__, "config": config.to_dict()})
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            _write_json(tmp / STATE, trainer_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        if rng_state is not None:
            torch.save(rng_state, tmp / RNG)
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


def staging_dir(directory: str | os.PathLike) -> Path:
    """The fixed temporary name all ranks write a sharded checkpoint into before it is renamed."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.tmp-sharded")


def read_checkpoint_config(directory: str | os.PathLike) -> RunConfig:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}. Pass the directory written by training "
                              "(e.g. runs/<name>/checkpoints/final).")
    if not directory.is_dir():
        raise CheckpointError(f"a checkpoint is a directory (model.safetensors, config.json, tokenizer/); {directory} is a file.")
    missing = [n for n in (CONFIG, TOKENIZER) if not (directory / n).exists()]
    if not (directory / WEIGHTS).exists() and not (directory / SHARDED).is_dir():
        missing.insert(0, WEIGHTS)
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
    """Fill `model` (one process, unsharded) from a checkpoint's safetensors or its DCP shards."""
    directory = Path(directory)
    path = directory / WEIGHTS
    if not path.exists() and (directory / SHARDED).is_dir():
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, directory)
        set_model_state_dict(model, state["model"])
        return
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read weights {path}: {exc}. The file is corrupt or truncated; "
                              "use another checkpoint.") from exc
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit the model built from its config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}).")


def _dcp_load(state: dict, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading shards is intended, not a mistake
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(directory / SHARDED))
    except Exception as exc:
        raise CheckpointError(f"cannot read the sharded checkpoint {directory / SHARDED}: {str(exc)[:300]}. It is "
                              "incomplete or was written for another model; use another checkpoint.") from exc


def load_training_state(directory: str | os.PathLike) -> tuple[dict, dict]:
    """-> (trainer_state, RNG states of every rank) for resuming."""
    directory = Path(directory)
    missing = [n for n in (STATE, RNG) if not (directory / n).exists()]
    if not (directory / OPTIMIZER).exists() and not (directory / SHARDED).is_dir():
        missing.append(OPTIMIZER)
    if missing:
        raise CheckpointError(f"{directory} cannot be resumed: missing {', '.join(missing)} (it holds weights only, "
                              "e.g. 'best'). Resume from a step_* or final checkpoint, or use train.init_from.")
    state = json.loads((directory / STATE).read_text(encoding="utf-8"))
    try:
        rng = torch.load(directory / RNG, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {directory / RNG}: {exc}") from exc
    return state, rng


def load_model_and_optimizer(directory: str | os.PathLike, model: nn.Module, optimizer, sharded_model: bool) -> None:
    """Restore weights and optimizer state into a (possibly FSDP-sharded) model, whatever the world
    size and parallelism the checkpoint was written under."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    directory = Path(directory)
    if (directory / SHARDED).is_dir():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        _dcp_load(state, directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    try:
        optim_sd = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {directory / OPTIMIZER}: {exc}") from exc
    if optim_sd.get("format") == "zero":
        if not hasattr(optimizer, "consolidate_state_dict"):
            raise CheckpointError(f"{directory} holds ZeRO optimizer state; resume with train.optimizer=zero_adamw.")
        load_weights(model, directory)
        optimizer.load_state_dict(optim_sd["state"])
        return
    if sharded_model:
        from safetensors.torch import load_file

        full = load_file(directory / WEIGHTS)
        names = dict(model.named_parameters(remove_duplicate=False))
        for name in names:  # tied weights are stored once
            if name not in full:
                source = next(n for n, p in names.items() if p is names[name] and n in full)
                full[name] = full[source]
        set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    load_weights(model, directory)
    set_optimizer_state_dict(model, optimizer, optim_sd)


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
