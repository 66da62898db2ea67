"""Autoregressive generation with a KV cache, left-padded batches and a sliding context window."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..config import GenerateConfig
from .sampling import apply_repetition_penalty, choose_next


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

    Prompts longer than the context keep their last max_seq_len - 1 tokens. When the cache fills
    during a long generation, it is rebuilt from the most recent 3/4 of the window (a sliding
    window that costs one prefill per quarter window, not one per token).
    `should_stop(row, new_ids)` lets the caller end a row early (e.g. on a stop string).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (psannLM prompts start with BOS).")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [list(p)[-(max_seq_len - 1):] if max_seq_len > 1 else list(p)[-1:] for p in prompts]
    tokens, mask = left_pad(prompts, pad_id, device)
    B = tokens.shape[0]
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
    finished = [False] * B
    out: list[list[int]] = [[] for _ in range(B)]
    cache, padded = None, False

    def forward_window() -> torch.Tensor:
        nonlocal cache, tokens, mask, padded
        tokens, mask = tokens[:, -max_seq_len:], mask[:, -max_seq_len:]
        padded = bool((mask == 0).any())  # fixed until the next window: new tokens are always real
        if use_cache:
            cache = model.new_cache(B, max_seq_len)
        return model(tokens, attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]

    logits = forward_window()
    present = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
    if gen.repetition_penalty != 1.0:
        present.scatter_(1, tokens, mask.bool())
    rows = torch.arange(B, device=device)
    for _ in range(gen.max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), present, gen.repetition_penalty)
        nxt = choose_next(logits, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, generator=generator)
        for row, token in enumerate(nxt.tolist()):  # one device->host copy per step
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
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        if not use_cache:
            logits = forward_window()
        elif cache.length + 1 > max_seq_len:
            keep = (3 * max_seq_len) // 4
            tokens, mask = tokens[:, -keep:], mask[:, -keep:]
            logits = forward_window()
        else:
            logits = model(nxt[:, None], attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]
    model.train(was_training)
    return out
