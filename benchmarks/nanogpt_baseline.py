"""The nanoGPT baseline, re-created from its published description (Karpathy's nanoGPT, `model.py`
and `train.py`); not its code, and nothing is fetched. Labelled "nanogpt" in the benchmarks.

Model (GPT-2): token + learned position embeddings, pre-LayerNorm blocks (with biases) of causal
self-attention (one fused qkv linear, scaled-dot-product attention) and a 4x GELU MLP, a final
LayerNorm and a head tied to the token embedding; init N(0, 0.02), the residual output projections
(c_proj) N(0, 0.02 / sqrt(2 n_layer)); dropout (default 0, as nanoGPT's) on the embeddings, the
attention weights and the outputs of c_proj. Training: AdamW, weight decay on the >= 2-D tensors only,
linear warmup then cosine decay to min_lr, gradient clipping at 1.0, batches of windows at
uniformly random offsets of the token stream (its get_batch), here the stream psann reads.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, n_head, dropout)
        self.ln_2, self.mlp = nn.LayerNorm(d), MLP(d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif name.endswith(".weight") and p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(".bias") and "ln_" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def build(vocab_size: int, seq: int, n_layer: int, n_head: int, d: int, dropout: float = 0.0) -> GPT:
    return GPT(vocab_size, seq, n_layer, n_head, d, dropout)


def train(model: GPT, windows, *, steps: int, batch_windows: int, lr: float, min_lr: float, warmup: int, seed: int,
          betas=(0.9, 0.95), weight_decay: float = 0.1, log_every: int = 0) -> dict:
    """Train on windows at random offsets of the token stream under `windows` (psann's Windows:
    the stream the psann contenders read); returns tokens seen, the training time and step times."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    rng = np.random.default_rng(seed)
    model.train()
    step_times, tokens = [], 0
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, min_lr, warmup, steps)
        starts = rng.integers(0, windows.data.n_tokens - windows.max_length, batch_windows)
        chunk = torch.from_numpy(windows.data.take(starts[:, None] + np.arange(windows.max_length + 1)).astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += int(x.numel())
        step_times.append(time.perf_counter() - t0)
        if log_every and step % log_every == 0:
            print(json.dumps({"nanogpt_step": step, "loss": round(float(loss), 4)}), file=sys.stderr)
    return {"tokens": tokens, "train_s": time.perf_counter() - start, "step_times": step_times}
