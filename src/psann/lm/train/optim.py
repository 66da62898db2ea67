"""AdamW with decay only on weight matrices, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices; never norms, biases, embeddings (tied heads included) or gains.

    A module may list extra parameter names to keep out of decay in `no_weight_decay()`.
    """
    skip = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            skip.update(id(p) for p in module.parameters(recurse=False))
        if hasattr(module, "no_weight_decay"):
            for name in module.no_weight_decay():
                skip.add(id(module.get_parameter(name)))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
