"""Which base learns most within the same compute: transformer vs respsann vs waveresnet?

Same data (TinyStories train head / valid head from ../shared/data), same tokenizer, same context,
batch and schedule shape; parameter counts matched within 5% (waveresnet's MLP width is chosen to
pay for its wave blocks); each run gets the same wall-clock budget on this machine (steps are
calibrated per base from a short timing run, then the cosine schedule spans exactly those steps);
each base gets a 3-value LR sweep. Then an ablation of the sine parameters (trainable vs frozen) at
each sine base's best LR. The peer is the transformer, measured in the same run; ratios are
val-loss ratios against its best. Prints one JSON object.

    python benchmarks/bases.py                      # 100 s per run, 11 runs, ~25 min on 2 cores
    python benchmarks/bases.py --budget-s 300       # the 5-minute version
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_small_lm_args, add_tinystories_args, cpu_name, require_inputs

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig
from psann.lm.models import build_model, count_parameters
from psann.lm.train.trainer import cpu_has_native_bf16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tinystories_args(p)
    p.add_argument("--budget-s", type=float, default=100.0, help="training seconds per run")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    p.add_argument("--bases", default="transformer,respsann,waveresnet")
    add_small_lm_args(p)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def non_embedding(model) -> int:
    return count_parameters(model) - model.embed.weight.numel()


def matched_configs(args, vocab: int) -> dict[str, ModelConfig]:
    """One config per base; the sine bases' MLP width is searched so that non-embedding parameters
    match the transformer's as closely as possible (multiples of 16)."""
    # dropout set: the budget is calibrated on a short fit, which the repeated-text rule would leave without it
    common = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=vocab,
                  max_seq_len=args.seq, dropout=0.0)
    reference = non_embedding(build_model(ModelConfig(base="transformer", **common)))
    configs = {}
    for base in args.bases.split(","):
        if base == "transformer":
            configs[base] = ModelConfig(base=base, **common)
            continue
        best = min(range(16, 16 * args.d_model, 16), key=lambda h: abs(
            non_embedding(build_model(ModelConfig(base=base, d_mlp=h, **common))) - reference))
        configs[base] = ModelConfig(base=base, d_mlp=best, **common)
    return configs


def seconds_per_step(dp, configs: dict[str, ModelConfig], args, steps: int = 14, **fit_options) -> dict[str, float]:
    """Median seconds per optimizer step of each base in the real training loop (a short fit with
    `fit_options`, timed from its own per-step metrics, first 4 steps dropped). A synthetic fwd/bwd
    loop did not predict the loop's cost well enough (off by up to 15% between bases) to equalise
    budgets."""
    result = {}
    for base, config in configs.items():
        lm = psannLM(**config.to_dict())
        with tempfile.TemporaryDirectory() as out:
            lm.fit(dp, max_steps=steps, batch_tokens=args.batch_tokens, lr=1e-3, warmup_steps=1, eval_interval_steps=0,
                   log_interval_steps=1, progress=False, plot=False, checkpoint_dir=out, eval_batches=1, **fit_options)
            elapsed = [json.loads(line)["elapsed_s"] for line in open(Path(out) / "metrics.jsonl") if '"train"' in line]
        result[base] = statistics.median(b - a for a, b in zip(elapsed[4:], elapsed[5:]))
    return result


def run(dp, config: ModelConfig, lr: float, steps: int, args, sine_params=None) -> dict:
    values = config.to_dict()
    if sine_params is not None:
        values["sine_params"] = sine_params
    lm = psannLM(**values)
    with tempfile.TemporaryDirectory() as out:
        lm.fit(dp, max_steps=steps, batch_tokens=args.batch_tokens, lr=lr, warmup_steps=max(1, steps // 20),
               eval_interval_steps=0, log_interval_steps=max(1, steps // 10), progress=False, plot=False,
               checkpoint_dir=out, seed=args.seed)
        train_records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"train"' in line]
    summary = lm.last_run
    train_s = train_records[-1]["elapsed_s"]
    return {"base": config.base, "lr": lr, "sine_params": sine_params, "steps": summary["steps"],
            "tokens": summary["tokens_seen"], "train_s": round(train_s, 1),
            "tok_per_s": round(summary["tokens_seen"] / train_s, 1), "val_loss": round(summary["val_loss"], 4),
            "final_train_loss": round(train_records[-1]["loss"], 4)}


def main(argv=None) -> None:
    args = parse_args(argv)
    require_inputs(args)
    logging.getLogger("psann.lm").setLevel(logging.WARNING)
    dp = psannLMDataPrep([args.train], tokenizer="tokenizers", vocab_size=args.vocab, max_length=args.seq,
                         doc_separator="<|endoftext|>", val_texts=[args.valid], seed=args.seed)
    configs = matched_configs(args, dp.vocab_size)
    amp_dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    lrs = [float(v) for v in args.lrs.split(",")]
    started = time.perf_counter()
    models, runs = {}, []
    step_times = seconds_per_step(dp, configs, args)
    for base, config in configs.items():
        step_s = step_times[base]
        steps = max(10, int(args.budget_s / step_s))
        model = build_model(config)
        models[base] = {"params": count_parameters(model), "non_embedding_params": non_embedding(model),
                        "d_mlp": config.d_mlp or config.mlp_hidden,
                        "calibrated_s_per_step": round(step_s, 4), "steps": steps}
        for lr in lrs:
            runs.append(run(dp, config, lr, steps, args))
            print(json.dumps(runs[-1]), file=sys.stderr)
    best = {base: min((r for r in runs if r["base"] == base), key=lambda r: r["val_loss"]) for base in configs}
    ablation = []
    if not args.no_ablation:
        for base in configs:
            if base == "transformer":
                continue
            frozen = run(dp, configs[base], best[base]["lr"], models[base]["steps"], args,
                         sine_params={"trainable": False})
            ablation.append({"base": base, "lr": best[base]["lr"], "trainable_val_loss": best[base]["val_loss"],
                             "frozen_val_loss": frozen["val_loss"], "frozen_run": frozen})
            print(json.dumps(frozen), file=sys.stderr)
    peer = best.get("transformer")
    result = {
        "question": __doc__.split("\n")[0],
        "data": {"train": args.train, "valid": args.valid, "train_tokens": dp.train_windows.data.n_tokens,
                 "valid_tokens": dp.val_windows.data.n_tokens, "tokenizer": f"byte-level BPE (tokenizers), vocab {dp.vocab_size}"},
        "setup": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads, "seq": args.seq,
                  "batch_tokens": args.batch_tokens, "budget_s": args.budget_s, "lrs": lrs,
                  "precision": "bf16 autocast" if amp_dtype else "fp32", "schedule": "warmup 5%, cosine to lr/10",
                  "threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__},
        "models": models,
        "runs": runs,
        "best": {base: {"lr": r["lr"], "val_loss": r["val_loss"], "tokens": r["tokens"],
                        "val_loss_ratio_vs_transformer": round(r["val_loss"] / peer["val_loss"], 4) if peer else None}
                 for base, r in best.items()},
        "sine_ablation": ablation,
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
