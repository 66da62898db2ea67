"""Trains the tiny model of tests/test_distributed.py in one rank of a torchrun job (or alone).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py '{"fsdp": "full_shard", ...}'
"""

import json
import sys

from psann.lm import psannLM, psannLMDataPrep

TEXT = [f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
        enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "owl", "soft")] * 30)]
MODEL = dict(d_model=32, n_layers=2, n_heads=4)
# AdamW: FSDP runs it (train.optimizer=auto picks Muon elsewhere); test_ddp_muon_matches_one_process runs Muon
TRAIN = dict(optimizer="adamw", amp="fp32", progress=False, plot=False, log_interval_steps=1, eval_interval_steps=3, device="cpu",
             max_steps=6, batch_tokens=128, lr=3e-3, warmup_steps=2, save_interval_steps=3)


def run(options: dict) -> dict:
    dp = psannLMDataPrep(TEXT, tokenizer="char", max_length=16, val_split=0.1, seed=0)
    lm = psannLM(**MODEL).fit(dp, **{**TRAIN, **options})
    assert lm.generate("the red", max_new_tokens=4, temperature=0) is not None  # usable after sharded training
    return lm.last_run


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
