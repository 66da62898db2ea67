"""Training objectives: the causal LM loss (labels arrive already shifted: y[t] is the token after
x[t]; nothing here shifts again) and the masked diffusion loss (MDLM / LLaDA: noise a clean
sequence, predict the masked tokens, weight by 1/p_mask)."""

from __future__ import annotations

from dataclasses import dataclass

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


# -- masked diffusion (MDLM / LLaDA) -------------------------------------------------------------
@dataclass
class DiffusionBatch:
    """A noised batch: `inputs` with masked positions replaced by the mask id, `targets` holding
    the clean token at masked positions (IGNORE_INDEX elsewhere), `weights` 1/p_mask per row, and
    `n_tokens`, the real tokens the loss is normalised by (all of them, masked or not)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    n_tokens: int


def sample_noise_levels(n: int, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """t in (0, 1) for n sequences: uniform draws, stratified ((i + u) / n, one u, shuffled) or
    antithetic (t and 1 - t in pairs). The last two cover [0, 1) evenly and cut the variance of
    the batch's loss estimate."""
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    if mode == "stratified":
        t = (torch.arange(n) + torch.rand(1, generator=generator)) / n
        return t[torch.randperm(n, generator=generator)]
    if mode == "antithetic":
        half = torch.rand((n + 1) // 2, generator=generator)
        return torch.cat([half, 1 - half])[:n]
    raise ValueError(f"unknown t_sampling {mode!r}")


def diffusion_batch(x: torch.Tensor, *, mask_id: int, eps: float, t_sampling: str = "stratified",
                    trunc_prob: float = 0.0, maskable: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> DiffusionBatch:
    """Noise a clean batch x (B, L): t per sequence, p_mask = (1 - eps) t + eps, each maskable
    token masked independently with probability p_mask. With probability `trunc_prob` the whole
    batch is first cut to a random length in [1, L]. `maskable` (B, L) excludes positions that are
    never masked (an SFT prompt) or not real (padding: pass False there and they are not counted)."""
    B, L = x.shape
    if trunc_prob and float(torch.rand(1, generator=generator)) < trunc_prob:
        keep = int(torch.randint(1, L + 1, (1,), generator=generator))
        x = x[:, :keep]
        maskable = maskable[:, :keep] if maskable is not None else None
    p_mask = (1 - eps) * sample_noise_levels(B, t_sampling, generator) + eps
    draws = torch.rand(x.shape, generator=generator)
    masked = draws < p_mask[:, None]
    if maskable is not None:
        masked &= maskable.cpu()
    masked = masked.to(x.device)
    inputs = torch.where(masked, torch.full_like(x, mask_id), x)
    targets = torch.where(masked, x, torch.full_like(x, IGNORE_INDEX))
    n_tokens = int(x.numel() if maskable is None else maskable.sum())
    return DiffusionBatch(inputs, targets, (1.0 / p_mask).to(x.device), n_tokens)


def diffusion_loss_sum(logits: torch.Tensor, batch: DiffusionBatch) -> torch.Tensor:
    """Sum over masked positions of CE / p_mask (divide by `batch.n_tokens` for the per-token
    negative ELBO estimate; the trainer divides by the step's tokens over all micro-batches)."""
    targets = batch.targets.to(logits.device)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(targets)
    return (ce.sum(1) * batch.weights.to(logits.device)).sum()
