"""Which recipe learns most per second: psann-lm's default Transformer against the same model with recipe changes, and against a nanoGPT baseline, on a fixed task.

Tasks (`--task`):
  shakespeare  characters of ../shared/data/tinyshakespeare/input.txt, the first 90% to train on
               and the last 10% to validate (every window of 64 characters scored once); 4 layers,
               4 heads, width 128, context 64, 12 windows (768 tokens) per step, `--steps` 2,000
               steps (1.54M tokens), lr 1e-3 -> 1e-4, warmup 100 (the schedule is the contender's), fp32.
  tinystories  the 2 MiB TinyStories train head with a 4,096-token byte-level BPE trained on it,
               the whole valid head scored (every token once); 4 layers, 4 heads, width 192,
               context 256, 16 windows (4,096 tokens) per step, lr 1e-3 -> 1e-4, warmup 100,
               fp32, `--seconds` of training each (default 600).

`--seq` sets another context length (the windows per step scaled to keep the tokens per step; the
validation windows get the same length, so compare losses within one context).

A contender is `default` (the current defaults), `nanogpt` (benchmarks/nanogpt_baseline.py: GPT-2
as nanoGPT's model.py describes it, trained by its AdamW recipe with the same lr, schedule and
batches; `nanogpt+drop1` with its dropout at 0.1) or a `+`-joined list of changes (see CHANGES), e.g. `qknorm+relu2+wsd`, on --base or on
the base before a colon (`hnet:comp3`; the byte families read the text as bytes). Every contender
runs with each seed, in turn within a seed so the machine's drift hits all alike. Budgets:
  --budget tokens   every contender trains `--steps` steps (equal tokens);
  --budget seconds  every contender trains for as many steps as fit in `--seconds` (equal
                    wall-clock; shakespeare default: the default contender's time for --steps),
                    from its mean step time in a short calibration run; the JSON reports the
                    training time each run really took.
Reports validation nats per token (per character on shakespeare), tokens/s, training time, and
ratios against the first contender of the same seed.

    python benchmarks/recipe.py --contenders previous,default,nanogpt       # equal tokens, seeds 0 and 1
    python benchmarks/recipe.py --contenders previous,default --budget seconds
    python benchmarks/recipe.py --task tinystories --contenders nanogpt,previous,default --seeds 0
    python benchmarks/recipe.py --steps 200 --seeds 0                        # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import nanogpt_baseline
from _common import TINYSTORIES, cpu_name, to_json

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig, TrainConfig
from psann.lm.data.prepare import PreparedData
from psann.lm.objectives.causal import evaluate_counts
from psann.lm.train.run import with_run_dropout

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TASKS = {
    "shakespeare": {"model": {"d_model": 128, "n_layers": 4, "n_heads": 4}, "seq": 64, "batch_windows": 12},
    "tinystories": {"model": {"d_model": 192, "n_layers": 4, "n_heads": 4}, "seq": 256, "batch_windows": 16,
                    "vocab": 4096},
}
BASE_TRAIN = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100}
# name -> (model options, train options); a contender applies several in the order given.
CHANGES: dict[str, tuple[dict, dict]] = {
    "previous": ({"qk_norm": False, "mlp": "swiglu", "tie_embeddings": True, "logit_softcap": None,
                  "zero_init_residual": False, "value_embeddings": False, "dropout": 0.0},
                 {"optimizer": "adamw", "lr_schedule": "cosine", "betas": (0.9, 0.95)}),  # the defaults before the recipe work
    "qknorm": ({"qk_norm": True}, {}),
    "relu2": ({"mlp": "relu2"}, {}),
    "untied": ({"tie_embeddings": False}, {}),
    "softcap": ({"logit_softcap": 15.0}, {}),
    "zeroinit": ({"zero_init_residual": True}, {}),
    "ve": ({"value_embeddings": True}, {}),
    "wsd": ({}, {"lr_schedule": "wsd", "decay_fraction": 0.3}),
    "wsd50": ({}, {"lr_schedule": "wsd", "decay_fraction": 0.5}),
    "muon": ({}, {"optimizer": "muon"}),
    "compile": ({}, {"compile": True}),
    "ratio01": ({"ratio_loss_weight": 0.1}, {}),      # H-Net: the ratio loss's weight (default 0.03)
    "ratio001": ({"ratio_loss_weight": 0.01}, {}),
    "comp3": ({"target_compression": [3.0]}, {}),     # H-Net: bytes per chunk (default 6)
    "stagelr": ({"stage_lr_mult": [2.0, 1.0]}, {}),   # H-Net: the outer stage at twice the lr
    "enc2": ({"num_blocks": [[2, 0, 2], [1]]}, {}),   # H-Net: deeper encoder/decoder, shallower main
    "lr2x": ({}, {"lr": 2e-3, "min_lr": 2e-4}),
    "lr3x": ({}, {"lr": 3e-3, "min_lr": 3e-4}),
    "lr5x": ({}, {"lr": 5e-3, "min_lr": 5e-4}),
    "minlr0": ({}, {"min_lr": 0.0}),
    "nowd": ({}, {"weight_decay": 0.0}),
    "wd05": ({}, {"weight_decay": 0.5}),
    "drop0": ({"dropout": 0.0}, {}),                  # the default without its repeated-text dropout
    "drop1": ({"dropout": 0.1}, {}),                  # on the residual branches and the attention weights
    "rdrop1": ({"dropout": 0.1, "attention_dropout": 0.0}, {}),  # on the residual branches only
    "drop2": ({"dropout": 0.2}, {}),
    "beta99": ({}, {"betas": (0.9, 0.99)}),
}


# Changes to how the windows are drawn (data keys).
DATA_CHANGES = {"randwin": {"sampling": "random"}, "previous": {"sampling": "shuffle"}}


def contender_data(dp, name: str):
    """dp, or the same windows drawn as the contender's data changes say."""
    changes = {k: v for part in name.split("+") for k, v in DATA_CHANGES.get(part, {}).items()}
    return PreparedData(dataclasses.replace(dp.config, **changes), dp.tokenizer, dp.train_windows, dp.val_windows) if changes else dp


def split_base(name: str, base: str) -> tuple[str, str]:
    """`base:changes` -> (base, changes); a name without a base runs on --base."""
    return tuple(name.split(":", 1)) if ":" in name else (base, name)


def contender_options(name: str) -> tuple[dict, dict]:
    name = name.split(":", 1)[-1]
    model, train = {}, dict(BASE_TRAIN)
    if name in ("default", "nanogpt"):
        return model, train
    if is_nanogpt(name):  # nanogpt+drop1: the baseline with nanoGPT's own dropout
        for part in name.split("+")[1:]:
            if not part.startswith("drop") or part not in CHANGES:
                raise SystemExit(f"nanogpt takes only dropout changes (drop1, drop2), not {part!r}")
            model.update(CHANGES[part][0])
        return model, train
    for part in name.split("+"):
        if part in DATA_CHANGES and part not in CHANGES:
            continue
        if part not in CHANGES:
            raise SystemExit(f"unknown change {part!r} in contender {name!r}; known: default, nanogpt, {', '.join([*CHANGES, *DATA_CHANGES])}")
        model.update(CHANGES[part][0])
        train.update(CHANGES[part][1])
    return model, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="shakespeare")
    p.add_argument("--contenders", default="previous,default",
                   help="comma-separated; each default, nanogpt, or changes joined by +, optionally after base: (e.g. hnet:comp3)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--budget", choices=("tokens", "seconds"), default=None, help="default: tokens (shakespeare), seconds (tinystories)")
    p.add_argument("--seconds", type=float, default=None, help="the equal wall-clock budget (tinystories default 600)")
    p.add_argument("--base", default="transformer", help="model family (the recipe applied to another base)")
    p.add_argument("--seq", type=int, default=None, help="context length instead of the task's, at the same tokens per step")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.budget = args.budget or ("seconds" if args.task == "tinystories" else "tokens")
    if args.seconds is None and args.task == "tinystories":
        args.seconds = 600.0
    return args


# Model keys a family needs on top of the task's (H-Net: two stages, 1 + 1 encoder/decoder blocks
# around 2 main blocks, the task's 4 layers in all).
FAMILY_MODEL = {"hnet": {"d_model": [128, 128], "num_blocks": [[1, 0, 1], [2]]}}


def prepare(task: str, bases: set[str], seq: int) -> psannLMDataPrep:
    if task == "shakespeare":
        if not SHAKESPEARE.exists():
            sys.exit(f"missing {SHAKESPEARE}: this task reads ../shared/data/tinyshakespeare")
        text = SHAKESPEARE.read_text(encoding="utf-8")
        cut = int(0.9 * len(text))
        # The byte families read bytes; this text is ASCII, so a byte is a character here too.
        byte_level = {b in ("byte", "hnet") for b in bases}
        if len(byte_level) > 1:
            sys.exit("the byte families (byte, hnet) read bytes, the others characters: compare them in separate runs")
        tokenizer = "byte" if byte_level.pop() else "char"
        return psannLMDataPrep([text[:cut]], tokenizer=tokenizer, max_length=seq, val_texts=[text[cut:]])
    train, valid = TINYSTORIES / "tinystories_v1_train_head2MiB.txt", TINYSTORIES / "tinystories_v1_valid_head.txt"
    if not train.exists():
        sys.exit(f"missing {train}: this task reads ../shared/data/tinystories")
    return psannLMDataPrep([str(train)], tokenizer="tokenizers", vocab_size=TASKS[task]["vocab"], max_length=seq,
                           doc_separator="<|endoftext|>", val_texts=[str(valid)])


def run_dropout(dp, task: dict, name: str, steps: int) -> dict:
    """The dropout keys a run of `name` for `steps` steps trains with (the trainer's rule where unset)."""
    model_options, _ = contender_options(name)
    config = ModelConfig(**{k: model_options[k] for k in ("dropout", "attention_dropout") if k in model_options})
    train = TrainConfig(max_steps=steps, batch_tokens=task["batch_windows"] * task["seq"])
    config = with_run_dropout(config, train, len(dp.train_windows), task["seq"])
    return {"dropout": config.dropout, "attention_dropout": config.attention_dropout}


def fit_psann(dp, task: dict, base: str, name: str, seed: int, steps: int, run_dir: str, log_every: int = 100,
              dropout: dict | None = None) -> tuple:
    model_options, train_options = contender_options(name)
    base, _ = split_base(name, base)
    torch.manual_seed(seed)
    model = {**task["model"], **FAMILY_MODEL.get(base, {}), **model_options}
    model.update(dropout or {})
    if base == "hnet":
        del model["n_layers"]  # its depth is num_blocks
    lm = psannLM(base=base, **model)
    lm.fit(contender_data(dp, name), max_steps=steps, batch_tokens=task["batch_windows"] * task["seq"], amp="fp32", device="cpu", seed=seed,
           progress=False, plot=False, eval_interval_steps=0, log_interval_steps=log_every, loggers=["jsonl"],
           checkpoint_dir=run_dir, **train_options)
    elapsed = [json.loads(line)["elapsed_s"] for line in open(Path(run_dir) / "metrics.jsonl") if '"train"' in line]
    return lm.model, lm.last_run["tokens_seen"], elapsed


def is_nanogpt(name: str) -> bool:
    return name == "nanogpt" or name.startswith("nanogpt+")


def fit_nanogpt(dp, task: dict, name: str, seed: int, steps: int) -> tuple:
    torch.manual_seed(seed)
    m = task["model"]
    model = nanogpt_baseline.build(dp.vocab_size, task["seq"], m["n_layers"], m["n_heads"], m["d_model"],
                                   dropout=contender_options(name)[0].get("dropout", 0.0))
    out = nanogpt_baseline.train(model, dp.train_windows, steps=steps, batch_windows=task["batch_windows"], seed=seed,
                                 lr=BASE_TRAIN["lr"], min_lr=BASE_TRAIN["min_lr"], warmup=BASE_TRAIN["warmup_steps"])
    return model, out["tokens"], out["train_s"], out["step_times"]


def step_seconds(dp, task: dict, base: str, name: str, run_dir: str, dropout: dict | None = None, steps: int = 40) -> float:
    """Mean seconds per training step of `name` in a short run (first 5 steps dropped) with the
    dropout its real run will have: a budget is a sum, so occasional slow steps count (a median
    under-estimated Muon's runs by 5-37%)."""
    if is_nanogpt(name):
        return statistics.fmean(fit_nanogpt(dp, task, name, 0, steps)[3][5:])
    elapsed = fit_psann(dp, task, base, name, 0, steps, run_dir, log_every=1, dropout=dropout)[2]
    return (elapsed[-1] - elapsed[5]) / (len(elapsed) - 6)


def train_one(dp, task: dict, base: str, name: str, seed: int, steps: int, run_dir: str) -> dict:
    if is_nanogpt(name):
        model, tokens, train_s, step_times = fit_nanogpt(dp, task, name, seed, steps)
        elapsed = [sum(step_times[:i]) for i in range(100, steps + 1, 100)]
    else:
        model, tokens, elapsed = fit_psann(dp, task, base, name, seed, steps, run_dir)
        train_s = elapsed[-1]
    counts = evaluate_counts(model, dp.val_windows, 32, torch.device("cpu"))  # one scorer for every contender
    row = {"val_loss": counts["loss_sum"] / counts["tokens"], "val_tokens": counts["tokens"], "steps": steps,
           "dropout": {"dropout": contender_options(name)[0].get("dropout", 0.0)} if is_nanogpt(name) else run_dropout(dp, task, name, steps),
           "tokens": tokens, "train_s": train_s, "tok_per_s": tokens / train_s,
           "parameters": sum(p.numel() for p in model.parameters()),
           # seconds per step in each 100 steps: where a run's speed drifts from its calibration
           "s_per_step_by_100": [round((b - a) / 100, 4) for a, b in zip([0.0, *elapsed], elapsed[:steps // 100])]}
    print(json.dumps({"contender": name, "seed": seed, **row}), file=sys.stderr, flush=True)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("psann.lm").setLevel(logging.WARNING)
    names = args.contenders.split(",")
    for name in names:
        contender_options(name)  # unknown changes fail before any training
    seeds = [int(s) for s in args.seeds.split(",")]
    task = TASKS[args.task]
    if args.seq:
        task = {**task, "seq": args.seq, "batch_windows": max(1, task["batch_windows"] * task["seq"] // args.seq)}
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        dp = prepare(args.task, {split_base(n, args.base)[0] for n in names if not is_nanogpt(n)}, task["seq"])
        steps = {n: args.steps for n in names}
        if args.budget == "seconds":
            calibrate = sorted(set(names) | {"default"})
            guess = {n: args.steps for n in calibrate}  # dropout depends on the steps a run gets: calibrate, then again if it changed
            dropout = {n: None if is_nanogpt(n) else run_dropout(dp, task, n, guess[n]) for n in calibrate}
            per_step = {n: step_seconds(dp, task, args.base, n, f"{tmp}/calibrate-{n}", dropout[n]) for n in calibrate}
            seconds = args.seconds or args.steps * per_step["default"]
            steps = {n: max(1, round(seconds / per_step[n])) for n in calibrate}
            for n in calibrate:
                planned = None if is_nanogpt(n) else run_dropout(dp, task, n, steps[n])
                if planned != dropout[n]:
                    dropout[n] = planned
                    per_step[n] = step_seconds(dp, task, args.base, n, f"{tmp}/calibrate-{n}-again", dropout[n])
            seconds = args.seconds or args.steps * per_step["default"]
            steps = {n: max(1, round(seconds / per_step[n])) for n in names}
            print(json.dumps({"calibrated_s_per_step": per_step, "steps": steps, "dropout": dropout}), file=sys.stderr, flush=True)
        for seed in seeds:
            for name in names:
                results[name].append(train_one(dp, task, args.base, name, seed, steps[name], f"{tmp}/{name}-{seed}"))
    peer = names[0]
    summary = {}
    for name in names:
        rows = results[name]
        summary[name] = {"options": "nanoGPT baseline" if is_nanogpt(name) else dict(zip(("model", "train"), contender_options(name))),
                         "val_loss_median": statistics.median(r["val_loss"] for r in rows),
                         "tok_per_s_median": statistics.median(r["tok_per_s"] for r in rows),
                         "parameters": rows[0]["parameters"], "runs": rows}
        if name != peer:
            summary[name]["loss_ratio_vs_peer"] = [r["val_loss"] / d["val_loss"] for r, d in zip(rows, results[peer])]
            summary[name]["speed_ratio_vs_peer"] = [r["tok_per_s"] / d["tok_per_s"] for r, d in zip(rows, results[peer])]
    print(to_json({"question": f"which recipe learns most per second ({args.task})",
                   "peer": f"{peer}, same data, model size, budget and seeds, in the same run",
                   "unit": "nats/char" if args.task == "shakespeare" else "nats/token (4K BPE)",
                   "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "base": args.base,
                   "budget": args.budget, "seconds": args.seconds, "steps": args.steps, "seeds": seeds,
                   "seq": task["seq"], "batch_windows": task["batch_windows"],
                   "contenders": summary}))


if __name__ == "__main__":
    main()
