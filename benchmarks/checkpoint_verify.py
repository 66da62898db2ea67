"""What does checkpoint verification cost on a ~124M-parameter checkpoint?

Saves a Transformer (d_model 768, 12 layers, vocab 50,304) with an AdamW-shaped optimizer state,
then times, with the page cache warm, the SHA-256 verification of the weights and of the whole
checkpoint against its peer in the same run: reading the same files without verification
(safetensors load into the model; torch.load of the optimizer state). Prints JSON with medians and
the ratio verify / read.

    python benchmarks/checkpoint_verify.py [--rounds 3] [--d-model 768 --n-layers 12 --vocab 50304]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_model

from _common import cpu_name, to_json
from psann.lm.config import ModelConfig, RunConfig
from psann.lm.models import build_model, count_parameters
from psann.lm.tokenizers import build_tokenizer
from psann.lm.train import checkpoint as ckpt


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        ckpt._verified.clear()  # verification results are cached per process; time the real work
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 64, vocab_size=args.vocab,
                      max_seq_len=1024)
    model = build_model(cfg)
    optim = {"state": {name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                       for name, p in model.named_parameters()}, "param_groups": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        start = time.perf_counter()
        ckpt.save_checkpoint(out, model, build_tokenizer("byte"), RunConfig(model=cfg),
                             trainer_state={"step": 1, "tokens_seen": 1, "loader": {}}, optimizer_state=optim,
                             rng_state={"cpu": [torch.get_rng_state()], "cuda": [None]})
        save_s = time.perf_counter() - start
        manifest_s = median_time(lambda: ckpt.write_manifest(out), args.rounds)
        weights_bytes = (out / ckpt.WEIGHTS).stat().st_size
        total_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        verify_weights = median_time(lambda: ckpt.verify_checkpoint(out, ckpt.WEIGHTS), args.rounds)
        verify_all = median_time(lambda: ckpt.verify_checkpoint(out), args.rounds)
        read_weights = median_time(lambda: load_model(model, str(out / ckpt.WEIGHTS)), args.rounds)
        read_all = median_time(lambda: (load_model(model, str(out / ckpt.WEIGHTS)),
                                        torch.load(out / ckpt.OPTIMIZER, weights_only=True)), args.rounds)
    print(to_json({
        "question": "cost of SHA-256 checkpoint verification vs reading the same files unverified",
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "parameters": count_parameters(model),
        "rounds": args.rounds, "save_checkpoint_s": round(save_s, 3),
        "write_manifest_s": round(manifest_s, 3), "manifest_share_of_save": round(manifest_s / save_s, 3),
        "weights": {"bytes": weights_bytes, "verify_s": round(verify_weights, 3), "read_s": round(read_weights, 3),
                    "verify_gb_per_s": round(weights_bytes / verify_weights / 1e9, 2),
                    "ratio_verify_to_read": round(verify_weights / read_weights, 2)},
        "whole_checkpoint": {"bytes": total_bytes, "verify_s": round(verify_all, 3), "read_s": round(read_all, 3),
                             "verify_gb_per_s": round(total_bytes / verify_all / 1e9, 2),
                             "ratio_verify_to_read": round(verify_all / read_all, 2)},
    }))


if __name__ == "__main__":
    main()
