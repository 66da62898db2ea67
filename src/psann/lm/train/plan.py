"""The micro-batch planner: batch_tokens split into ranks x accumulation steps x micro-batches of
windows, the step count of the run, and the smaller split to retry with after running out of memory."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from .optim import default_warmup

log = logging.getLogger("psann.lm")
CPU_MICRO_BATCH_TOKENS = 16384  # keeps CPU activations small without hurting matmul efficiency


@dataclass
class BatchPlan:
    max_length: int
    windows_per_step: int   # over all ranks
    micro_batch_size: int   # windows per forward, per rank
    grad_accum_steps: int
    total_steps: int
    warmup_steps: int
    n_windows: int
    world_size: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.max_length

    def describe(self) -> str:
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"batch: {self.tokens_per_step:,} tokens/step = {self.windows_per_step} windows x {self.max_length} "
                f"(micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation steps{ranks}); "
                f"{self.total_steps:,} steps ({self.total_steps * self.windows_per_step / self.n_windows:.2f} epochs of "
                f"{self.n_windows:,} windows), warmup {self.warmup_steps}")


def planned_steps(cfg: TrainConfig, windows_per_step: int, max_length: int, n_windows: int) -> int:
    """The run's optimizer steps: max_steps, else max_tokens, else epochs over the windows."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return math.ceil(cfg.max_tokens / (windows_per_step * max_length))
    return max(1, math.ceil(cfg.epochs * n_windows / windows_per_step))


def planned_epochs(cfg: TrainConfig, max_length: int, n_windows: int) -> float:
    """Passes over the training windows the run will make: train.epochs, or the steps plan_batches
    counts times the batch before its rounding to micro-batches and ranks."""
    if cfg.max_steps is None and cfg.max_tokens is None:
        return cfg.epochs
    per_step = min(max(1, cfg.batch_tokens // max_length), n_windows)
    return planned_steps(cfg, per_step, max_length, n_windows) * per_step / n_windows


def plan_batches(cfg: TrainConfig, max_length: int, n_windows: int, device: torch.device, world_size: int = 1) -> BatchPlan:
    """Split batch_tokens into ranks x accumulation steps x micro-batches of windows."""
    windows = cfg.batch_tokens // max_length
    if windows < 1:
        raise ConfigError(f"'train.batch_tokens' ({cfg.batch_tokens}) is smaller than one window of "
                          f"data.max_length={max_length} tokens; raise batch_tokens to at least {max_length} or lower max_length.")
    if windows > n_windows:
        log.warning("data: only %d training window(s) of %d tokens, fewer than the %d per step that batch_tokens=%d "
                    "asks for; each step uses all %d. Add text for a meaningful run.",
                    n_windows, max_length, windows, cfg.batch_tokens, n_windows)
        windows = n_windows
    if windows < world_size:
        raise ConfigError(f"'train.batch_tokens' ({cfg.batch_tokens}) gives {windows} window(s) per step, fewer than the "
                          f"{world_size} ranks; raise batch_tokens to at least {world_size * max_length}.")
    per_rank = windows // world_size
    if per_rank * world_size != windows:
        log.info("batch: %d windows per step do not split over %d ranks; using %d.", windows, world_size, per_rank * world_size)
    if cfg.micro_batch_size is not None and cfg.grad_accum_steps is not None:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    elif cfg.grad_accum_steps is not None:
        accum = min(cfg.grad_accum_steps, per_rank)
        micro = per_rank // accum
    else:
        cap = cfg.micro_batch_size or (max(1, CPU_MICRO_BATCH_TOKENS // max_length) if device.type == "cpu" else per_rank)
        accum = math.ceil(per_rank / min(cap, per_rank))
        micro = math.ceil(per_rank / accum)  # spread evenly: 10 windows, cap 4 -> 3 x 4 (not 4+4+2)
    if micro * accum != per_rank:
        log.info("batch: %d windows per rank and step do not split into %s; using %d x %d = %d windows.",
                 per_rank, "grad_accum_steps" if cfg.grad_accum_steps else "micro-batches", micro, accum, micro * accum)
    per_step = micro * accum * world_size
    total = planned_steps(cfg, per_step, max_length, n_windows)
    warmup = default_warmup(total) if cfg.warmup_steps is None else cfg.warmup_steps
    return BatchPlan(max_length, per_step, micro, accum, total, warmup, n_windows, world_size)


def halve_micro_batch(plan: BatchPlan) -> BatchPlan | None:
    """The same windows per step in micro-batches about half as large (None at 1): the largest
    divisor of the per-rank windows not above half the current micro-batch."""
    per_rank = plan.micro_batch_size * plan.grad_accum_steps
    micro = next((m for m in range(plan.micro_batch_size // 2, 0, -1) if per_rank % m == 0), None)
    if micro is None:
        return None
    return dataclasses.replace(plan, micro_batch_size=micro, grad_accum_steps=per_rank // micro)
