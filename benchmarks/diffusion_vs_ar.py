"""Autoregressive vs masked diffusion at matched compute: how far is the diffusion bound from the AR loss?

Same Transformer size, same data (TinyStories train head / valid head from ../shared/data), same
BPE tokenizer, same wall-clock budget on this machine (steps calibrated per objective from a short
run of the real training loop), same LR and schedule shape. The causal model is scored by its
validation loss; the diffusion model by its Monte-Carlo NELBO (an upper bound on its NLL; fixed
seed, stratified t, standard error printed). Both also in bits per byte of the validation text.
The peer is the causal model, measured in the same run; the ratio is exp(NELBO) / exp(AR loss),
the perplexity gap (published anchor: MDLM within about 1.15-1.3x of AR). Also the validation
cross-entropy of the training unigram distribution, the floor of a model that ignores context.
With --causal-share S (default 0.25, the best share measured) a third model shares the same
total budget: a causal run for S of it, then the diffusion objective started from its final
weights (train.init_from, logits shifted as in DiffuLLaMA / Dream so the causal head's next-token
predictions carry over) for the rest (the budget less the causal run's real time, at the step
time of a short run started from that checkpoint), its attention opened from causal to
bidirectional over the first --anneal-share of those steps (DiffuLLaMA's mask annealing; 0:
bidirectional at once), at --adapt-lr. These take comma-separated lists (one causal run per S,
one diffusion run per S, anneal share, adapt lr and adapt dropout).
--no-scratch skips the diffusion model trained from scratch. Each kind's step time is calibrated
on its own. --causal-dropout D adds a causal peer with residual dropout D (the default recipe's
for a run that reads its text 5 times or more; the ratios are taken against the better causal
model), --adapt-dropout gives the diffusion-from-causal runs residual dropout. The masked CE by
noise level (10 bins of t) shows where each bound's excess lies. Prints one JSON object with
samples from every model.

    python benchmarks/diffusion_vs_ar.py                 # 300 s per model, ~15 min on 2 cores
    python benchmarks/diffusion_vs_ar.py --budget-s 600
    python benchmarks/diffusion_vs_ar.py --budget-s 120 --causal-share 0.5,0.75 --anneal-share 0,0.5
    python benchmarks/diffusion_vs_ar.py --budget-s 120 --causal-share 0.15,0.25 --adapt-lr 2e-3,3e-3 --no-scratch
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
    p.add_argument("--causal-share", default="0.25",
                   help="also train diffusion models from a causal checkpoint: this share of the budget causal, the rest "
                        "diffusion; comma-separated for several (0: skip)")
    p.add_argument("--anneal-share", default="0",
                   help="of each diffusion-from-causal run, the share of its steps over which the attention opens from "
                        "causal to bidirectional (train.attention_anneal_steps); comma-separated: one run per share, "
                        "all from the same causal checkpoint")
    p.add_argument("--adapt-lr", default=None, help="the diffusion-from-causal runs' lr (default: --lr); comma-separated for several")
    p.add_argument("--adapt-dropout", default="0",
                   help="the diffusion-from-causal runs' residual dropout; comma-separated for several")
    p.add_argument("--no-scratch", action="store_true", help="skip the diffusion model trained from scratch")
    p.add_argument("--causal-dropout", type=float, default=None,
                   help="also train the causal peer with this residual dropout (the default recipe's for a run that "
                        "repeats its text); ratios are then taken against the better causal model")
    args = p.parse_args(argv)
    args.adapt_lrs = [float(x) for x in (args.adapt_lr or str(args.lr)).split(",")]
    args.adapt_dropouts = [float(x) for x in args.adapt_dropout.split(",")]
    args.causal_shares = [float(x) for x in args.causal_share.split(",") if float(x) > 0]
    args.anneal_shares = [float(x) for x in args.anneal_share.split(",")]
    if any(not 0 < x < 1 for x in args.causal_shares) or any(not 0 <= x < 1 for x in args.anneal_shares):
        p.error("--causal-share values lie in (0, 1) (or 0 to skip), --anneal-share values in [0, 1)")
    return args


@torch.no_grad()
def masked_ce_by_t(model, windows, mask_id: int, pad_id: int, bins: int = 10, max_batches: int = 8,
                   seed: int = 0) -> list[float]:
    """Mean cross-entropy of the masked tokens with every token masked at the middle t of each of
    `bins` equal bins of [0, 1]: the NELBO per token is the mean of this curve over t (the midpoint
    rule), so it shows which noise levels hold the bound's excess over the causal loss."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums, counts = [0.0] * bins, [0] * bins
    for x, _, n_real in rank_batches(windows, 16, max_batches, 0, 1):
        real = x != pad_id
        real[n_real:] = False
        for b in range(bins):
            masked = (torch.rand(x.shape, generator=generator) < (b + 0.5) / bins) & real
            targets = torch.where(masked, x, -100)
            logits = model(torch.where(masked, torch.full_like(x, mask_id), x))
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
    kinds = {"causal": {}, "diffusion": {"objective": "diffusion"}}  # model keys of each kind of run
    if args.causal_dropout:  # on the residual branches, as the default recipe's rule puts it
        kinds["causal_dropout"] = {"dropout": args.causal_dropout, "attention_dropout": 0.0}

    def step_seconds(kind: str, model: dict | None = None, **fit_options) -> float:
        """The calibrated step time of a run of `kind` with `model` keys on top."""
        extra = {"mask_token_id": dp.vocab_size} if kind == "diffusion" else {}
        cfg = ModelConfig(**{**common, **kinds[kind], **(model or {})}, **extra,
                          vocab_size=dp.vocab_size + bool(extra), max_seq_len=args.seq)
        return seconds_per_step(dp, {kind: cfg}, argparse.Namespace(batch_tokens=args.batch_tokens), **fit_options)[kind]

    step_s = {kind: step_seconds(kind) for kind in kinds}

    def fit_and_score(name: str, kind: str, steps: int, tmp_dir: str, lr: float = args.lr, **options) -> dict:
        objective = "diffusion" if kind == "diffusion" else "causal"
        lm = psannLM(**{**common, **kinds[kind], **options.pop("model", {})})
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
                               draws=args.mc_draws, seed=args.seed, pad_id=dp.tokenizer.pad_id)
            total, n, se = r["nelbo_sum"], r["tokens"], math.sqrt(r["variance"]) / r["tokens"]
            by_t = masked_ce_by_t(lm.model, dp.val_windows, lm.model_config.mask_token_id, dp.tokenizer.pad_id, seed=args.seed)
        loss = total / n
        sample_opts = {"temperature": 0.8, "seed": args.seed, "max_new_tokens": 48}
        if objective == "diffusion":
            sample_opts.update(block_length=16, steps=48)
        else:
            sample_opts.update(top_k=40)
        row = {
            "params": count_parameters(lm.model), "calibrated_s_per_step": round(step_s[kind], 4), "steps": steps,
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

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [k for k in kinds if not (k == "diffusion" and args.no_scratch)]:
            runs[kind] = fit_and_score(kind, kind, max(10, int(args.budget_s / step_s[kind])), tmp)
        for share in args.causal_shares:
            # The same total budget: a causal run for `share` of it, then the diffusion objective from
            # its final weights (logits shifted so the causal head's predictions carry over).
            causal_steps = max(10, int(share * args.budget_s / step_s["causal"]))
            pre = fit_and_score(f"causal_pretrain_{share}", "causal", causal_steps, tmp)
            start = f"{tmp}/causal_pretrain_{share}/checkpoints/final"
            # The rest of the budget, at the step time of a denoiser started from this checkpoint as it
            # will run (started ones ran ~8% slower per step than one from random weights).
            adapt_s = step_seconds("diffusion", {"shift_logits": True}, init_from=start)
            adapt_steps = max(10, int((args.budget_s - pre["train_s"]) / adapt_s))
            for anneal, lr, dropout in itertools.product(args.anneal_shares, args.adapt_lrs, args.adapt_dropouts):
                name = (f"diffusion_from_causal_{share}" + (f"_anneal_{anneal}" if anneal else "")
                        + (f"_lr_{lr:g}" if len(args.adapt_lrs) > 1 else "")
                        + (f"_dropout_{dropout:g}" if len(args.adapt_dropouts) > 1 else ""))
                row = fit_and_score(name, "diffusion", adapt_steps, tmp, lr=lr,
                                    model={"shift_logits": True, "dropout": dropout, "attention_dropout": 0.0},
                                    init_from=start,
                                    attention_anneal_steps=round(anneal * adapt_steps))
                runs[name] = {**row, "calibrated_s_per_step": round(adapt_s, 4), "causal_share": share, "anneal_share": anneal,
                              "adapt_lr": lr, "adapt_dropout": dropout,
                              "causal_pretrain": {k: pre[k] for k in ("steps", "train_s", "val_nats_per_token")},
                              "train_s_total": round(pre["train_s"] + row["train_s"], 1)}
    peer = min((k for k in ("causal", "causal_dropout") if k in runs), key=lambda k: runs[k]["val_nats_per_token"])
    ar = runs[peer]
    print(json.dumps({
        "question": __doc__.split("\n")[0],
        "data": {"train": args.train, "valid": f"{args.valid} (first {args.valid_bytes:,} bytes, {len(val_docs)} stories)",
                 "valid_bytes": val_bytes, "tokenizer": f"byte-level BPE (tokenizers), vocab {dp.vocab_size}"},
        "setup": {**common, "seq": args.seq, "batch_tokens": args.batch_tokens, "budget_s": args.budget_s,
                  "lr": args.lr, "schedule": "warmup 5%, then the default (wsd: the last 30% to lr/10)", "optimizer": "the default (auto: Muon)", "mc_draws": args.mc_draws,
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
