"""Checkpoints of sharded runs: FSDP shards through torch.distributed.checkpoint (optionally in
the background), consolidated safetensors weights for inference, and whole optimizer state
gathered from ZeRO or plain optimizers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ModelConfig, RunConfig
from . import checkpoint as ckpt
from .distributed import DistInfo, barrier

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
    from ..models import build_model

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


def save_fsdp_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, tokenizer,
                         config: RunConfig, info: DistInfo, *, trainer_state: dict | None, rng_state: dict | None,
                         consolidated: bool, async_save: bool) -> Callable[[], None] | None:
    """All ranks call this. Shards of model and optimizer go to dcp/ (when `optimizer` is given),
    a consolidated model.safetensors too when `consolidated`. Returns None when the checkpoint is
    complete, or (async_save) a function that every rank must call later to complete it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    staged = ckpt.staging_dir(directory)
    if info.is_main:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    barrier(info)
    full = None
    if consolidated:  # gathered shard by shard onto rank 0's CPU
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    future = None
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload = {"model": model_sd, "optimizer": optim_sd}
        if async_save:
            future = dcp.async_save(payload, checkpoint_id=str(staged / ckpt.SHARDED), process_group=_gloo_group())
        else:
            dcp.save(payload, checkpoint_id=str(staged / ckpt.SHARDED))

    def finish() -> None:
        if future is not None:
            future.result()  # rank 0's save completes after every rank's shards are written
        if info.is_main:
            weights = None
            if full is not None:
                weights = empty_model(config.model)
                weights.load_state_dict(full)
            ckpt.save_checkpoint(directory, weights, tokenizer, config, trainer_state=trainer_state,
                                 rng_state=rng_state, staged=staged)
        barrier(info)

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
