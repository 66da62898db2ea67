"""The causal LM objective: next-token cross-entropy, held-out loss and accuracy, and
autoregressive sampling with a KV cache (repetition penalty, temperature, top-k, top-p)."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..config import GenerateConfig
from ..data.shards import IGNORE_INDEX
from .base import Autocast, Objective, cross_entropy_sum, rank_batches


class CausalLM(Objective):
    name = "causal"

    def batch(self, x, y, windows, pad_id):
        return x, y, int((y != IGNORE_INDEX).sum())

    def loss_sum(self, logits, target, label_smoothing=0.0):
        return cross_entropy_sum(logits, target.to(logits.device, non_blocking=True), label_smoothing)

    def validation_sums(self, model, windows, batch_size, device, *, pad_id, autocast=contextlib.nullcontext,
                        max_batches=None, rank=0, world_size=1, draws=16, seed=0):
        return evaluate_counts(model, windows, batch_size, device, autocast, max_batches, rank, world_size)

    def summary(self, sums):
        n = max(1.0, sums["tokens"])
        return {**super().summary(sums), "accuracy": sums["top1"] / n, "top5_accuracy": sums["top5"] / n}

    def sample(self, model, prompts, gen, *, tokenizer, should_stop=None):
        return generate_tokens(model, prompts, gen, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               max_seq_len=self.config.max_seq_len, should_stop=should_stop)


@torch.no_grad()
def evaluate_counts(model: nn.Module, windows, batch_size: int, device: torch.device,
                    autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None, rank: int = 0,
                    world_size: int = 1) -> dict[str, float]:
    """Summed cross-entropy, target count, and top-1 / top-5 hits over this rank's share of
    `windows` (every world_size-th window). All ranks run the same number of forwards, as sharded
    models need: a short last batch is padded with a window whose targets are ignored."""
    was_training = model.training
    model.eval()
    counts = {"loss_sum": 0.0, "tokens": 0, "top1": 0, "top5": 0}
    for x, y, n_real in rank_batches(windows, batch_size, max_batches, rank, world_size):
        y[n_real:] = IGNORE_INDEX
        with autocast():
            logits = model(x.to(device))
        y = y.to(device)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == y[..., None]
        counts["loss_sum"] += float(cross_entropy_sum(logits, y))
        counts["tokens"] += int((y != IGNORE_INDEX).sum())
        counts["top1"] += int(hit[..., 0].sum())
        counts["top5"] += int(hit.any(-1).sum())
    model.train(was_training)
    return counts


# -- sampling -------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL form: for tokens already present, divide positive logits by `penalty`, multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p, including the
    token that crosses p (Hugging Face semantics); the most likely token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax, no filtering needed)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
            mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_tokens(model: nn.Module, prompts: Sequence[Sequence[int]], gen: GenerateConfig, *, eos_id: int | None,
                    pad_id: int, max_seq_len: int, use_cache: bool = True,
                    should_stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New token ids for each prompt (EOS not included).

    Prompts longer than the context keep their last max_seq_len - 1 tokens. When a row's window
    fills during a long generation, it keeps its most recent 3/4 and the batch is prefilled again
    (a sliding window that costs one prefill per quarter window, not one per token). Each row's
    window is the one it would have alone, so batched rows equal single-prompt generation.
    `should_stop(row, new_ids)` lets the caller end a row early (e.g. on a stop string).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (psannLM prompts start with BOS).")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = [list(p)[-(max_seq_len - 1):] if max_seq_len > 1 else list(p)[-1:] for p in prompts]
    B = len(windows)
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
    finished = [False] * B
    out: list[list[int]] = [[] for _ in range(B)]
    cache, padded, mask = None, False, None

    def forward_window() -> torch.Tensor:
        nonlocal cache, mask, padded
        tokens, mask = left_pad([w[-max_seq_len:] for w in windows], pad_id, device)
        padded = bool((mask == 0).any())  # fixed until the next window: new tokens are always real
        if use_cache:
            cache = model.new_cache(B, max_seq_len)
        return model(tokens, attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]

    logits = forward_window()
    present = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
    if gen.repetition_penalty != 1.0:
        for row, window in enumerate(windows):
            present[row, window] = True
    rows = torch.arange(B, device=device)
    for _ in range(gen.max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), present, gen.repetition_penalty)
        nxt = choose_next(logits, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, generator=generator)
        for row, token in enumerate(nxt.tolist()):  # one device->host copy per step
            windows[row].append(token)
            if finished[row]:
                continue
            if token == eos_id:
                finished[row] = True
                continue
            out[row].append(token)
            if should_stop is not None and should_stop(row, out[row]):
                finished[row] = True
        if all(finished):
            break
        if gen.repetition_penalty != 1.0:
            present[rows, nxt] = True
        if not use_cache:
            windows = [w[-max_seq_len:] for w in windows]
            logits = forward_window()
        elif any(len(w) > max_seq_len for w in windows):
            keep = (3 * max_seq_len) // 4
            windows = [w[-keep:] if len(w) > max_seq_len else w for w in windows]
            logits = forward_window()
        else:
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
            logits = model(nxt[:, None], attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]
    model.train(was_training)
    return out
