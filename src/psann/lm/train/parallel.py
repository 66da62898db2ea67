"""`parallelize`: everything applied to a model from outside its code, in one place and one order.

Order (as torchtitan): activation checkpointing per block -> torch.compile per block -> data
parallelism (DDP, or FSDP2 `fully_shard` on each block and then the root). Parameter names, and
so checkpoints, are unchanged by all three.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..config import TrainConfig
from ..errors import ConfigError
from .distributed import DistInfo

log = logging.getLogger("psann.lm")


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to wrap")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations during backward instead of storing them.

    Wraps the instance's `forward`; it only takes effect when gradients are being recorded.
    Returns the number of blocks wrapped.
    """
    blocks = _blocks(model)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block's forward (one graph per block: FSDP's hooks stay between graphs).
    Compile errors surface at the first call; `uncompile_blocks` then restores eager code."""
    for block in _blocks(model):
        block._eager_forward = block.forward
        block.forward = torch.compile(block.forward)


def uncompile_blocks(model: nn.Module) -> bool:
    """Undo `compile_blocks`; False when nothing was compiled."""
    undone = False
    for block in _blocks(model):
        if hasattr(block, "_eager_forward"):
            block.forward = block._eager_forward
            del block._eager_forward
            undone = True
    return undone


def data_parallel_mode(cfg: TrainConfig, world_size: int) -> str:
    """'fsdp', 'ddp' or 'none' for this config under `world_size` processes."""
    if cfg.fsdp != "off":
        if cfg.ddp == "on":
            raise ConfigError("train.ddp=on and train.fsdp are alternatives; set train.ddp=auto or off with FSDP.")
        if world_size > 1:
            return "fsdp"
        log.warning("train.fsdp=%s shards across torchrun processes; this is a single process, so the model "
                    "trains unsharded.", cfg.fsdp)
        return "none"
    if cfg.ddp == "on" and world_size == 1:
        log.warning("train.ddp=on in a single process: nothing to replicate; launch with torchrun for data parallelism.")
    if world_size > 1:
        if cfg.ddp == "off":
            raise ConfigError(f"{world_size} processes were launched (WORLD_SIZE) but train.ddp=off and train.fsdp=off; "
                              "each process would train its own copy. Set train.ddp=auto or a train.fsdp mode.")
        return "ddp"
    return "none"


def _fsdp_mesh(cfg: TrainConfig, info: DistInfo, device_type: str):
    if cfg.fsdp == "hybrid":
        # Shard within a node (fast links), replicate across nodes.
        if info.world_size % info.local_world_size:
            raise ConfigError(f"train.fsdp=hybrid needs the same number of processes on every node; world size "
                              f"{info.world_size} is not a multiple of {info.local_world_size} per node.")
        shape = (info.world_size // info.local_world_size, info.local_world_size)
        return init_device_mesh(device_type, shape, mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("dp_shard",))


def apply_fsdp(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device,
               param_dtype: torch.dtype | None) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = _fsdp_mesh(cfg, info, device.type)
    # Compute in param_dtype, reduce gradients in fp32 (bf16 reductions lose precision across ranks).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()
    # full_shard/hybrid free the gathered weights after each block's forward; shard_grad_op keeps
    # them until backward (more memory, one all-gather fewer per block).
    reshard = cfg.fsdp != "shard_grad_op"
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    # The root (embeddings, final norm, head) is used again right at the start of backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model


def parallelize(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device,
                amp_dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """Apply AC -> compile -> data parallelism. Returns (the module to train, 'fsdp'|'ddp'|'none').

    Under FSDP, `amp_dtype` becomes the compute dtype of its mixed-precision policy; DDP and
    single-process runs leave it to autocast.
    """
    mode = data_parallel_mode(cfg, info.world_size)  # first: config errors before the model is touched
    if mode == "fsdp":
        if amp_dtype == torch.float16:
            raise ConfigError("FSDP here runs in bf16 or fp32; fp16 needs a sharded loss scaler. Use train.amp=bf16 or fp32.")
        if cfg.fsdp_cpu_offload and device.type != "cuda":
            raise ConfigError("train.fsdp_cpu_offload moves shards off the GPU; it needs CUDA.")
    elif cfg.fsdp_cpu_offload and cfg.fsdp == "off":
        raise ConfigError("train.fsdp_cpu_offload applies to FSDP only; set train.fsdp=full_shard (or another mode).")
    if cfg.grad_checkpoint:
        log.info("activation checkpointing on %d blocks", apply_activation_checkpointing(model))
    if cfg.compile:
        compile_blocks(model)
    if mode == "fsdp":
        return apply_fsdp(model, cfg, info, device, amp_dtype), mode
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), mode
    return model, mode


def no_grad_sync(model: nn.Module, mode: str, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if mode == "ddp" and not last_micro_step:
        return model.no_sync()
    if mode == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)
