"""Held-out metrics of a causal model: loss over token windows, and the text-level report of
`psannlm eval` (nats/token, perplexity, bits per byte, accuracy, UTF-8 validity of samples)."""

from __future__ import annotations

import codecs
import contextlib
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import IGNORE_INDEX, TokenWindows
from ..objectives import causal_lm_loss_sum


@torch.no_grad()
def evaluate_counts(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    max_batches: int | None = None, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Summed cross-entropy, target count, and top-1 / top-5 hits over this rank's share of
    `windows` (every world_size-th window). All ranks run the same number of forwards, as sharded
    models need: a short last batch is padded with a window whose targets are ignored."""
    was_training = model.training
    model.eval()
    mine = np.arange(rank, len(windows), world_size)
    per_rank = math.ceil(len(windows) / world_size)
    n_batches = math.ceil(per_rank / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    counts = {"loss_sum": 0.0, "targets": 0, "top1": 0, "top5": 0}
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        size = min(batch_size, per_rank - b * batch_size)  # the same on every rank
        padded = np.concatenate([idx, np.zeros(size - len(idx), np.int64)])
        x, y = windows.batch(padded)
        y[len(idx):] = IGNORE_INDEX
        with autocast():
            logits = model(x.to(device))
        y = y.to(device)
        loss_sum, n = causal_lm_loss_sum(logits, y)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == y[..., None]
        counts["loss_sum"] += float(loss_sum)
        counts["targets"] += n
        counts["top1"] += int(hit[..., 0].sum())
        counts["top5"] += int(hit.any(-1).sum())
    model.train(was_training)
    return counts


def evaluate_loss_sum(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      max_batches: int | None = None, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(summed cross-entropy, target tokens) of `evaluate_counts`."""
    counts = evaluate_counts(model, windows, batch_size, device, autocast, max_batches, rank, world_size)
    return counts["loss_sum"], counts["targets"]


def evaluate_loss(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  max_batches: int | None = None) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over every target token of `windows`, in order."""
    total, count = evaluate_loss_sum(model, windows, batch_size, device, autocast, max_batches)
    return total / max(1, count), count


def utf8_validity(samples: Sequence[bytes]) -> float:
    """Fraction of byte strings that are valid UTF-8; a multi-byte character cut off by the
    length limit at the very end does not count against a sample."""
    valid = 0
    for raw in samples:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
            valid += 1
        except UnicodeDecodeError:
            pass
    return valid / max(1, len(samples))


def evaluate_text(model: nn.Module, tokenizer, docs: Sequence[str], max_length: int, batch_size: int,
                  device: torch.device, *, samples: int = 8, sample_bytes: int = 128, seed: int = 0) -> dict:
    """Everything `psannlm eval` reports for one checkpoint on documents `docs`.

    Bits per byte = summed cross-entropy / ln 2 / UTF-8 bytes of the text, for every family (a
    token model's loss per token is spread over the bytes each token covers), so byte and token
    models compare on one axis; per-byte perplexity = 2 ** BPB. Accuracy is next-token (next-byte
    for byte models). UTF-8 validity samples `samples` continuations of `sample_bytes` bytes from
    document openings (byte tokenizers only: other tokenizers decode to text by construction).
    """
    from ..config import GenerateConfig
    from ..data.tokens import encode_corpus
    from ..infer.generate import generate_tokens

    corpus = encode_corpus(list(docs), tokenizer)
    windows = TokenWindows(corpus, max_length, True, tokenizer.pad_id)
    counts = evaluate_counts(model, windows, batch_size, device)
    n_bytes = sum(len(d.encode("utf-8", errors="surrogatepass")) for d in docs)
    n = max(1, counts["targets"])
    loss = counts["loss_sum"] / n
    bpb = counts["loss_sum"] / math.log(2) / max(1, n_bytes)
    result = {"tokens": counts["targets"], "bytes": n_bytes, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
              "bits_per_byte": bpb, "byte_ppl": 2.0 ** bpb, "accuracy": counts["top1"] / n,
              "top5_accuracy": counts["top5"] / n, "utf8_valid": None}
    if tokenizer.kind == "byte" and samples > 0:
        prompts = [tokenizer.encode(d[:16], add_bos=True) for d in docs if d][:samples]
        prompts += [[tokenizer.bos_id]] * (samples - len(prompts))
        gen = GenerateConfig(max_new_tokens=sample_bytes, temperature=1.0, seed=seed)
        new = generate_tokens(model, prompts, gen, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              max_seq_len=max_length)
        special = tokenizer.special_ids()
        result["utf8_valid"] = utf8_validity([bytes(i for i in ids if i not in special) for ids in new])
    return result
