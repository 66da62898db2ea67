"""`--dry-run`: what a config will cost before any GPU is touched.

The model is built on the meta device (shapes only, no memory), so a 3B plan prints in a second.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..models import build_model, count_parameters, family
from .optim import resolved_optimizer
from .throughput import PEAK_TFLOPS, flops_formula, memory_plan

CHINCHILLA_TOKENS_PER_PARAM = 20


def plan_run(config: RunConfig, *, world_size: int = 1, gpus_per_node: int | None = None, gpu: str = "H100",
             mfu: float = 0.4) -> dict:
    model_cfg, train, L = config.model, config.train, config.data.max_length
    model_cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or family(model_cfg.base).vocab_size,
                                    max_seq_len=model_cfg.max_seq_len or L)  # a byte-level family fixes its vocabulary
    if model_cfg.vocab_size is None:
        raise ConfigError("--dry-run needs the vocabulary size: set model.vocab_size (--vocab-size).")
    with torch.device("meta"):
        model = build_model(model_cfg)
    n_params = count_parameters(model)
    per_token = model.flops_per_token(L)

    fsdp = train.fsdp != "off" and world_size > 1
    shard = (gpus_per_node or world_size) if train.fsdp == "hybrid" else world_size
    shard = shard if fsdp else 1
    optimizer_shards = shard if fsdp else (world_size if train.optimizer == "zero_adamw" else 1)
    windows = max(1, train.batch_tokens // L)
    per_rank = max(1, windows // world_size)
    if train.micro_batch_size:
        micro = train.micro_batch_size
    elif train.grad_accum_steps:
        micro = max(1, per_rank // train.grad_accum_steps)
    else:
        micro = per_rank
    half = train.amp in ("auto", "bf16", "fp16")
    parallel_mode = "fsdp" if fsdp else "ddp" if world_size > 1 else "none"
    optimizer = resolved_optimizer(train.optimizer, parallel_mode)
    mem = memory_plan(model, model_cfg, optimizer=optimizer, shard_factor=shard, optimizer_shards=optimizer_shards,
                      micro_batch_tokens=micro * L, grad_checkpoint=train.grad_checkpoint, half=half)

    name = next((k for k in PEAK_TFLOPS if k.lower() == gpu.lower()), None)
    if name is None:
        raise ConfigError(f"unknown GPU {gpu!r} for --gpu; choose one of {', '.join(PEAK_TFLOPS)}.")
    peak = PEAK_TFLOPS[name][0 if half else 1] * 1e12
    budget = train.max_tokens or CHINCHILLA_TOKENS_PER_PARAM * n_params
    seconds = budget * per_token / (world_size * peak * mfu)
    return {
        "parameters": n_params,
        "flops_per_token": per_token,
        "flops_formula": flops_formula(model),
        "world_size": world_size,
        "sharding": train.fsdp if fsdp else parallel_mode,
        "micro_batch_windows": micro,
        "optimizer": optimizer,
        "memory_gb_per_gpu": {"params": mem.params_gb, "grads": mem.grads_gb, "optimizer": mem.optimizer_gb,
                              "activations": mem.activations_gb, "total": mem.total_gb},
        "token_budget": budget,
        "token_budget_source": "train.max_tokens" if train.max_tokens else f"Chinchilla ({CHINCHILLA_TOKENS_PER_PARAM} tokens/param)",
        "gpu": name, "peak_tflops": peak / 1e12, "assumed_mfu": mfu,
        "days": seconds / 86400,
    }


def describe(plan: dict) -> str:
    mem = plan["memory_gb_per_gpu"]
    lines = [
        f"parameters          {plan['parameters']:,}",
        f"FLOPs per token     {plan['flops_per_token']:.4g}  ({plan['flops_formula']})",
        f"world size          {plan['world_size']} ({plan['sharding']}), micro-batch {plan['micro_batch_windows']} windows",
        f"memory per GPU (GiB, estimate; {plan['optimizer']}):",
        *(f"  {k:<17} {v:9.2f}" for k, v in mem.items()),
        f"token budget        {plan['token_budget']:.3g} ({plan['token_budget_source']})",
        f"time at {plan['assumed_mfu']:.0%} MFU on {plan['world_size']} x {plan['gpu']} "
        f"({plan['peak_tflops']:.0f} TFLOP/s): {plan['days']:.2f} days"
        + (f" ({plan['days'] * 24:.1f} h)" if plan["days"] < 2 else ""),
    ]
    return "\n".join(lines)

