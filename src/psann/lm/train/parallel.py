"""Transformations applied to a model from outside its code: activation checkpointing and compile.

Order (as torchtitan): activation checkpointing per block, then torch.compile. Data parallelism
will be applied last, here as well.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("psann.lm")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations during backward instead of storing them.

    Wraps the instance's `forward` (parameter names, and so checkpoints, are unchanged); it only
    takes effect when gradients are being recorded. Returns the number of blocks wrapped.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # compile support varies by platform; eager always works
        log.warning("torch.compile unavailable (%s); training eagerly.", exc)
        return model
