"""Held-out loss over token windows, and the text-level report of `psannlm eval` (nats/token,
perplexity, bits per byte, accuracy, UTF-8 validity of samples)."""

from __future__ import annotations

import codecs
import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn

from ..config import GenerateConfig
from ..data.shards import Windows
from ..data.prepare import text_windows
from ..errors import DataError
from ..objectives import Objective
from ..objectives.base import Autocast
from ..objectives.causal import evaluate_counts

# Scoring zero tokens would report loss 0 and perplexity 1, a perfect score for nothing.
NOTHING_TO_SCORE = "no text to score: {}; evaluate on data with text in it."


def evaluate_loss(model: nn.Module, windows: Windows, batch_size: int, device: torch.device,
                  autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over every target token of `windows`, in order."""
    counts = evaluate_counts(model, windows, batch_size, device, autocast, max_batches)
    if counts["tokens"] == 0:
        raise DataError(NOTHING_TO_SCORE.format("the windows hold no target tokens"))
    return counts["loss_sum"] / counts["tokens"], counts["tokens"]


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


def evaluate_text(model: nn.Module, tokenizer, docs: Sequence[str], objective: Objective, batch_size: int,
                  device: torch.device, *, samples: int = 8, sample_bytes: int = 128, seed: int = 0,
                  mc_draws: int = 16) -> dict:
    """Everything `psannlm eval` reports for one checkpoint on documents `docs`, in windows of the
    model's context.

    Bits per byte = summed cross-entropy / ln 2 / UTF-8 bytes of the text, for every family (a
    token model's loss per token is spread over the bytes each token covers), so byte and token
    models compare on one axis; per-byte perplexity = 2 ** BPB. Accuracy is next-token (next-byte
    for byte models). UTF-8 validity samples `samples` continuations of `sample_bytes` bytes from
    document openings (byte tokenizers only: other tokenizers decode to text by construction).

    An objective without an exact likelihood (diffusion) is scored by its Monte-Carlo NELBO
    (`mc_draws` per sequence, fixed seed): loss, ppl and BPB are then upper bounds ("bound": true),
    with the standard error of the per-token estimate; accuracy does not apply.
    """
    if not any(d.strip() for d in docs):
        raise DataError(NOTHING_TO_SCORE.format("there are no documents, or every one is empty or only whitespace"))
    windows = text_windows(list(docs), tokenizer, objective.config.max_seq_len)
    n_bytes = sum(len(d.encode("utf-8", errors="surrogatepass")) for d in docs)
    scores = objective.summary(objective.validation_sums(model, windows, batch_size, device, pad_id=tokenizer.pad_id,
                                                         draws=mc_draws, seed=seed))
    if objective.exact_likelihood:
        extra = {"accuracy": scores["accuracy"], "top5_accuracy": scores["top5_accuracy"]}
    else:
        extra = {"accuracy": None, "top5_accuracy": None, "bound": True, "mc_draws": mc_draws,
                 "nelbo_se": scores["nelbo_se"]}
    bpb = scores["loss"] * scores["tokens"] / math.log(2) / n_bytes
    result = {"tokens": scores["tokens"], "bytes": n_bytes, "loss": scores["loss"], "ppl": scores["ppl"],
              "bits_per_byte": bpb, "byte_ppl": 2.0 ** bpb, **extra, "utf8_valid": None}
    if tokenizer.kind == "byte" and samples > 0:
        prompts = [tokenizer.encode(d[:16], add_bos=True) for d in docs if d][:samples]
        prompts += [[tokenizer.bos_id]] * (samples - len(prompts))
        gen = GenerateConfig(max_new_tokens=sample_bytes, temperature=1.0, seed=seed)
        new = objective.sample(model, prompts, gen, tokenizer=tokenizer)
        special = tokenizer.special_ids()
        result["utf8_valid"] = utf8_validity([bytes(i for i in ids if i not in special) for ids in new])
    return result
