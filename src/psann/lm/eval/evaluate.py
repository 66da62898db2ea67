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
from ..data.sft import SFTWindows, response_positions
from ..errors import DataError
from ..objectives import causal_lm_loss_sum

# Scoring zero tokens would report loss 0 and perplexity 1, a perfect score for nothing.
NOTHING_TO_SCORE = "no text to score: {}; evaluate on data with text in it."


def rank_batches(windows: TokenWindows, batch_size: int, max_batches: int | None, rank: int, world_size: int):
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


@torch.no_grad()
def evaluate_counts(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    max_batches: int | None = None, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Summed cross-entropy, target count, and top-1 / top-5 hits over this rank's share of
    `windows` (every world_size-th window). All ranks run the same number of forwards, as sharded
    models need: a short last batch is padded with a window whose targets are ignored."""
    was_training = model.training
    model.eval()
    counts = {"loss_sum": 0.0, "targets": 0, "top1": 0, "top5": 0}
    for x, y, n_real in rank_batches(windows, batch_size, max_batches, rank, world_size):
        y[n_real:] = IGNORE_INDEX
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
    if count == 0:
        raise DataError(NOTHING_TO_SCORE.format("the windows hold no target tokens"))
    return total / count, count


@torch.no_grad()
def evaluate_nelbo(model: nn.Module, windows: TokenWindows, batch_size: int, device: torch.device, *, mask_id: int,
                   draws: int = 16, seed: int = 0, pad_id: int | None = None, max_batches: int | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
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
        if isinstance(windows, SFTWindows):  # fine-tuning data: the bound of the responses given their prompts
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
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.to(device).flatten(),
                                                   reduction="none").view(x.shape).cpu()
            scores[:, d] = ((ce * masked).sum(1) / t).double()
        total += float(scores.mean(1).sum())
        tokens += int(real.sum())
        if draws > 1:
            variance += float((scores.var(1, unbiased=True) / draws)[:n_real].sum())
    model.train(was_training)
    return {"nelbo_sum": total, "tokens": tokens, "variance": variance}


def utf8_validity(samples: Sequence[bytes]) -> float:
    """Fraction of byte strings that are valid UTF-8; a multi-byte character cut off by the
    length limit at the very end does not count against a sample."""
    if not samples:
        raise DataError("no samples to check for UTF-8 validity; sample at least one continuation.")
    valid = 0
    for raw in samples:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
            valid += 1
        except UnicodeDecodeError:
            pass
    return valid / len(samples)


def evaluate_text(model: nn.Module, tokenizer, docs: Sequence[str], max_length: int, batch_size: int,
                  device: torch.device, *, samples: int = 8, sample_bytes: int = 128, seed: int = 0,
                  mask_id: int | None = None, mc_draws: int = 16) -> dict:
    """Everything `psannlm eval` reports for one checkpoint on documents `docs`.

    Bits per byte = summed cross-entropy / ln 2 / UTF-8 bytes of the text, for every family (a
    token model's loss per token is spread over the bytes each token covers), so byte and token
    models compare on one axis; per-byte perplexity = 2 ** BPB. Accuracy is next-token (next-byte
    for byte models). UTF-8 validity samples `samples` continuations of `sample_bytes` bytes from
    document openings (byte tokenizers only: other tokenizers decode to text by construction).

    A diffusion model (`mask_id` given) is scored by its Monte-Carlo NELBO (`mc_draws` per
    sequence, fixed seed) instead: loss, ppl and BPB are then upper bounds ("bound": true), with
    the standard error of the per-token estimate; accuracy does not apply.
    """
    from ..config import GenerateConfig
    from ..data.tokens import encode_corpus
    from ..infer.generate import generate_tokens

    if not any(d.strip() for d in docs):
        raise DataError(NOTHING_TO_SCORE.format("there are no documents, or every one is empty or only whitespace"))
    corpus = encode_corpus(list(docs), tokenizer)
    windows = TokenWindows(corpus, max_length, True, tokenizer.pad_id)
    n_bytes = sum(len(d.encode("utf-8", errors="surrogatepass")) for d in docs)
    if mask_id is None:
        counts = evaluate_counts(model, windows, batch_size, device)
        total, n = counts["loss_sum"], counts["targets"]
        extra = {"accuracy": counts["top1"] / n, "top5_accuracy": counts["top5"] / n}
    else:
        r = evaluate_nelbo(model, windows, batch_size, device, mask_id=mask_id, draws=mc_draws, seed=seed,
                           pad_id=tokenizer.pad_id)
        total, n = r["nelbo_sum"], r["tokens"]
        extra = {"accuracy": None, "top5_accuracy": None, "bound": True, "mc_draws": mc_draws,
                 "nelbo_se": math.sqrt(r["variance"]) / n}
    loss = total / n
    bpb = total / math.log(2) / n_bytes
    result = {"tokens": n, "bytes": n_bytes, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": bpb,
              "byte_ppl": 2.0 ** bpb, **extra, "utf8_valid": None}
    if tokenizer.kind == "byte" and samples > 0:
        prompts = [tokenizer.encode(d[:16], add_bos=True) for d in docs if d][:samples]
        prompts += [[tokenizer.bos_id]] * (samples - len(prompts))
        if mask_id is None:
            gen = GenerateConfig(max_new_tokens=sample_bytes, temperature=1.0, seed=seed)
            new = generate_tokens(model, prompts, gen, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                  max_seq_len=max_length)
        else:
            from ..infer.diffusion import diffusion_generate

            new = diffusion_generate(model, prompts, mask_id=mask_id, gen_length=sample_bytes, temperature=1.0,
                                     pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, seed=seed)
        special = tokenizer.special_ids()
        result["utf8_valid"] = utf8_validity([bytes(i for i in ids if i not in special) for ids in new])
    return result
