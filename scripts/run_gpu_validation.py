#!/usr/bin/env python
"""GPU validation: bf16-vs-fp32 loss parity, a training throughput grid (base x batch_tokens) with
tokens/s and MFU, activation-checkpointing memory, and single- vs multi-GPU parity.

    python scripts/run_gpu_validation.py --out reports/gpu [--steps 30] [--compile]

Writes <out>/<timestamp>/{summary.json, throughput.csv, memory.json, parity.json}. On a machine
without CUDA it says so and exits cleanly. Models are ~124M-parameter (GPT-2 small shape) on
random tokens: throughput and memory do not depend on the text.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from psann.lm.config import ModelConfig, TrainConfig
from psann.lm.models import build_model, count_parameters
from psann.lm.objectives import causal_lm_loss_sum
from psann.lm.train.distributed import DistInfo
from psann.lm.train.optim import build_optimizer
from psann.lm.train.parallel import parallelize
from psann.lm.train.throughput import peak_tflops

SMALL = dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, max_seq_len=1024)


def train_steps(base: str, batch_tokens: int, steps: int, *, dtype: torch.dtype | None, compile_: bool,
                grad_checkpoint: bool = False, seed: int = 0) -> dict:
    """`steps` AdamW steps on fixed random batches; -> losses, tokens/s (after 3 warm-up steps), memory."""
    device = torch.device("cuda")
    torch.manual_seed(seed)
    cfg = ModelConfig(base=base, **SMALL)
    model = build_model(cfg).to(device)
    train = TrainConfig(compile=compile_, grad_checkpoint=grad_checkpoint, amp="bf16" if dtype else "fp32")
    model, _ = parallelize(model, train, DistInfo(), device)
    optimizer = build_optimizer(model, train, device)
    T = cfg.max_seq_len
    batch = max(1, batch_tokens // T)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (4, batch, T + 1), generator=gen).to(device)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        x, y = data[step % 4, :, :-1], data[step % 4, :, 1:]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss_sum, n = causal_lm_loss_sum(logits, y)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss_sum) / n)
    step_s = sorted(times[3:])[len(times[3:]) // 2] if steps > 3 else times[-1]
    tok_s = batch * T / step_s
    peak, source = peak_tflops(device, dtype)
    fpt = model.flops_per_token(T)
    return {"base": base, "batch_tokens": batch * T, "dtype": str(dtype or torch.float32).replace("torch.", ""),
            "compile": compile_, "grad_checkpoint": grad_checkpoint, "parameters": count_parameters(model),
            "median_step_s": step_s, "tokens_per_s": tok_s, "tflops": tok_s * fpt / 1e12,
            "mfu": tok_s * fpt / 1e12 / peak if peak else None, "peak_source": source,
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30, "losses": losses}


def multi_gpu_parity(out: Path) -> dict:
    """Two-GPU DDP and FSDP against one GPU, by the same worker as the CPU tests (fp32)."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU visible; multi-GPU parity needs 2"}
    worker = Path(__file__).resolve().parents[1] / "tests" / "dist_worker.py"
    results = {}
    for name, nproc, extra in (("single", 1, {}), ("ddp", 2, {}), ("fsdp", 2, {"fsdp": "full_shard"})):
        options = {"checkpoint_dir": str(out / f"parity_{name}"), "device": "cuda", **extra}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(worker), json.dumps(options)]
        subprocess.run(cmd, check=True)
        records = [json.loads(line) for line in (out / f"parity_{name}" / "metrics.jsonl").read_text().splitlines()]
        results[name] = [r["loss"] for r in records if r["kind"] == "train"]
    ref = results["single"]
    for name in ("ddp", "fsdp"):
        results[f"{name}_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(results[name], ref))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks in the throughput grid")
    parser.add_argument("--bases", default="transformer,respsann,waveresnet")
    parser.add_argument("--batch-tokens", default="16384,65536")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("run_gpu_validation: no CUDA device is visible; nothing to validate on this machine "
              "(the CPU checks run in the test suite).")
        return 0
    out = Path(args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    system = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count()}

    fp32 = train_steps("transformer", 16384, args.steps, dtype=None, compile_=False)
    bf16 = train_steps("transformer", 16384, args.steps, dtype=torch.bfloat16, compile_=False)
    parity = {"fp32_final_loss": fp32["losses"][-1], "bf16_final_loss": bf16["losses"][-1],
              "rel_diff": abs(bf16["losses"][-1] - fp32["losses"][-1]) / fp32["losses"][-1],
              "fp32_losses": fp32["losses"], "bf16_losses": bf16["losses"]}

    grid = []
    for base in args.bases.split(","):
        for bt in map(int, args.batch_tokens.split(",")):
            row = train_steps(base, bt, args.steps, dtype=torch.bfloat16, compile_=args.compile)
            row.pop("losses")
            grid.append(row)
            print(json.dumps(row), flush=True)
    with open(out / "throughput.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(grid[0]))
        writer.writeheader()
        writer.writerows(grid)

    memory = {}
    for ac in (False, True):
        row = train_steps("transformer", 65536, 5, dtype=torch.bfloat16, compile_=False, grad_checkpoint=ac)
        memory["grad_checkpoint" if ac else "no_checkpoint"] = row["max_memory_allocated_gb"]
    (out / "memory.json").write_text(json.dumps(memory, indent=2))
    parity["multi_gpu"] = multi_gpu_parity(out)
    (out / "parity.json").write_text(json.dumps(parity, indent=2))
    summary = {"system": system, "parity_rel_diff": parity["rel_diff"], "memory_gb": memory, "throughput": grid,
               "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
