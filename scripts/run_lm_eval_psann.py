#!/usr/bin/env python
"""Seed-compatible entry point: same as `psannlm eval harness` (lm-eval with --model psann).

    python scripts/run_lm_eval_psann.py --ckpt runs/demo/checkpoints/final \
        --mc-file copa=../shared/data/eval/copa.jsonl --limit 50 --apply-chat-template --output-path eval_out
"""

import sys

from psann.lm.eval.harness import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/run_lm_eval_psann.py"))
