"""Autoregressive vs masked diffusion at matched compute: how far is the diffusion bound from the AR loss?

Same Transformer size, same data (TinyStories train head / valid head from ../shared/data), same
BPE tokenizer, same wall-clock budget on this machine (steps calibrated per objective from a short
run of the real training loop), same LR and schedule shape. The causal model is scored by its
validation loss; the diffusion model by its Monte-Carlo NELBO (an upper bound on its NLL; fixed
seed, stratified t, standard error printed). Both also in bits per byte of the validation text.
The peer is the causal model, measured in the same run; the ratio is exp(NELBO) / exp(AR loss),
the perplexity gap (published anchor: MDLM within about 1.15-1.3x of AR). Also the validation
cross-entropy of the training unigram distribution, the floor of a model that ignores context.
With --causal-share S (default 0.5) a third model shares the same total budget: a causal run for
S of it, then the diffusion objective started from its final weights (train.init_from, logits
shifted as in DiffuLLaMA / Dream so the causal head's next-token predictions carry over) for the
rest, its attention opened from causal to bidirectional over the first --anneal-share of those
steps (DiffuLLaMA's mask annealing; 0: bidirectional at once), at --adapt-lr. These take
comma-separated lists (one causal run per S, one diffusion run per S, anneal share and adapt lr).
--pretrain-decay no holds the causal run's lr after warmup instead of decaying it (the diffusion
run restarts at a high lr, undoing the decay). --blocks lists the diffusion models: 0 the
whole-window denoiser (MDLM), N a block diffusion model over blocks of N tokens
(model.diffusion_block, scored by its block NELBO; it starts from the causal checkpoint without
shifted logits), each trained from scratch (unless --no-scratch) and from every causal share.
Each kind's step time is calibrated on its own. --causal-dropout D adds a causal peer with residual
dropout D (the default recipe's for a run that reads its text 5 times or more; the ratios are taken
against the better causal model), --adapt-dropout gives the diffusion-from-causal runs residual
dropout (comma-separated for several). The masked CE by noise level (10 bins of t) shows where
each bound's excess lies. Prints one JSON object with samples from every model.

    python benchmarks/diffusion_vs_ar.py                 # 300 s per model, ~15 min on 2 cores
    python benchmarks/diffusion_vs_ar.py --budget-s 600
    python benchmarks/diffusion_vs_ar.py --budget-s 120 --causal-share 0.5,0.75 --anneal-share 0,0.5
    python benchmarks/diffusion_vs_ar.py --budget-s 120 --causal-share 0.25,0.5 --adapt-lr 1e-3,2e-3 --no-scratch
    python benchmarks/diffusion_vs_ar.py --budget-s 120 --causal-share 0.25 --blocks 0,4,16 --no-scratch
    python benchmarks/diffusion_vs_ar.py --budget-s 300 --causal-share 0.25 --causal-dropout 0.1 --no-scratch
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import add_small_lm_args, add_tinystories_args, cpu_name, require_inputs, validation_head

from bases import seconds_per_step
from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig
from psann.lm.objectives.base import rank_batches
from psann.lm.objectives.block_layout import block_layout, block_targets, laid_out
from psann.lm.objectives.causal import evaluate_counts
from psann.lm.objectives.diffusion import evaluate_nelbo
from psann.lm.models import count_parameters
from psann.lm.train.trainer import cpu_has_native_bf16


VALID_BYTES = 300_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tinystories_args(p, valid_bytes=VALID_BYTES)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--lr", type=float, default=2e-3)
    add_small_lm_args(p)
    p.add_argument("--mc-draws", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--causal-share", default="0.5",
                   help="also train diffusion models from a causal checkpoint: this share of the budget causal, the rest "
                        "diffusion; comma-separated for several (0: skip)")
    p.add_argument("--anneal-share", default="0",
                   help="of each diffusion-from-causal run, the share of its steps over which the attention opens from "
                        "causal to bidirectional (train.attention_anneal_steps); comma-separated: one run per share, "
                        "all from the same causal checkpoint")
    p.add_argument("--adapt-lr", default=None, help="the diffusion-from-causal runs' lr (default: --lr); comma-separated for several")
    p.add_argument("--adapt-dropout", default="0",
                   help="the diffusion-from-causal runs' residual dropout; comma-separated for several")
    p.add_argument("--pretrain-decay", choices=("yes", "no"), default="yes",
                   help="no: the causal pretraining holds its lr after warmup (no wsd decay)")
    p.add_argument("--no-scratch", action="store_true", help="skip the diffusion models trained from scratch")
    p.add_argument("--blocks", default="0",
                   help="diffusion models to train: 0 the whole-window denoiser (MDLM), N a block diffusion model over blocks "
                        "of N tokens (model.diffusion_block; from a causal checkpoint it needs no shifted logits); "
                        "comma-separated for several")
    p.add_argument("--causal-dropout", type=float, default=None,
                   help="also train the causal peer with this residual dropout (the default recipe's for a run that "
                        "repeats its text); ratios are then taken against the better causal model")
    args = p.parse_args(argv)
    args.blocks = [int(x) for x in args.blocks.split(",")]
    args.adapt_lrs = [float(x) for x in (args.adapt_lr or str(args.lr)).split(",")]
    args.adapt_dropouts = [float(x) for x in args.adapt_dropout.split(",")]
    args.causal_shares = [float(x) for x in args.causal_share.split(",") if float(x) > 0]
    args.anneal_shares = [float(x) for x in args.anneal_share.split(",")]
    if any(not 0 < x < 1 for x in args.causal_shares) or any(not 0 <= x < 1 for x in args.anneal_shares):
        p.error("--causal-share values lie in (0, 1) (or 0 to skip), --anneal-share values in [0, 1)")
    return args


@torch.no_grad()
def masked_ce_by_t(model, windows, mask_id: int, pad_id: int, block: int = 0, bins: int = 10, max_batches: int = 8,
                   seed: int = 0) -> list[float]:
    """Mean cross-entropy of the masked tokens with every token masked at the middle t of each of
    `bins` equal bins of [0, 1] (block diffusion: in every block, the blocks before it clean): the
    NELBO per token is the mean of this curve over t (the midpoint rule), so it shows which noise
    levels hold the bound's excess over the causal loss."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [0.0] * bins, [0] * bins
    for x, _, n_real in rank_batches(windows, 16, max_batches, 0, 1):
        real = x != pad_id
        real[n_real:] = False
        layout = block_layout(x.shape[1], block) if block else None
        for b in range(bins):
            masked = (torch.rand(x.shape, generator=generator) < (b + 0.5) / bins) & real
            if layout is None:
                targets = torch.where(masked, x, -100)
                logits = model(torch.where(masked, torch.full_like(x, mask_id), x))
            else:
                targets = block_targets(x, masked, layout)[0]
                inputs = laid_out(x, masked, layout, mask_id)
                logits = model(inputs.ids, **inputs.kwargs)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
            sums[b] += float(ce)
            counts[b] += int((targets != -100).sum())
    return [round(s / max(1, c), 3) for s, c in zip(sums, counts)]


def main(argv=None) -> None:
    args = parse_args(argv)
    require_inputs(args)
    logging.getLogger("psann.lm").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        valid, val_docs = validation_head(args, tmp)
        dp = psannLMDataPrep([args.train], tokenizer="tokenizers", vocab_size=args.vocab, max_length=args.seq,
                             doc_separator="<|endoftext|>", val_texts=[valid], seed=args.seed)
    val_bytes = len("\n\n".join(val_docs).encode("utf-8"))
    # The floor a model reaches from token frequencies alone (add-one smoothed train unigram).
    train, val = dp.train_windows.data, dp.val_windows.data
    counts = np.bincount(train.read(0, train.n_tokens), minlength=dp.vocab_size) + 1
    unigram = float(-np.log(counts / counts.sum())[val.read(0, val.n_tokens)].mean())
    # dropout set: the budget is calibrated on a short fit, which the repeated-text rule would leave without it
    common = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, dropout=0.0)
    def model_keys(block: int | None) -> dict:
        """None: the causal model; 0: the whole-window denoiser; N: block diffusion over N tokens."""
        return {} if block is None else {"objective": "diffusion", **({"diffusion_block": block} if block else {})}

    step_s = {}  # the block diffusion layout costs a window of ~2L positions: each kind is calibrated
    for block in (None, *args.blocks, *(["dropout"] if args.causal_dropout else [])):
        extra = {"mask_token_id": dp.vocab_size} if block not in (None, "dropout") else {}
        keys = {**common, "dropout": args.causal_dropout, "attention_dropout": 0.0} if block == "dropout" else common
        cfg = ModelConfig(**keys, **model_keys(None if block == "dropout" else block), **extra,
                          vocab_size=dp.vocab_size + bool(extra), max_seq_len=args.seq)
        step_s[block] = seconds_per_step(dp, {"run": cfg}, argparse.Namespace(batch_tokens=args.batch_tokens))["run"]

    def fit_and_score(name: str, block: int | None, steps: int, tmp_dir: str, lr: float = args.lr, **options) -> dict:
        objective = "causal" if block in (None, "dropout") else "diffusion"
        model = {**common, **model_keys(None if block == "dropout" else block), **options.pop("model", {})}
        if block == "dropout":  # on the residual branches, as the default recipe's rule puts it
            model.update(dropout=args.causal_dropout, attention_dropout=0.0)
        lm = psannLM(**model)
        out = f"{tmp_dir}/{name}"
        lm.fit(dp, max_steps=steps, batch_tokens=args.batch_tokens, lr=lr, warmup_steps=max(1, steps // 20),
               eval_interval_steps=0, log_interval_steps=max(1, steps // 20), progress=False, plot=False,
               checkpoint_dir=out, seed=args.seed, eval_batches=1, **options)
        train = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"train"' in line]
        device = torch.device("cpu")
        if objective == "causal":
            counts = evaluate_counts(lm.model, dp.val_windows, 16, device)
            total, n, se = counts["loss_sum"], counts["tokens"], 0.0
        else:
            r = evaluate_nelbo(lm.model, dp.val_windows, 16, device, mask_id=lm.model_config.mask_token_id,
                               draws=args.mc_draws, seed=args.seed, pad_id=dp.tokenizer.pad_id, block=block or None)
            total, n, se = r["nelbo_sum"], r["tokens"], math.sqrt(r["variance"]) / r["tokens"]
            by_t = masked_ce_by_t(lm.model, dp.val_windows, lm.model_config.mask_token_id, dp.tokenizer.pad_id, block,
                                  seed=args.seed)
        loss = total / n
        sample_opts = {"temperature": 0.8, "seed": args.seed, "max_new_tokens": 48}
        if objective == "diffusion":
            sample_opts.update(block_length=block or 16, steps=48)
        else:
            sample_opts.update(top_k=40)
        row = {
            "params": count_parameters(lm.model), "calibrated_s_per_step": round(step_s[block], 4), "steps": steps,
            "tokens": lm.last_run["tokens_seen"], "train_s": round(train[-1]["elapsed_s"], 1),
            "final_train_loss": round(train[-1]["loss"], 4),
            "val_nats_per_token": round(loss, 4), "val_nats_per_token_se": round(se, 4),
            "val_bpb": round(total / math.log(2) / val_bytes, 4), "val_ppl": round(math.exp(loss), 2),
            "val_tokens": n, "bound": objective == "diffusion",
            **({"masked_ce_by_t": by_t} if objective == "diffusion" else {}),
            "samples": [lm.generate(p, **sample_opts) for p in ("Once upon a time", "The little dog")],
        }
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
        return row

    def block_name(block: int) -> str:
        return f"_block{block}" if block else ""

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["causal"] = fit_and_score("causal", None, max(10, int(args.budget_s / step_s[None])), tmp)
        if args.causal_dropout:
            runs["causal_dropout"] = fit_and_score("causal_dropout", "dropout",
                                                   max(10, int(args.budget_s / step_s["dropout"])), tmp)
        for block in [] if args.no_scratch else args.blocks:
            name = "diffusion" + block_name(block)
            runs[name] = fit_and_score(name, block, max(10, int(args.budget_s / step_s[block])), tmp)
        # the pretraining's lr after warmup: the wsd default, or held (min_lr = lr)
        pretrain = {} if args.pretrain_decay == "yes" else {"min_lr": args.lr}
        for share in args.causal_shares:
            # The same total budget: a causal run for `share` of it, then the diffusion objective from
            # its final weights (the whole-window denoiser with shifted logits, so the causal head's
            # predictions carry over; a block diffusion model reads its blocks that way already).
            causal_steps = max(10, int(share * args.budget_s / step_s[None]))
            pre = fit_and_score(f"causal_pretrain_{share}", None, causal_steps, tmp, **pretrain)
            for block in args.blocks:
                adapt_steps = max(10, int((1 - share) * args.budget_s / step_s[block]))
                for anneal in args.anneal_shares if not block else [0]:
                    for lr, dropout in itertools.product(args.adapt_lrs, args.adapt_dropouts):
                        name = (f"diffusion_from_causal_{share}" + block_name(block) + (f"_anneal_{anneal}" if anneal else "")
                                + (f"_lr_{lr:g}" if len(args.adapt_lrs) > 1 else "")
                                + (f"_dropout_{dropout:g}" if len(args.adapt_dropouts) > 1 else ""))
                        model = {"dropout": dropout, "attention_dropout": 0.0, **({} if block else {"shift_logits": True})}
                        row = fit_and_score(name, block, adapt_steps, tmp, lr=lr, model=model,
                                            init_from=f"{tmp}/causal_pretrain_{share}/checkpoints/final",
                                            attention_anneal_steps=round(anneal * adapt_steps))
                        runs[name] = {**row, "causal_share": share, "anneal_share": anneal, "adapt_lr": lr,
                                      "adapt_dropout": dropout,
                                      "causal_pretrain": {k: pre[k] for k in ("steps", "train_s", "val_nats_per_token")},
                                      "train_s_total": round(pre["train_s"] + row["train_s"], 1)}
    peer = min((k for k in ("causal", "causal_dropout") if k in runs), key=lambda k: runs[k]["val_nats_per_token"])
    ar = runs[peer]
    print(json.dumps({
        "question": __doc__.split("\n")[0],
        "data": {"train": args.train, "valid": f"{args.valid} (first {args.valid_bytes:,} bytes, {len(val_docs)} stories)",
                 "valid_bytes": val_bytes, "tokenizer": f"byte-level BPE (tokenizers), vocab {dp.vocab_size}"},
        "setup": {**common, "seq": args.seq, "batch_tokens": args.batch_tokens, "budget_s": args.budget_s,
                  "lr": args.lr, "pretrain_decay": args.pretrain_decay, "schedule": "warmup 5%, then the default (wsd: the last 30% to lr/10)", "optimizer": "the default (auto: Muon)", "mc_draws": args.mc_draws,
                  "diffusion": "eps 1e-3, random_trunc_prob 0.01, stratified t",
                  "precision": "bf16 autocast" if cpu_has_native_bf16() else "fp32",
                  "threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__},
        "runs": runs,
        "unigram_val_nats_per_token": round(unigram, 4),
        "ratio_peer": peer,
        "ppl_ratio_bound_vs_ar": {name: round(math.exp(r["val_nats_per_token"] - ar["val_nats_per_token"]), 3)
                                  for name, r in runs.items() if r["bound"]},
        "bpb_ratio_bound_vs_ar": {name: round(r["val_bpb"] / ar["val_bpb"], 4) for name, r in runs.items() if r["bound"]},
        "total_s": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
