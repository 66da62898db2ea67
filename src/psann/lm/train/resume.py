"""What a resume reads from a checkpoint (checkpoint.py writes and verifies it): the trainer state,
every rank's RNG states, the model and optimizer state under any world size or parallelism, and
which checkpoint of a run is the latest intact one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..errors import CheckpointError, PsannError
from ..files import read_json
from .checkpoint import (CONFIG, OPTIMIZER, RNG, SHARDED, STATE, WEIGHTS, dcp_load, load_torch, load_weights, mismatch,
                         resolve_checkpoint, verify_checkpoint)

log = logging.getLogger("psann.lm")

STATE_TYPES = {"step": int, "tokens_seen": int, "loader": dict}  # required in trainer_state.json
OPTIONAL_STATE_TYPES = {"best_val_loss": (int, float), "scaler": (dict, type(None)), "skipped_steps": int,
                        "world_size": int, "parallel": str}


def _missing_for_resume(directory: Path) -> list[str]:
    missing = [n for n in (STATE, RNG) if not (directory / n).exists()]
    if not (directory / OPTIMIZER).exists() and not (directory / SHARDED).is_dir():
        missing.append(OPTIMIZER)
    return missing


def _read_trainer_state(path: Path) -> dict:
    state = read_json(path, CheckpointError, "trainer state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a valid trainer state (a JSON object); it is corrupt.")
    for key, types in {**STATE_TYPES, **OPTIONAL_STATE_TYPES}.items():
        if key not in state:
            if key in STATE_TYPES:
                raise CheckpointError(f"{path} has no '{key}'; it is corrupt or was not written by psann-lm. "
                                      "Use another checkpoint of the run.")
        elif isinstance(state[key], bool) or not isinstance(state[key], types):
            raise CheckpointError(f"{path}: '{key}' is {state[key]!r}, not a {getattr(types, '__name__', 'number')}; "
                                  "the file is corrupt. Use another checkpoint of the run.")
    return state


def _check_rng(rng: Any, path: Path) -> dict:
    def states(value, optional=False):
        return isinstance(value, list) and all((optional and t is None) or
                                               (isinstance(t, torch.Tensor) and t.dtype == torch.uint8) for t in value)

    if not (isinstance(rng, dict) and states(rng.get("cpu")) and states(rng.get("cuda"), True)
            and len(rng["cpu"]) == len(rng["cuda"]) > 0):
        raise CheckpointError(f"{path} does not hold RNG states (cpu and cuda lists of byte tensors); it is corrupt. "
                              "Use another checkpoint of the run.")
    return rng


def load_training_state(directory: str | os.PathLike) -> tuple[dict, dict]:
    """-> (trainer_state, RNG states of every rank) for resuming."""
    directory = resolve_checkpoint(directory)
    if missing := _missing_for_resume(directory):
        weights_only = (directory / CONFIG).exists() and ((directory / WEIGHTS).exists() or (directory / SHARDED).is_dir())
        hint = ("(it holds weights only, e.g. 'best'). Resume from a step_* or final checkpoint, or use train.init_from."
                if weights_only else "It may have been interrupted while copying; use another checkpoint of the run.")
        raise CheckpointError(f"{directory} cannot be resumed: missing {', '.join(missing)} {hint}")
    verify_checkpoint(directory, STATE, RNG)
    state = _read_trainer_state(directory / STATE)
    return state, _check_rng(load_torch(directory / RNG), directory / RNG)


def load_model_and_optimizer(directory: str | os.PathLike, model: nn.Module, optimizer, sharded_model: bool) -> None:
    """Restore weights and optimizer state into a (possibly FSDP-sharded) model, whatever the world
    size and parallelism the checkpoint was written under."""
    directory = resolve_checkpoint(directory)
    try:
        _load_model_and_optimizer(directory, model, optimizer, sharded_model)
    except (PsannError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # the state does not fit this model or optimizer
        raise CheckpointError(f"the optimizer state in {directory} does not fit this model and optimizer "
                              f"({type(exc).__name__}: {str(exc)[:300]}); resume with the run's own settings "
                              "(train.optimizer, model.*) or start from its weights with train.init_from.") from exc


def _load_model_and_optimizer(directory: Path, model: nn.Module, optimizer, sharded_model: bool) -> None:
    # lazy: torch.distributed.checkpoint takes ~1 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if (directory / SHARDED).is_dir():
        verify_checkpoint(directory, SHARDED)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp_load(state, directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    verify_checkpoint(directory, OPTIMIZER)
    optim_sd = load_torch(directory / OPTIMIZER)
    if not isinstance(optim_sd, dict):
        raise CheckpointError(f"{directory / OPTIMIZER} does not hold an optimizer state; it is corrupt.")
    if optim_sd.get("format") == "zero":
        if not hasattr(optimizer, "consolidate_state_dict"):
            raise CheckpointError(f"{directory} holds ZeRO optimizer state; resume with train.optimizer=zero_adamw.")
        load_weights(model, directory)
        optimizer.load_state_dict(optim_sd["state"])
        return
    if sharded_model:
        verify_checkpoint(directory, WEIGHTS)
        try:
            full = load_file(directory / WEIGHTS)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"cannot read weights {directory / WEIGHTS}: {exc}. The file is corrupt or "
                                  "truncated; use another checkpoint.") from exc
        names = dict(model.named_parameters(remove_duplicate=False))
        for name in names:  # tied weights are stored once
            if name not in full:
                source = next(n for n, p in names.items() if p is names[name] and n in full)
                full[name] = full[source]
        set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    # lazy: torch.distributed.checkpoint takes ~1 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    load_weights(model, directory)
    set_optimizer_state_dict(model, optimizer, optim_sd)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The intact resumable checkpoint with the highest step under run_dir/checkpoints; newer
    ones that are broken are skipped with a warning saying why."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for child, name in _resumable_candidates(root):
        if not (child / STATE).exists():  # weights only ('best')
            continue
        try:
            found.append((_read_trainer_state(child / STATE)["step"], name.name, child, name))
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", child, exc)
    for _, _, child, name in sorted(found, reverse=True):
        missing = _missing_for_resume(child)
        problem = f"incomplete: missing {', '.join(missing)}" if missing else mismatch(child)
        if problem is None:
            return name
        log.warning("skipping checkpoint %s: it is %s", child, problem)
    raise CheckpointError(f"no intact resumable checkpoint under {root}; train first or name a checkpoint directory.")


def _resumable_candidates(root: Path):
    """(directory to read, name it is resumed under) for each checkpoint under `root`; the previous
    version a killed save left aside counts under its name, which loaders and recovery resolve."""
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if not child.name.startswith("."):
            yield child, child
        elif ".old-" in child.name:
            name = root / child.name[1:child.name.rindex(".old-")]
            if not name.exists():
                yield child, name
