"""`psannlm eval mc`: multiple-choice accuracy of a checkpoint on {"query", "choices", "gold"} JSONL
files, without lm-eval. It scores exactly what the harness's psann_mc task scores (zero-shot):
the continuation " " + choice after the query; acc picks the highest log-likelihood, acc_norm the
highest per character of the choice and acc_bytes per UTF-8 byte (lm-eval's definitions), so its
numbers equal the harness's on the same file."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from ..console import SuggestingParser, setup_logging
from ..errors import DataError
from ..train.trainer import resolve_device
from .loglik import Scorer
from .tasks import read_jsonl

TARGET_DELIMITER = " "  # lm-eval's default between a query and its choice


def score_rows(scorer, rows: list[dict], batch_size: int) -> dict:
    """acc, acc_norm, acc_bytes (with their standard errors) of `scorer` (a loglik.Scorer) on `rows`,
    and `chance`, the accuracy of a uniform guess."""
    if not rows:
        raise DataError("no questions to score: an accuracy over none would be meaningless; give at least one row.")
    pairs = [(row["query"], TARGET_DELIMITER + choice) for row in rows for choice in row["choices"]]
    lls = iter(ll for ll, _ in scorer.loglikelihood(pairs, batch_size, desc="eval mc"))
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for row in rows:
        ll = np.array([next(lls) for _ in row["choices"]])
        chars = np.array([len(c) for c in row["choices"]], dtype=float)
        nbytes = np.array([len(c.encode("utf-8")) for c in row["choices"]], dtype=float)
        for name, score in (("acc", ll), ("acc_norm", ll / chars), ("acc_bytes", ll / nbytes)):
            hits[name].append(float(np.argmax(score) == row["gold"]))
    result = {"questions": len(rows), "chance": float(np.mean([1 / len(row["choices"]) for row in rows]))}
    for name, values in hits.items():
        mean = float(np.mean(values))
        result[name] = mean
        result[f"{name}_stderr"] = math.sqrt(np.var(values, ddof=1) / len(values)) if len(values) > 1 else None
    return result


def main(argv: list[str] | None = None, prog: str = "psannlm eval mc") -> int:
    setup_logging()
    parser = SuggestingParser(prog=prog, description="Multiple-choice accuracy (acc, acc_norm, acc_bytes) of a "
                                     "checkpoint on JSONL files, as the harness's psann_mc task scores them.")
    printing = "--print-config" in (sys.argv[1:] if argv is None else argv)  # shows the options; needs none of them
    parser.add_argument("--ckpt", required=not printing, help="checkpoint directory")
    parser.add_argument("--data", nargs="+", required=not printing, help='JSONL files of {"query", "choices", "gold"}')
    parser.add_argument("--limit", type=int, help="score only the first N questions of each file")
    parser.add_argument("--batch-size", type=int, default=8, help="continuations per forward")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-length", type=int, help="context in tokens (default: the model's max_seq_len)")
    parser.add_argument("--mc-draws", type=int, default=16, help="diffusion models: Monte-Carlo draws of the bound")
    parser.add_argument("--seed", type=int, default=0, help="diffusion models: masking seed")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--print-config", action="store_true", help="print the resolved options and exit")
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size", "mc_draws"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.device = str(resolve_device(args.device, "--device"))
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=2))
        return 0
    files = {path: read_jsonl(path, "mc")[:args.limit] for path in args.data}  # bad files fail before loading
    scorer = Scorer.load(args.ckpt, args.device, args.max_length, args.mc_draws, args.seed)
    results = [{"data": path, **score_rows(scorer, rows, args.batch_size), "bound": scorer.diffusion is not None}
               for path, rows in files.items()]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    for r in results:
        print(f"{Path(r['data']).name}: {r['questions']} questions  acc {r['acc']:.1%}  acc_norm {r['acc_norm']:.1%}  "
              f"acc_bytes {r['acc_bytes']:.1%}  (chance {r['chance']:.1%})")
    if results[0]["bound"]:
        print("diffusion model: log-likelihoods are Monte-Carlo lower bounds (ELBO), so these accuracies are approximate.")
    return 0
