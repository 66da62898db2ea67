"""Does a recipe over-fit a task: training and validation loss along one run of benchmarks/recipe.py's setup.

One contender (`--contender`, as recipe.py names them) on one task for `--steps` steps, evaluating
on `--eval-batches` batches of the task's validation text every `--eval-every` steps (a subset,
not recipe.py's whole-set score), beside the training loss logged at that step. Prints one JSON object: the curve.

    python benchmarks/recipe_curve.py --task tinystories --contender default --steps 1068
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import torch

from recipe import TASKS, contender_data, contender_options, prepare

from psann.lm import psannLM


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="tinystories")
    p.add_argument("--contender", default="default")
    p.add_argument("--steps", type=int, default=1068)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.getLogger("psann.lm").setLevel(logging.WARNING)
    task = TASKS[args.task]
    dp = prepare(args.task, {"transformer"})
    model_options, train_options = contender_options(args.contender)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out:
        psannLM(**task["model"], **model_options).fit(
            contender_data(dp, args.contender), max_steps=args.steps, batch_tokens=task["batch_windows"] * task["seq"],
            amp="fp32", device="cpu", seed=args.seed, progress=False, plot=False, eval_interval_steps=args.eval_every,
            eval_batches=args.eval_batches, log_interval_steps=min(50, args.eval_every), loggers=["jsonl"], checkpoint_dir=out,
            **train_options)
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl", encoding="utf-8")]
    train = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    curve = [{"step": r["step"], "train_loss": train.get(r["step"]), "val_loss": r["val_loss"], "elapsed_s": r["elapsed_s"]}
             for r in rows if r["kind"] == "val"]
    print(json.dumps({"question": __doc__.split("\n")[0], "task": args.task, "contender": args.contender,
                      "steps": args.steps, "eval_batches": args.eval_batches, "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
