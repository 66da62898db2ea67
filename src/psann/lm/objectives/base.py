"""What the trainer, the evaluators and generation ask of a training objective, and the pieces
every objective shares. Labels arrive already shifted: y[t] is the token after x[t]."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GenerateConfig, ModelConfig
from ..data.shards import IGNORE_INDEX, Windows

Autocast = Callable[[], contextlib.AbstractContextManager]
StopCheck = Callable[[int, list[int]], bool]


class Objective:
    """One objective, chosen once from `ModelConfig.objective`: it makes the training batch, sums
    the loss and counts the tokens it is normalised by, scores held-out windows and samples."""

    name: ClassVar[str]
    exact_likelihood: ClassVar[bool] = True  # scores are log-likelihoods, not bounds
    eos_padded_answers: ClassVar[bool] = False  # SFT answers are padded with EOS (the model learns to stop)

    def __init__(self, config: ModelConfig):
        self.config = config

    def prepare(self, config: ModelConfig, tokenizer) -> ModelConfig:
        """The model config completed for `tokenizer` (e.g. an extra mask token)."""
        return config

    def batch(self, x: torch.Tensor, y: torch.Tensor, windows, pad_id: int) -> tuple[torch.Tensor, object, int]:
        """(model input, what the loss compares against, tokens the step's loss is normalised by)."""
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, target, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def validation_sums(self, model: nn.Module, windows, batch_size: int, device: torch.device, *, pad_id: int,
                        autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None, rank: int = 0,
                        world_size: int = 1, draws: int = 16, seed: int = 0) -> dict[str, float]:
        """Sums over this rank's share of `windows` (ranks add them up): at least loss_sum and tokens."""
        raise NotImplementedError

    def summary(self, sums: dict[str, float]) -> dict:
        """Loss, perplexity and tokens of the (all-reduced) validation sums, plus the objective's own."""
        loss = sums["loss_sum"] / max(1.0, sums["tokens"])
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(sums["tokens"])}

    def sample(self, model: nn.Module, prompts: list[list[int]], gen: GenerateConfig, *, tokenizer,
               should_stop: StopCheck | None = None) -> list[list[int]]:
        """New token ids after each prompt, EOS not included; `should_stop(row, new_ids)` may end a row."""
        raise NotImplementedError


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over non-ignored targets. Summing (not averaging) per micro-batch lets
    gradient accumulation divide by the token count of the whole optimizer step, so the update
    does not depend on how the step was split."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="sum")


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over non-ignored targets, and their count."""
    return cross_entropy_sum(logits, targets, label_smoothing), int((targets != IGNORE_INDEX).sum())


def rank_batches(windows: Windows, batch_size: int, max_batches: int | None, rank: int, world_size: int):
    """This rank's share of `windows` (every world_size-th one) in batches -> (x, y, real rows).
    All ranks get the same number of equally sized batches, as sharded models need: a short last
    batch is padded with copies of window 0 after its `real` rows, which callers must not count."""
    mine = np.arange(rank, len(windows), world_size)
    per_rank = math.ceil(len(windows) / world_size)
    n_batches = math.ceil(per_rank / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        size = min(batch_size, per_rank - b * batch_size)  # the same on every rank
        x, y = windows.batch(np.concatenate([idx, np.zeros(size - len(idx), np.int64)]))
        yield x, y, len(idx)

