"""Log-likelihood scoring shared by the lm-eval adapter (harness.py) and `psannlm eval mc`.

Everything is scored as *windows*: a token list whose last `n` tokens are the scored ones, the
rest their context. A causal window holds up to max_seq_len + 1 tokens (the model reads all but
the last); a diffusion window holds up to max_seq_len (the model reads it whole, the scored tokens
masked). Windows are sorted by length, longest first (an out-of-memory batch shows up at once),
and each batch of windows is one right-padded forward: with causal attention the padding after a
row cannot change that row's logits, so a score does not depend on the batch it lands in.

Text is encoded as lm-eval does for causal models: the context's trailing spaces move to the
continuation, context + continuation is encoded whole and split after the context's tokens, and
BOS comes first (psann models are trained with BOS at each document start).

Diffusion checkpoints have no exact likelihood; they get a Monte-Carlo lower bound instead (see
`MonteCarlo`), never the context masked, with a fixed seed per window.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ConfigError
from ..objectives import objective_for
from ..train.checkpoint import load_checkpoint
from ..train.trainer import resolve_device

log = logging.getLogger("psann.lm")
Window = tuple[list[int], int]  # (tokens, how many of the last tokens are scored)


@dataclass(frozen=True)
class MonteCarlo:
    """Settings of the diffusion bound on log p(continuation | context).

    For each window and draw d of `draws`: l = floor((d + u) * n / draws) + 1 of the n scored
    tokens (stratified over 1..n, one u per window), chosen uniformly, are masked; the draw scores
    (n / l) * their summed log-probability. The mean over draws is an unbiased estimate of the
    evidence lower bound (LLaDA's conditional form of the MDLM bound), which is <= log p. Draws come
    from a generator seeded with `seed` for every window, so a window gets the same masks in any
    batch and in every run."""

    mask_id: int
    draws: int = 16
    seed: int = 0


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context ids, continuation ids), split as lm-eval splits them for causal models."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode_rendered(context + continuation)  # role markers of a chat template -> their ids
    n_context = len(tok.encode_rendered(context)) if context else 0
    return [tok.bos_id, *whole[:n_context]], whole[n_context:]


def continuation_windows(pairs: Sequence[tuple[list[int], list[int]]], span: int) -> list[Window]:
    """One window per (context, continuation) pair, the context cut from the left to fit `span`
    tokens; at least one context token is always kept (a very long continuation loses its start)."""
    windows = []
    for context, continuation in pairs:
        tokens = (list(context) + list(continuation))[-span:]
        windows.append((tokens, min(len(continuation), len(tokens) - 1)))
    return windows


def rolling_windows(ids: Sequence[int], prefix_id: int, span: int) -> list[Window]:
    """Windows that score every token of `ids` exactly once, each after `prefix_id` (BOS) or as
    much preceding text as fits in `span` tokens (lm-eval's rolling windows: the first window
    scores up to span - 1 tokens after the prefix, each later one the next span - 1 tokens or the
    rest, with a full window of context before them)."""
    ids = list(ids)
    if not ids:
        return []
    first = ids[:span - 1]
    windows = [([prefix_id, *first], len(first))]
    done = len(first)
    while done < len(ids):
        end = min(len(ids), done + span - 1)
        windows.append((ids[max(0, end - span):end], end - done))
        done = end
    return windows


def _batches(windows: Sequence[Window], batch_size: int, desc: str | None):
    """Indices of `windows` in batches, longest first."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    starts = range(0, len(order), batch_size)
    quiet = desc is None or len(starts) < 2 or not sys.stderr.isatty()  # no bar in logs and pipes
    for start in tqdm(starts, desc=desc, disable=quiet, leave=False):
        yield order[start:start + batch_size]


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    x = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return x


def _causal_batch(model: nn.Module, rows: Sequence[Window], pad_id: int, device) -> list[tuple[float, bool]]:
    logits = model(_right_pad([t[:-1] for t, _ in rows], pad_id).to(device))
    out = []
    for r, (tokens, n) in enumerate(rows):
        end = len(tokens) - 1  # logits at i predict tokens[i + 1]
        logprobs = logits[r, end - n:end].float().log_softmax(-1)
        target = torch.tensor(tokens[-n:], device=device)
        out.append((float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
    return out


def _draw_masks(rows: Sequence[Window], width: int, mc: MonteCarlo) -> tuple[torch.Tensor, torch.Tensor]:
    """(draws, B, width) masks over the scored tokens and (draws, B) weights n / l."""
    masks = torch.zeros(mc.draws, len(rows), width, dtype=torch.bool)
    weights = torch.zeros(mc.draws, len(rows), dtype=torch.float64)
    for r, (tokens, n) in enumerate(rows):
        generator = torch.Generator().manual_seed(mc.seed)
        u = float(torch.rand(1, generator=generator))
        for d in range(mc.draws):
            masked = int((d + u) * n / mc.draws) + 1
            masks[d, r, len(tokens) - n + torch.randperm(n, generator=generator)[:masked]] = True
            weights[d, r] = n / masked
    return masks, weights


def _diffusion_batch(model: nn.Module, rows: Sequence[Window], pad_id: int, device,
                     mc: MonteCarlo) -> list[tuple[float, bool]]:
    """Lower bounds, and is_greedy = the argmax with the whole continuation masked equals it."""
    x = _right_pad([t for t, _ in rows], pad_id)
    real = _right_pad([[1] * len(t) for t, _ in rows], 0)
    attention = None if bool(real.all()) else real.to(device)
    scored = torch.zeros_like(x, dtype=torch.bool)
    for r, (tokens, n) in enumerate(rows):
        scored[r, len(tokens) - n:len(tokens)] = True
    masks, weights = _draw_masks(rows, x.shape[1], mc)
    x, scored = x.to(device), scored.to(device)
    bounds = torch.zeros(mc.draws, len(rows), dtype=torch.float64)
    for d in range(mc.draws):
        mask = masks[d].to(device)
        logits = model(torch.where(mask, mc.mask_id, x), attention_mask=attention)
        logprobs = -F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
        bounds[d] = (logprobs * mask).sum(1).double().cpu() * weights[d]
    greedy = model(torch.where(scored, mc.mask_id, x), attention_mask=attention).argmax(-1)
    hits = ((greedy == x) | ~scored).all(1).tolist()
    return [(float(bounds[:, r].mean()), hits[r]) for r in range(len(rows))]


@torch.no_grad()
def score_windows(model: nn.Module, windows: Sequence[Window], *, batch_size: int, pad_id: int,
                  diffusion: MonteCarlo | None = None, desc: str | None = None) -> list[tuple[float, bool]]:
    """(summed log-probability of the scored tokens, whether greedy decoding gives all of them)
    per window, one forward per batch (diffusion: one per draw and one for is_greedy). The sum
    is a lower bound for a diffusion model. A window that scores nothing gets (0.0, True)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    todo = [i for i, (_, n) in enumerate(windows) if n > 0]
    for batch in _batches([windows[i] for i in todo], batch_size, desc):
        rows = [windows[todo[i]] for i in batch]
        scores = (_causal_batch(model, rows, pad_id, device) if diffusion is None
                  else _diffusion_batch(model, rows, pad_id, device, diffusion))
        for i, score in zip(batch, scores):
            results[todo[i]] = score
    model.train(was_training)
    return results


@dataclass
class Scorer:
    """A loaded checkpoint ready to score text: `max_len` is the context the windows use
    (the model's max_seq_len unless set lower), `diffusion` the bound settings of a diffusion model."""

    model: nn.Module
    tokenizer: object
    max_len: int
    diffusion: MonteCarlo | None = None

    @classmethod
    def load(cls, ckpt: str, device: str = "cpu", max_length: int | None = None, mc_draws: int = 16,
             seed: int = 0) -> "Scorer":
        model, tok, config = load_checkpoint(ckpt, resolve_device(device, "device"))
        return cls.for_model(model, tok, config.model, max_length, mc_draws, seed)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer, config, max_length: int | None = None, mc_draws: int = 16,
                  seed: int = 0) -> "Scorer":
        """A scorer of `model` built from ModelConfig `config` (a diffusion model gets the bound, and a warning)."""
        limit = config.max_seq_len
        if max_length is not None and not 1 < max_length <= limit:
            raise ConfigError(f"max_length={max_length} must be in 2..{limit}, the context this checkpoint "
                              "was built for; leave it unset to use all of it.")
        diffusion = None
        if not objective_for(config).exact_likelihood:
            if mc_draws < 1:
                raise ConfigError(f"mc_draws={mc_draws}: a diffusion bound needs at least one draw.")
            diffusion = MonteCarlo(config.mask_token_id, mc_draws, seed)
            log.warning("eval: a diffusion model: log-likelihoods are Monte-Carlo lower bounds (ELBO, %d draws, "
                        "seed %d), so accuracies and perplexities are approximate.", mc_draws, seed)
        return cls(model.eval(), tokenizer, max_length or limit, diffusion)

    @property
    def span(self) -> int:
        return self.max_len if self.diffusion else self.max_len + 1

    @torch.no_grad()
    def find_batch_size(self, largest: int = 64) -> int:
        """The largest batch, from `largest` down by halves, whose forward over full-context windows
        runs without running out of memory (lm-eval's `--batch_size auto`). Windows are scored
        longest first, so the first batch of a run is the biggest it will see."""
        device = next(self.model.parameters()).device
        size, probe = largest, MonteCarlo(self.diffusion.mask_id, 1) if self.diffusion else None
        while True:
            rows = [([self.tokenizer.bos_id] * self.span, 1)] * size
            try:
                (_diffusion_batch(self.model, rows, self.tokenizer.pad_id, device, probe) if probe
                 else _causal_batch(self.model, rows, self.tokenizer.pad_id, device))
                log.info("eval: batch_size auto -> %d (%d-token windows%s)", size, self.span,
                         "" if size < largest else f"; the search starts at max_batch_size={largest}")
                return size
            except RuntimeError as exc:  # torch.OutOfMemoryError on CUDA; the CPU allocator's is a plain RuntimeError
                if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                    raise
                if size == 1:
                    raise ConfigError(f"eval: one {self.span}-token window does not fit in memory on {device}; "
                                      "lower max_length or use a device with more memory.") from None
                size //= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], batch_size: int,
                      desc: str | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context, continuation) text pair."""
        encoded = [encode_pair(self.tokenizer, c, x) for c, x in pairs]
        return score_windows(self.model, continuation_windows(encoded, self.span), batch_size=batch_size,
                             pad_id=self.tokenizer.pad_id, diffusion=self.diffusion, desc=desc)

    def loglikelihood_rolling(self, texts: Sequence[str], batch_size: int, desc: str | None = None) -> list[float]:
        """log p(text | BOS) per text, over windows of the context length."""
        tok = self.tokenizer
        windows, owner = [], []
        for k, text in enumerate(texts):
            doc = rolling_windows(tok.encode_rendered(text), tok.bos_id, self.span)
            windows += doc
            owner += [k] * len(doc)
        scores = score_windows(self.model, windows, batch_size=batch_size, pad_id=tok.pad_id,
                               diffusion=self.diffusion, desc=desc)
        totals = [0.0] * len(texts)
        for k, (logprob, _) in zip(owner, scores):
            totals[k] += logprob
        return totals
