"""Semi-autoregressive block diffusion sampling (LLaDA) for masked diffusion LMs.

x = [prompt, MASK x gen_length] is filled block by block (block_length tokens each, left to
right); `steps` are split over the blocks, and each step of a block commits a planned number of
its masked positions (the block's count split evenly over its steps, the remainder going to the
earliest). At each step the model predicts every position; candidates are the argmax of the
logits plus temperature x Gumbel noise (in float64; temperature 0 is greedy); the committed
positions are the masked ones of the current block with the highest confidence (the candidate's
probability, `low_confidence` remasking, or a uniform draw, `random`). A step that commits
nothing leaves x unchanged, so the next step reuses its logits instead of running the model (the
model has no time input). Optional classifier-free guidance mixes in an unconditional pass with
the prompt masked: logits = u + (w + 1) (c - u); w = 0 is plain conditional sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError


@dataclass
class DiffusionSampleStats:
    forwards: int = 0      # model calls (a CFG step counts two)
    reused: int = 0        # steps that committed nothing and so ran no forward
    steps: int = 0


def commit_plan(masked: int, steps: int) -> list[int]:
    """How many positions each of `steps` steps commits: `masked` split evenly, remainder first."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax(logits + temperature * Gumbel) in float64 (float32 Gumbel noise is coarse enough to
    bias low-probability tokens); temperature 0 is the plain argmax."""
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits + temperature * gumbel).argmax(-1)


@torch.no_grad()
def diffusion_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, mask_id: int, gen_length: int,
                       block_length: int | None = None, steps: int | None = None, temperature: float = 0.0,
                       remasking: str = "low_confidence", cfg_scale: float = 0.0, suppress_ids: Sequence[int] = (),
                       pad_id: int = 0, eos_id: int | None = None, seed: int | None = None, reuse_logits: bool = True,
                       stats: DiffusionSampleStats | None = None) -> list[list[int]]:
    """The gen_length tokens sampled after each prompt (left-padded batch, bidirectional attention
    with the padding masked), each cut before its first `eos_id`. `suppress_ids` are never
    sampled (nor is the mask token)."""
    block_length = block_length or gen_length
    steps = steps or gen_length
    if gen_length < 1 or gen_length % block_length:
        raise ConfigError(f"max_new_tokens ({gen_length}) must be a positive multiple of block_length ({block_length}).")
    n_blocks = gen_length // block_length
    if steps < n_blocks:
        raise ConfigError(f"steps ({steps}) must be at least the number of blocks ({n_blocks} = max_new_tokens / block_length).")
    if remasking not in ("low_confidence", "random"):
        raise ConfigError(f"remasking must be low_confidence or random, got {remasking!r}")
    stats = stats if stats is not None else DiffusionSampleStats()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    B = len(prompts)
    width = max(len(p) for p in prompts)
    total = width + gen_length
    x = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros(B, total, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        x[row, width - len(p):width] = torch.tensor(list(p), dtype=torch.long, device=device)
        attention[row, width - len(p):] = 1
    x[:, width:] = mask_id
    prompt_positions = torch.zeros(B, total, dtype=torch.bool, device=device)
    prompt_positions[:, :width] = attention[:, :width].bool()
    padded = not bool(attention.all())
    banned = sorted({mask_id, *suppress_ids})

    def predict() -> torch.Tensor:
        mask = attention if padded else None
        logits = model(x, attention_mask=mask).float()
        stats.forwards += 1
        if cfg_scale:
            unconditional = torch.where(prompt_positions, torch.full_like(x, mask_id), x)
            un = model(unconditional, attention_mask=mask).float()
            stats.forwards += 1
            logits = un + (cfg_scale + 1) * (logits - un)
        logits[..., banned] = float("-inf")
        return logits

    for block, block_steps in enumerate(commit_plan(steps, n_blocks)):  # steps per block, split like commits
        start, end = width + block * block_length, width + (block + 1) * block_length
        for k in commit_plan(block_length, block_steps):
            stats.steps += 1
            if k == 0:  # x is unchanged, so the model (no time input) would predict what it just did
                if reuse_logits:
                    stats.reused += 1
                else:
                    predict()  # what a sampler without the reuse pays
                continue
            logits = predict()
            candidates = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = torch.gather(logits.double().softmax(-1), -1, candidates[..., None])[..., 0]
            else:
                confidence = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device)
            eligible = x == mask_id
            eligible[:, :start] = False
            eligible[:, end:] = False
            confidence = torch.where(eligible, confidence, torch.full_like(confidence, float("-inf")))
            chosen = confidence.topk(k, dim=-1).indices
            x.scatter_(1, chosen, candidates.gather(1, chosen))
    model.train(was_training)
    rows = x[:, width:].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
