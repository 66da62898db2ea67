"""Block diffusion (BD3-LM, Arriola et al. 2025; SDAR): masked diffusion inside blocks of
`model.diffusion_block` tokens, autoregressive across them. The likelihood factorises over the
blocks, log p(x) = sum_b log p(x_b | x_<b), and each block's term is bounded by the MDLM NELBO
with the blocks before it clean; with blocks of one token the bound is the causal loss.

One window x of L tokens, blocks [s_b, e_b), is laid out as

    the clean tokens x[:s_last]                           attention: causal
    per block b: its anchor, then x[s_b:e_b] noised at t_b attention: the clean tokens before s_b,
                                                                     and its own segment both ways

where the anchor is the clean token x[s_b - 1] (the mask token for the first block) and every
position is its token's own, so RoPE sees true distances. The output at a segment's j-th position
predicts the block's j-th token: the anchor predicts the first, each token the next, as a causal
LM's head does, so a causal checkpoint (train.init_from) starts the model where it left off. One
forward trains every block of the window in ~2L + L/B positions.

Sampling grows the clean tokens block by block: each block starts as mask tokens behind an anchor
(the last clean token) and is filled by the masked-diffusion commit rule (diffusion.py) with the
same attention pattern, so the model sees what it was trained on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import StopCheck
from .block_layout import block_layout, block_targets, laid_out
from .diffusion import (DiffusionBatch, DiffusionSampleStats, MaskedDiffusion, commit_plan, commit_step, random_truncation,
                        sample_noise_levels)


def block_diffusion_batch(x: torch.Tensor, *, block: int, mask_id: int, eps: float, t_sampling: str = "stratified",
                          trunc_prob: float = 0.0, maskable: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> DiffusionBatch:
    """Noise a clean batch x (B, L) block by block (t per window and block, p_mask = (1 - eps) t + eps)
    and lay it out; weights are 1/p_mask of each target's block. `maskable` as in diffusion_batch."""
    x, maskable = random_truncation(x, maskable, trunc_prob, generator)
    B, layout = len(x), block_layout(x.shape[1], block)
    n_blocks = int(layout.block_of[-1]) + 1
    p_mask = ((1 - eps) * sample_noise_levels(B * n_blocks, t_sampling, generator) + eps).view(B, n_blocks)
    masked = torch.rand(x.shape, generator=generator) < p_mask[:, layout.block_of]
    if maskable is not None:
        masked &= maskable.cpu()
    masked = masked.to(x.device)
    targets, target_block = block_targets(x, masked, layout)
    inputs = laid_out(x, masked, layout, mask_id)
    n_tokens = int(x.numel() if maskable is None else maskable.sum())
    return DiffusionBatch(inputs, targets, (1.0 / p_mask[:, target_block]).to(x.device), n_tokens)


class BlockDiffusion(MaskedDiffusion):
    """The diffusion objective with model.diffusion_block set."""

    def noise(self, x, maskable):
        c = self.config
        return block_diffusion_batch(x, block=c.diffusion_block, mask_id=c.mask_token_id, eps=c.noise_epsilon,
                                     t_sampling=c.t_sampling, trunc_prob=c.random_trunc_prob, maskable=maskable)

    def sample(self, model, prompts, gen, *, tokenizer, should_stop=None):
        block = self.config.diffusion_block
        if gen.block_length not in (None, block):
            raise ConfigError(f"block_length={gen.block_length}: this block diffusion model denoises blocks of "
                              f"{block} tokens (model.diffusion_block); leave block_length unset or set it to {block}.")
        context = self.config.max_seq_len
        if gen.max_new_tokens == 0:
            return [[] for _ in prompts]
        if gen.max_new_tokens >= context:
            raise ConfigError(f"max_new_tokens={gen.max_new_tokens} leaves no room for the prompt in this model's "
                              f"{context}-token context; ask for fewer tokens.")
        keep = context - gen.max_new_tokens
        return block_diffusion_generate(model, [p[-keep:] for p in prompts], mask_id=self.config.mask_token_id,
                                        block=block, gen_length=gen.max_new_tokens, steps=gen.steps,
                                        temperature=gen.temperature, remasking=gen.remasking, cfg_scale=gen.cfg_scale,
                                        suppress_ids=[tokenizer.eos_id] if gen.suppress_eos else [],
                                        pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, seed=gen.seed,
                                        should_stop=should_stop)


@torch.no_grad()
def block_diffusion_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, mask_id: int, block: int,
                             gen_length: int, steps: int | None = None, temperature: float = 0.0,
                             remasking: str = "low_confidence", cfg_scale: float = 0.0, suppress_ids: Sequence[int] = (),
                             pad_id: int = 0, eos_id: int | None = None, seed: int | None = None,
                             should_stop: StopCheck | None = None,
                             stats: DiffusionSampleStats | None = None) -> list[list[int]]:
    """Up to gen_length tokens after each prompt (a left-padded batch), in blocks of `block` tokens
    (the last may be shorter); `steps` in all are split over the blocks, and each block's tokens
    over its steps (commit_plan). A row ends before its first `eos_id` or where
    `should_stop(row, new_ids)` says so, both read as each block is finished (streaming); sampling
    stops once every row has ended."""
    n_blocks = math.ceil(gen_length / block)
    steps = steps or gen_length
    if steps < n_blocks:
        raise ConfigError(f"steps ({steps}) must be at least the number of blocks ({n_blocks} = max_new_tokens / "
                          f"{block}, rounded up).")
    if remasking not in ("low_confidence", "random"):
        raise ConfigError(f"remasking must be low_confidence or random, got {remasking!r}")
    stats = stats if stats is not None else DiffusionSampleStats()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    B, width = len(prompts), max(len(p) for p in prompts)
    clean = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(B, width, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        clean[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        real[row, width - len(p):] = True
    banned = sorted({mask_id, *suppress_ids})

    def predict(segment: torch.Tensor) -> torch.Tensor:
        """Logits for the segment's tokens given the clean tokens: (B, len(segment), V)."""
        logits = segment_logits(model, clean, real, segment)
        stats.forwards += 1
        if cfg_scale:
            prompt = torch.zeros_like(real)
            prompt[:, :width] = real[:, :width]
            un = segment_logits(model, torch.where(prompt, mask_id, clean), real, segment)
            stats.forwards += 1
            logits = un + (cfg_scale + 1) * (logits - un)
        logits[..., banned] = float("-inf")
        return logits

    out, finished = [[] for _ in prompts], [False] * B
    for b, block_steps in enumerate(commit_plan(steps, n_blocks)):
        size = min(block, gen_length - b * block)
        segment = torch.full((B, size), mask_id, dtype=torch.long, device=device)
        for k in commit_plan(size, block_steps):
            stats.steps += 1
            if k == 0:  # nothing changed since the last forward (the model has no time input)
                stats.reused += 1
                continue
            commit_step(segment, predict(segment), segment == mask_id, k, temperature, remasking, generator)
        clean = torch.cat([clean, segment], dim=1)
        real = torch.cat([real, torch.ones_like(segment, dtype=torch.bool)], dim=1)
        for row, tokens in enumerate(segment.tolist()):  # a finished block is final: rows may end here
            for token in tokens if not finished[row] else ():
                if token == eos_id:
                    finished[row] = True
                    break
                out[row].append(token)
                if should_stop is not None and should_stop(row, out[row]):
                    finished[row] = True
                    break
        if all(finished):
            break
    model.train(was_training)
    return out


def segment_logits(model: nn.Module, clean: torch.Tensor, real: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """The model's predictions for `segment` (B, S) after the clean tokens (B, P; left padding
    False in `real`), read as in training: the anchor (the last clean token) and the segment see
    every clean token and each other, the clean tokens see the ones before them."""
    P, S = clean.shape[1], segment.shape[1]
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    last = positions[:, -1:]
    ids = torch.cat([clean, clean[:, -1:], segment], dim=1)
    position_ids = torch.cat([positions, last, last + 1 + torch.arange(S, device=clean.device)], dim=1)
    T = P + 1 + S
    visible = torch.zeros(T, T, dtype=torch.bool, device=clean.device)
    visible[:P, :P] = torch.ones(P, P, dtype=torch.bool, device=clean.device).tril()
    visible[P:] = True
    attention = None if bool(real.all()) else torch.cat([real, torch.ones(len(real), S + 1, dtype=torch.bool,
                                                                            device=real.device)], dim=1).long()
    logits = model(ids, position_ids=position_ids, visible=visible, attention_mask=attention)
    return logits[:, P:P + S].float()
