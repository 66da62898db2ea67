"""The masked diffusion objective (MDLM / LLaDA): noise a clean sequence, predict the masked
tokens, weight by 1/p_mask; the Monte-Carlo negative ELBO of held-out windows; and
semi-autoregressive block diffusion sampling.

Sampling: x = [prompt, MASK x gen_length] is filled block by block (block_length tokens each, left to
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

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.shards import IGNORE_INDEX, Windows
from ..data.sft import response_positions
from ..errors import ConfigError
from .base import Autocast, Objective, rank_batches


class MaskedDiffusion(Objective):
    name = "diffusion"
    exact_likelihood = False
    eos_padded_answers = True

    def prepare(self, config, tokenizer):
        """The mask token: one id after the tokenizer's (or the one asked for); `config.vocab_size` is set."""
        mask_id = config.mask_token_id if config.mask_token_id is not None else tokenizer.vocab_size
        if mask_id in tokenizer.special_ids():
            raise ConfigError(f"mask_token_id={mask_id} is the tokenizer's pad/bos/eos/unk id; leave it unset to "
                              "append a mask token after the vocabulary.")
        return dataclasses.replace(config, mask_token_id=mask_id, vocab_size=max(config.vocab_size, mask_id + 1))

    def batch(self, x, y, windows, pad_id):
        """A noised batch (the masks come from the global RNG, whose state checkpoints carry, so
        resumes are exact). Fine-tuning data masks only response tokens; padding is never masked."""
        if windows.masked:
            maskable = response_positions(y)
        else:
            maskable = x != pad_id if bool((x == pad_id).any()) else None
        c = self.config
        noised = diffusion_batch(x, mask_id=c.mask_token_id, eps=c.noise_epsilon, t_sampling=c.t_sampling,
                                 trunc_prob=c.random_trunc_prob, maskable=maskable)
        return noised.inputs, noised, noised.n_tokens

    def loss_sum(self, logits, target, label_smoothing=0.0):
        return diffusion_loss_sum(logits, target)

    def validation_sums(self, model, windows, batch_size, device, *, pad_id, autocast=contextlib.nullcontext,
                        max_batches=None, rank=0, world_size=1, draws=16, seed=0):
        """The Monte-Carlo NELBO (an upper bound on the NLL), the same masks at every evaluation."""
        r = evaluate_nelbo(model, windows, batch_size, device, mask_id=self.config.mask_token_id, draws=draws,
                           seed=seed, pad_id=pad_id, max_batches=max_batches, autocast=autocast, rank=rank,
                           world_size=world_size)
        return {"loss_sum": r["nelbo_sum"], "tokens": r["tokens"], "variance": r["variance"]}

    def summary(self, sums):
        return {**super().summary(sums), "nelbo_se": sums["variance"] ** 0.5 / max(1.0, sums["tokens"])}

    def sample(self, model, prompts, gen, *, tokenizer, should_stop=None):
        """Block diffusion fills max_new_tokens at once, so `should_stop` cannot end a row early."""
        context = self.config.max_seq_len
        if gen.max_new_tokens == 0:
            return [[] for _ in prompts]
        if gen.max_new_tokens >= context:
            raise ConfigError(f"max_new_tokens={gen.max_new_tokens} leaves no room for the prompt in this model's "
                              f"{context}-token context; ask for fewer tokens.")
        keep = context - gen.max_new_tokens  # the prompt and the canvas share the context
        return diffusion_generate(model, [p[-keep:] for p in prompts], mask_id=self.config.mask_token_id,
                                  gen_length=gen.max_new_tokens, block_length=gen.block_length, steps=gen.steps,
                                  temperature=gen.temperature, remasking=gen.remasking, cfg_scale=gen.cfg_scale,
                                  suppress_ids=[tokenizer.eos_id] if gen.suppress_eos else [], pad_id=tokenizer.pad_id,
                                  eos_id=tokenizer.eos_id, seed=gen.seed)


# -- noising and the training loss -------------------------------------------------------------
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


def annealed_visibility(length: int, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(length, length) boolean: every query sees itself and the keys before it, and each later key
    with probability `share` (train.attention_anneal_steps raises it from 0 to 1)."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal | (torch.rand(length, length, generator=generator) < share)


def diffusion_loss_sum(logits: torch.Tensor, batch: DiffusionBatch) -> torch.Tensor:
    """Sum over masked positions of CE / p_mask (divide by `batch.n_tokens` for the per-token
    negative ELBO estimate; the trainer divides by the step's tokens over all micro-batches)."""
    targets = batch.targets.to(logits.device)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(targets)
    return (ce.sum(1) * batch.weights.to(logits.device)).sum()


# -- the held-out bound ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate_nelbo(model: nn.Module, windows: Windows, batch_size: int, device: torch.device, *, mask_id: int,
                   draws: int = 16, seed: int = 0, pad_id: int | None = None, max_batches: int | None = None,
                   autocast: Autocast = contextlib.nullcontext,
                   rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Monte-Carlo negative ELBO of a masked diffusion LM over `windows` (the inputs x of each).

    For each sequence and draw d of `draws`, t = (d + u) / draws (stratified, one u per sequence),
    every token masked with probability t, and the draw scores (1/t) * summed CE of the masked
    tokens (the continuous-time MDLM bound with the linear schedule). The mean over draws is an
    unbiased estimate of the sequence's NELBO >= its NLL. Returns the summed NELBO, the token
    count, and the summed per-sequence variance of the mean (for the standard error; it ignores
    the gain from stratification, so it is conservative). Masks are drawn from `seed`, so two
    evaluations of the same model see the same masks.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, tokens, variance = 0.0, 0, 0.0
    for x, y, n_real in rank_batches(windows, batch_size, max_batches, rank, world_size):
        if windows.masked:  # fine-tuning data: the bound of the responses given their prompts
            real = response_positions(y)
        else:
            real = torch.ones(x.shape, dtype=torch.bool) if pad_id is None else x != pad_id
        real[n_real:] = False  # the padding windows of a short last batch
        u = torch.rand(len(x), generator=generator)
        scores = torch.zeros(len(x), draws, dtype=torch.float64)
        for d in range(draws):
            t = (d + u) / draws
            masked = (torch.rand(x.shape, generator=generator) < t[:, None]) & real
            inputs = torch.where(masked, torch.full_like(x, mask_id), x).to(device)
            with autocast():
                logits = model(inputs)
            ce = F.cross_entropy(logits.float().flatten(0, 1), x.to(device).flatten(),
                                                   reduction="none").view(x.shape).cpu()
            scores[:, d] = ((ce * masked).sum(1) / t).double()
        total += float(scores.mean(1).sum())
        tokens += int(real.sum())
        if draws > 1:
            variance += float((scores.var(1, unbiased=True) / draws)[:n_real].sum())
    model.train(was_training)
    return {"nelbo_sum": total, "tokens": tokens, "variance": variance}


# -- sampling -------------------------------------------------------------------------------------
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
