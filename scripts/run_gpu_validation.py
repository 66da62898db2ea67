#!/usr/bin/env python
"""GPU validation, as named checks (benchmarks/lm_plan.md):

    GPU-01  bf16 vs fp32 loss parity (transformer, 16k tokens per step)      -> parity.json
    GPU-02  single-GPU vs 2-GPU DDP and FSDP loss parity (needs 2 GPUs)      -> parity.json
    GPU-03  throughput grid: base x batch_tokens (65k/131k/262k), tok/s, MFU -> throughput.csv
    GPU-04  activation checkpointing: peak memory and wall time, on and off  -> memory.json

    python scripts/run_gpu_validation.py [--out reports/gpu] [--only GPU-03[,GPU-04]] [--steps 30] [--compile]
    python scripts/run_gpu_validation.py --list

Writes <out>/<timestamp>/ with the files above and summary.json. On a machine without CUDA it
says so and exits cleanly (an unknown check name is an error everywhere). Models are
~124M-parameter (GPT-2 small shape) on random tokens: throughput and memory do not depend on
the text.
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


CHECKS = {"GPU-01": "bf16 vs fp32 loss parity", "GPU-02": "single- vs multi-GPU (DDP, FSDP) parity",
          "GPU-03": "throughput grid (base x batch_tokens)", "GPU-04": "activation checkpointing memory and wall time"}


def bf16_parity(args, out: Path) -> dict:
    fp32 = train_steps("transformer", 16384, args.steps, dtype=None, compile_=False)
    bf16 = train_steps("transformer", 16384, args.steps, dtype=torch.bfloat16, compile_=False)
    return {"fp32_final_loss": fp32["losses"][-1], "bf16_final_loss": bf16["losses"][-1],
            "rel_diff": abs(bf16["losses"][-1] - fp32["losses"][-1]) / fp32["losses"][-1],
            "fp32_losses": fp32["losses"], "bf16_losses": bf16["losses"]}


def throughput_grid(args, out: Path) -> list[dict]:
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
    return grid


def checkpointing_memory(args, out: Path) -> dict:
    memory = {}
    for ac in (False, True):
        start = time.perf_counter()
        row = train_steps("transformer", 65536, 5, dtype=torch.bfloat16, compile_=False, grad_checkpoint=ac)
        memory["grad_checkpoint" if ac else "no_checkpoint"] = {
            "max_memory_allocated_gb": row["max_memory_allocated_gb"], "median_step_s": row["median_step_s"],
            "wall_s": time.perf_counter() - start, "steps": 5, "batch_tokens": row["batch_tokens"]}
    (out / "memory.json").write_text(json.dumps(memory, indent=2))
    return memory


def parse_only(text: str | None, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip().upper() for n in text.split(",")] if text else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(CHECKS)} (--list).")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/gpu", help="reports land in OUT/<timestamp>/")
    parser.add_argument("--only", help="comma-separated check names, e.g. GPU-03 or GPU-03,GPU-04 (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks in the throughput grid")
    parser.add_argument("--bases", default="transformer,respsann,waveresnet")
    parser.add_argument("--batch-tokens", default="65536,131072,262144")
    args = parser.parse_args(argv)
    if args.list:
        for name, what in CHECKS.items():
            print(f"{name}  {what}")
        return 0
    names = parse_only(args.only, parser)
    if not torch.cuda.is_available():
        print(f"run_gpu_validation: no CUDA device is visible; nothing to validate on this machine ({', '.join(names)} "
              "need a GPU; the CPU checks run in the test suite).")
        return 0
    out = Path(args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"system": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                          "gpus": torch.cuda.device_count()},
               "checks": names, "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
    parity = {}
    if "GPU-01" in names:
        parity.update(bf16_parity(args, out))
        summary["parity_rel_diff"] = parity["rel_diff"]
    if "GPU-02" in names:
        parity["multi_gpu"] = multi_gpu_parity(out)
    if parity:
        (out / "parity.json").write_text(json.dumps(parity, indent=2))
    if "GPU-03" in names:
        summary["throughput"] = throughput_grid(args, out)
    if "GPU-04" in names:
        summary["memory"] = checkpointing_memory(args, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
