"""Training objectives. Labels arrive already shifted (y[t] is the token after x[t]); nothing here shifts again."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.loader import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over non-ignored targets, and their count.

    Summing (not averaging) per micro-batch lets gradient accumulation divide by the token count
    of the whole optimizer step, so the update does not depend on how the step was split.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
