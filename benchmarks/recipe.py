"""Which recipe learns most per second: psann-lm's default Transformer against the same model with each recipe change, on tiny-shakespeare characters.

The task the recipe work is judged on: characters of ../shared/data/tinyshakespeare/input.txt, the
first 90% to train on and the last 10% to validate (every window of 64 characters scored once),
4 layers, 4 heads, width 128, context 64, batch 12 windows (768 tokens), `--steps` 2,000 steps
(1.54M tokens), lr 1e-3 -> 1e-4 (cosine), warmup 100, fp32 on the CPU. Each contender differs
from the default in the train options it names; every contender runs with each seed, in turn
within a seed so the machine's drift hits all alike. Reports validation nats/char at the end
(equal tokens), tokens/s, wall time, and the ratios against the default of the same seed.

    python benchmarks/recipe.py                                   # default vs muon, seeds 0 and 1 (~12 min)
    python benchmarks/recipe.py --steps 200 --seeds 0             # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import cpu_name, to_json

from psann.lm import psannLM, psannLMDataPrep

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONTENDERS = {"default": {}, "muon": {"optimizer": "muon"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", default=str(SHAKESPEARE))
    p.add_argument("--contenders", default="default,muon", help=f"comma-separated, of: {', '.join(CONTENDERS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def train_one(dp, options: dict, seed: int, steps: int, run_dir: str) -> dict:
    torch.manual_seed(seed)
    lm = psannLM(base="transformer", d_model=128, n_layers=4, n_heads=4)
    start = time.perf_counter()
    lm.fit(dp, max_steps=steps, batch_tokens=12 * 64, lr=1e-3, min_lr=1e-4, warmup_steps=100, amp="fp32",
           device="cpu", seed=seed, progress=False, plot=False, eval_interval_steps=0, log_interval_steps=100,
           loggers=["jsonl"], checkpoint_dir=run_dir, **options)
    wall = time.perf_counter() - start
    info = lm.last_run
    return {"val_nats_per_char": info["val_loss"], "tokens": info["tokens_seen"], "wall_s": wall,
            "tok_per_s": info["tokens_seen"] / wall,
            "parameters": sum(p.numel() for p in lm.model.parameters())}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        dp = psannLMDataPrep([text[:cut]], tokenizer="char", max_length=64, val_texts=[text[cut:]])
        for seed in seeds:
            for name in names:
                results[name].append(train_one(dp, CONTENDERS[name], seed, args.steps, f"{tmp}/{name}-{seed}"))
    summary = {}
    for name in names:
        rows = results[name]
        summary[name] = {"options": CONTENDERS[name],
                         "val_nats_per_char_median": statistics.median(r["val_nats_per_char"] for r in rows),
                         "tok_per_s_median": statistics.median(r["tok_per_s"] for r in rows),
                         "parameters": rows[0]["parameters"], "runs": rows}
        if name != "default" and "default" in results:
            summary[name]["loss_ratio_vs_default"] = [r["val_nats_per_char"] / d["val_nats_per_char"]
                                                      for r, d in zip(rows, results["default"])]
            summary[name]["speed_ratio_vs_default"] = [r["tok_per_s"] / d["tok_per_s"]
                                                       for r, d in zip(rows, results["default"])]
    print(to_json({"question": "which recipe learns most per second (tiny-shakespeare characters)",
                   "peer": "psann-lm's default recipe, same data, model, budget and seeds, in the same run",
                   "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "steps": args.steps,
                   "tokens_per_step": 768, "seeds": seeds, "contenders": summary}))


if __name__ == "__main__":
    main()
