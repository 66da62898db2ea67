"""Held-out loss of a causal model over token windows."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import TokenWindows
from ..objectives import causal_lm_loss_sum


@torch.no_grad()
def evaluate_loss(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  max_batches: int | None = None) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over every target token of `windows`, in order."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(len(windows) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        x, y = windows.batch(np.arange(b * batch_size, min((b + 1) * batch_size, len(windows))))
        with autocast():
            logits = model(x.to(device))
        loss_sum, n = causal_lm_loss_sum(logits, y.to(device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(1, count), count
