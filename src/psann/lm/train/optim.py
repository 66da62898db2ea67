"""AdamW with decay only on weight matrices, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices; never norms, biases, embeddings (tied heads included), gains or
    sine parameters (decay would drag their raw values towards softplus(0) = 0.69).

    A module may define `param_group_options()` -> {"weight_decay": ..., "lr_mult": ...} for its
    own direct parameters (SineParam uses it for its LR multiplier).
    """
    options: dict[int, dict] = {}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.Embedding):
            options.update({id(p): {"weight_decay": 0.0} for p in own.values()})
        if hasattr(module, "param_group_options"):
            options.update({id(p): module.param_group_options() for p in own.values()})
    groups: dict[tuple[float, float], list] = {}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        opt = options.get(id(p), {})
        decay = opt.get("weight_decay", weight_decay if p.ndim >= 2 else 0.0)
        groups.setdefault((decay, opt.get("lr_mult", 1.0)), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_mult": lr_mult}
            for (decay, lr_mult), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # the fused kernel exists for CUDA tensors only
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=fused)


def lr_at(step: int, cfg: TrainConfig, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to min_lr at the last step."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def default_warmup(total_steps: int) -> int:
    return min(1000, math.ceil(0.05 * total_steps))
