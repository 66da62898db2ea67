"""Checkpoints of sharded runs: FSDP shards through torch.distributed.checkpoint (optionally in
the background), consolidated safetensors weights for inference, and whole optimizer state
gathered from ZeRO or plain optimizers. Reading shards back: dcp_reader.py."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ModelConfig, RunConfig
from ..errors import CheckpointError
from ..files import raise_os_error
from ..models import build_model
from . import checkpoint as ckpt
from .distributed import DistInfo, all_gather_object, broadcast_object

_async_group = None

def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict | None:
    """The whole optimizer state keyed by parameter name (for ZeRO: gathered to rank 0, where
    it is returned; other ranks get None). Every rank must call this."""
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer
        optimizer.consolidate_state_dict(to=0)
        return {"format": "zero", "state": optimizer.state_dict()} if info.is_main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def empty_model(config: ModelConfig) -> nn.Module:
    """The model's structure on CPU with uninitialised storage (its weights are about to be
    overwritten), built without running the random init; tied weights stay tied."""
    with torch.device("meta"):
        model = build_model(config)
    first: dict[int, str] = {}
    ties = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    model.to_empty(device="cpu")
    for name, source in ties:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    return model


def _refuse_non_finite(model: nn.Module, directory: Path, info: DistInfo) -> None:
    """Every rank checks its own shards; all refuse together (one raising alone would hang the rest)."""
    local = ((n, t.to_local() if hasattr(t, "to_local") else t) for n, t in model.state_dict().items())
    bad = [name for name in all_gather_object(ckpt.first_non_finite(local), info) if name]
    if bad:
        raise ckpt.non_finite_error(bad[0], directory)


def _raise_shard_error(exc: BaseException, staged: Path, info: DistInfo) -> None:
    """After a failed shard write (seen by every rank): remove the staging directory and raise a
    disk-full or permission failure of any rank as a StorageError naming the shard directory."""
    if info.is_main:
        shutil.rmtree(staged, ignore_errors=True)
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()] or [exc]
    os_error = next((f for f in failures if isinstance(f, OSError) and f.errno in
                     (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)), None)
    if os_error is not None:
        raise_os_error(os_error, staged / ckpt.SHARDED, "writing")
    raise exc


def on_main_rank(info: DistInfo, fn: Callable[[], object]) -> None:
    """Run `fn` on rank 0 only, then sync; its failure is raised on every rank (the others would
    otherwise wait for rank 0 forever)."""
    error = None
    if info.is_main:
        try:
            fn()
        except Exception as exc:
            error = exc
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", info)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"rank 0 failed while writing a checkpoint: {failed}")


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a killed job's leftover
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise_os_error(exc, path, "creating")


def save_fsdp_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, tokenizer,
                         config: RunConfig, info: DistInfo, *, trainer_state: dict | None, rng_state: dict | None,
                         consolidated: bool, async_save: bool) -> Callable[[], None] | None:
    """All ranks call this. Shards of model and optimizer go to dcp/ (when `optimizer` is given),
    a consolidated model.safetensors too when `consolidated`. Returns None when the checkpoint is
    complete, or (async_save) a function that every rank must call later to complete it. A
    failure on any rank is raised on every rank, and the staging directory is removed."""
    import torch.distributed.checkpoint as dcp  # heavy to import; FSDP runs only (see dcp_reader.py)
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    _refuse_non_finite(model, directory, info)
    staged = ckpt.staging_dir(directory)
    on_main_rank(info, lambda: _fresh_dir(staged))
    full = None
    if consolidated:  # gathered shard by shard onto rank 0's CPU
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    future = None
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload = {"model": model_sd, "optimizer": optim_sd}
        try:
            if async_save:
                future = dcp.async_save(payload, checkpoint_id=str(staged / ckpt.SHARDED), process_group=_gloo_group())
            else:
                dcp.save(payload, checkpoint_id=str(staged / ckpt.SHARDED))
        except (Exception, CheckpointException) as exc:  # every rank sees every rank's failure
            _raise_shard_error(exc, staged, info)

    def complete() -> None:
        weights = None
        if full is not None:
            weights = empty_model(config.model)
            weights.load_state_dict(full)
        ckpt.save_checkpoint(directory, weights, tokenizer, config, trainer_state=trainer_state,
                             rng_state=rng_state, staged=staged)

    def finish() -> None:
        if future is not None:
            try:
                future.result()  # rank 0's save completes after every rank's shards are written
            except (Exception, CheckpointException) as exc:
                _raise_shard_error(exc, staged, info)
        on_main_rank(info, complete)

    if future is None:
        finish()
        return None
    return finish


def _gloo_group():
    """Background saves coordinate over their own gloo group: sharing the training group would
    interleave the saving thread's collectives with the training loop's and deadlock."""
    global _async_group
    if _async_group is None:
        _async_group = dist.new_group(backend="gloo")
    return _async_group
