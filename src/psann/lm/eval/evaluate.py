"""Held-out loss of a causal model over token windows."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import IGNORE_INDEX, TokenWindows
from ..objectives import causal_lm_loss_sum


@torch.no_grad()
def evaluate_loss_sum(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      max_batches: int | None = None, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(summed cross-entropy, target tokens) over this rank's share of `windows` (every
    world_size-th window). All ranks run the same number of forwards, as sharded models need:
    a short last batch is padded with a window whose targets are ignored."""
    was_training = model.training
    model.eval()
    mine = np.arange(rank, len(windows), world_size)
    per_rank = math.ceil(len(windows) / world_size)
    n_batches = math.ceil(per_rank / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    total, count = 0.0, 0
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        size = min(batch_size, per_rank - b * batch_size)  # the same on every rank
        padded = np.concatenate([idx, np.zeros(size - len(idx), np.int64)])
        x, y = windows.batch(padded)
        y[len(idx):] = IGNORE_INDEX
        with autocast():
            logits = model(x.to(device))
        loss_sum, n = causal_lm_loss_sum(logits, y.to(device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total, count


def evaluate_loss(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  max_batches: int | None = None) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over every target token of `windows`, in order."""
    total, count = evaluate_loss_sum(model, windows, batch_size, device, autocast, max_batches)
    return total / max(1, count), count
