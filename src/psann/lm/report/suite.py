"""`psannlm bench suite`: a baseline run, a throughput grid, memory and system facts in one directory.

    psannlm bench suite --out reports/benchmarks/<timestamp>/

Everything runs through the package: the built-in story corpus (no downloads), `train()`
(the trainer's own tok/s, MFU and peak-memory figures), the dry-run memory plan.
Writes system.json, the baseline run (baseline/), metrics.json + metrics.csv (its parsed
records), loss_curve.png (loss and perplexity panels), throughput.csv, memory.json and
suite.json (scale, settings, the command that reproduces it). `psannlm report <out>` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import ModelConfig, RunConfig, TrainConfig
from ..data.demo_corpus import demo_config_values, write_demo_corpus
from ..errors import ConfigError
from ..files import write_atomic
from .html import curves_png
from ..train.metrics import median_of, read_metrics, summarize_metrics


@dataclass(frozen=True)
class SuiteSettings:
    scale: str
    device: str
    corpus_bytes: int
    vocab_size: int
    max_length: int
    d_model: int
    n_layers: int
    n_heads: int
    steps: int          # baseline optimizer steps
    batch_tokens: int   # baseline batch, also the memory measurement's micro-batch
    bases: tuple[str, ...]
    grid_batch_tokens: tuple[int, ...]
    grid_steps: int     # per grid cell: the first half warms up, the median step of the rest is reported
    seed: int = 0

    def check(self) -> None:
        from ..models import MODEL_REGISTRY  # lazy: models import torch, and psann.cli imports this module at start-up

        token_bases = [b for b, cls in MODEL_REGISTRY.items() if cls.tokenizer is None]
        for name in ("corpus_bytes", "d_model", "n_layers", "steps", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.grid_steps < 2:
            raise ConfigError(f"--grid-steps must be at least 2 (the first half warms up), got {self.grid_steps}.")
        if self.d_model % self.n_heads:
            raise ConfigError(f"--d-model {self.d_model} must be a multiple of the {self.n_heads} attention heads.")
        for base in self.bases:
            if base not in MODEL_REGISTRY:
                raise ConfigError(f"--bases: unknown base {base!r}; choose from {', '.join(token_bases)}.")
            if base not in token_bases:
                raise ConfigError(f"--bases: {base!r} reads raw {MODEL_REGISTRY[base].tokenizer}s; the suite's grid trains "
                                  f"on the BPE-tokenised demo corpus, so pick token bases (e.g. {','.join(token_bases)}).")
        for bt in (self.batch_tokens, *self.grid_batch_tokens):
            if bt < self.max_length:
                raise ConfigError(f"batch tokens {bt} is less than one {self.max_length}-token window at this scale; "
                                  f"use at least {self.max_length}.")

    def describe(self) -> str:
        grid = f"{len(self.bases)} x {len(self.grid_batch_tokens)}"
        timed = self.grid_steps - self.grid_steps // 2
        text = (f"d_model {self.d_model} x {self.n_layers} layers on a {self.corpus_bytes / 1e6:.1f} MB generated story "
                f"corpus, {self.steps} steps of {self.batch_tokens:,} tokens; a {grid} throughput grid "
                f"({', '.join(self.bases)} x {', '.join(f'{b:,}' for b in self.grid_batch_tokens)} tokens, "
                f"median of the last {timed} of {self.grid_steps} steps each); memory of one "
                f"{self.batch_tokens:,}-token micro-batch")
        if self.scale == "cpu":
            return ("CPU scale (tiny): " + text + ". The figures check the pipeline and this machine; they say little "
                    "about full-size models. Run --scale gpu (scripts/next_gpu_batch.sh) on a CUDA machine for those.")
        return "GPU scale: " + text + "."

    def command(self) -> str:
        """The command line that reruns these settings."""
        return (f"psannlm bench suite --scale {self.scale} --device {self.device} --corpus-bytes {self.corpus_bytes} "
                f"--d-model {self.d_model} --n-layers {self.n_layers} --steps {self.steps} "
                f"--baseline-batch-tokens {self.batch_tokens} --bases {','.join(self.bases)} "
                f"--batch-tokens {','.join(map(str, self.grid_batch_tokens))} --grid-steps {self.grid_steps} "
                f"--seed {self.seed}")


SCALES = {
    # 28 s on the idle 2-core development VM (docs/reports.md)
    "cpu": dict(corpus_bytes=1_000_000, vocab_size=1024, max_length=128, d_model=128, n_layers=2, n_heads=4, steps=150,
                batch_tokens=4096, bases=("transformer", "respsann"), grid_batch_tokens=(2048, 8192), grid_steps=8),
    "gpu": dict(corpus_bytes=20_000_000, vocab_size=8192, max_length=512, d_model=512, n_layers=8, n_heads=8, steps=1000,
                batch_tokens=65536, bases=("transformer", "respsann", "waveresnet"),
                grid_batch_tokens=(16384, 65536, 262144), grid_steps=20),
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks of this machine and the package")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser("suite", help="baseline run (loss/perplexity curves), throughput grid, memory, system.json",
                        description=__doc__.split("\n\n")[0])
    s.add_argument("--out", help="output directory (default reports/benchmarks/<timestamp>)")
    s.add_argument("--scale", choices=("auto", "cpu", "gpu"), default="auto",
                   help="preset sizes; auto = gpu when the device is CUDA, else cpu")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--steps", type=int, help="baseline training steps")
    s.add_argument("--baseline-batch-tokens", type=int, dest="batch_tokens", metavar="N", help="baseline tokens per step")
    s.add_argument("--bases", type=_name_list, metavar="BASE,BASE,...", help="comma-separated bases of the throughput grid")
    s.add_argument("--batch-tokens", type=_int_list, dest="grid_batch_tokens", metavar="N,N,...",
                   help="comma-separated tokens per step of the throughput grid")
    s.add_argument("--grid-steps", type=int, help="steps per grid cell (the first half warms up; the median of the rest is reported)")
    s.add_argument("--corpus-bytes", type=int, help="size of the generated story corpus")
    s.add_argument("--d-model", type=int)
    s.add_argument("--n-layers", type=int)
    s.add_argument("--seed", type=int, default=0)


def resolve_settings(args) -> SuiteSettings:
    from ..train.trainer import resolve_device  # lazy: torch; psann.cli imports this module at start-up

    device = resolve_device(args.device, "--device")
    scale = args.scale if args.scale != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if scale == "gpu" and device.type != "cuda":
        raise ConfigError(f"--scale gpu needs a CUDA device (the device here is {device}); use --scale cpu.")
    values = dict(SCALES[scale], scale=scale, device=str(device), seed=args.seed)
    for name in ("steps", "batch_tokens", "bases", "grid_batch_tokens", "grid_steps", "corpus_bytes", "d_model", "n_layers"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    settings = SuiteSettings(**values)
    settings.check()
    return settings


def run(args) -> int:
    settings = resolve_settings(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(settings), indent=2))
        return 0
    out = Path(args.out) if args.out else Path("reports") / "benchmarks" / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_suite(out, settings)
    return 0


# --- the parts ----------------------------------------------------------------------------------

def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))  # every key, in first-seen order
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def _run_config(s: SuiteSettings, corpus: Path, run_dir: Path):
    """The demo's recipe (lr, warmup, schedule) at the suite's sizes."""
    values = demo_config_values(str(corpus), str(run_dir))
    values["model"].update(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads)
    values["data"].update(tokenizer_vocab_size=s.vocab_size, max_length=s.max_length, cache_dir=str(corpus.parent))
    values["train"].update(max_steps=s.steps, batch_tokens=s.batch_tokens, device=s.device, seed=s.seed,
                           warmup_steps=max(1, s.steps // 12), eval_interval_steps=max(1, s.steps // 6),
                           eval_batches=10, log_interval_steps=max(1, s.steps // 40))
    return RunConfig.from_dict(values)


def measure_throughput(dp, s: SuiteSettings, base: str, batch_tokens: int, work_dir: Path) -> dict:
    """tok/s, TFLOP/s and MFU as the trainer logs them for each step: the median over the second
    half of `grid_steps` steps (the first half warms up), which a stall or two does not move."""
    import torch  # lazy: torch; psann.cli imports this module at start-up

    from ..models import count_parameters
    from ..train.run import train
    from ..train.trainer import resolve_amp

    device = torch.device(s.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = RunConfig(model=ModelConfig(base=base, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads),
                       data=dp.config, train=TrainConfig(
                           max_steps=s.grid_steps, batch_tokens=batch_tokens, log_interval_steps=1, eval_interval_steps=0,
                           eval_batches=1, progress=False, plot=False, checkpoint_dir=str(work_dir), device=s.device,
                           seed=s.seed))
    run = train(config, data=dp)
    steps = [r for r in read_metrics(work_dir / "metrics.jsonl") if r["kind"] == "train"]
    timed = steps[s.grid_steps // 2:]
    amp = resolve_amp("auto", device)
    mfu = median_of(timed, "mfu")
    return {"base": base, "batch_tokens": steps[-1]["tokens"] // steps[-1]["step"], "parameters": count_parameters(run.model),
            "timed_steps": len(timed), "tok_per_s": round(median_of(timed, "tok_per_s"), 1),
            "tflops_per_device": round(median_of(timed, "tflops_per_device"), 4),
            "mfu": None if mfu is None else round(mfu, 4),
            # on CPU the trainer's figure is the process's peak RSS so far, not this cell's
            "peak_mem_gb": round(steps[-1]["peak_mem_gb"], 3) if device.type == "cuda" else None,
            "dtype": str(amp).replace("torch.", "") if amp else "float32", "device": s.device}


MEMORY_NOTE = ("saved_tensor_mb: bytes of the tensors autograd keeps for backward after one forward pass and the loss "
               "(unique storages; parameters excluded, autocast's low-precision weight copies included); under "
               "activation checkpointing these are each block's inputs, and the activations recomputed during backward "
               "are transient and not counted. planned_activation_mb: the dry-run plan's estimate "
               "(train/throughput.py activation_bytes_per_token), which does count one recomputed block. "
               "cuda_peak_delta_mb: torch.cuda.max_memory_allocated over forward + backward minus the memory allocated "
               "before (CUDA only). wall_s: the wall time of that forward + backward (the first, unwarmed, pass).")


def measure_memory(dp, model_config, s: SuiteSettings) -> dict:
    """One micro-batch of `batch_tokens` tokens through a fresh model, with and without activation
    checkpointing, at the trainer's precision."""
    import torch  # lazy: torch; psann.cli imports this module at start-up

    from ..data.shards import Loader
    from ..models import build_model
    from ..objectives import causal_lm_loss_sum
    from ..profiling import SavedTensorBytes
    from ..train.parallel import apply_activation_checkpointing
    from ..train.throughput import activation_bytes_per_token
    from ..train.trainer import resolve_amp

    device = torch.device(s.device)
    amp = resolve_amp("auto", device)
    windows = max(1, s.batch_tokens // s.max_length)
    x, y = (t.to(device) for t in Loader(dp.train_windows, windows, seed=s.seed).next_batch())
    rows = []
    for grad_checkpoint in (False, True):
        torch.manual_seed(s.seed)
        model = build_model(model_config).to(device).train()
        if grad_checkpoint:
            apply_activation_checkpointing(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        start = time.perf_counter()
        with SavedTensorBytes(model) as saved:
            with autocast:
                logits = model(x)
            loss_sum, n = causal_lm_loss_sum(logits, y)
        (loss_sum / n).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        planned = activation_bytes_per_token(model_config, grad_checkpoint, half=amp is not None) * x.numel()
        rows.append({"grad_checkpoint": grad_checkpoint, "saved_tensor_mb": round(saved.bytes / 2**20, 2),
                     "planned_activation_mb": round(planned / 2**20, 2),
                     "cuda_peak_delta_mb": round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 2)
                     if device.type == "cuda" else None, "wall_s": round(wall, 4)})
        del model, logits, loss_sum
    return {"micro_batch": {"windows": windows, "max_length": s.max_length, "tokens": x.numel()},
            "precision": str(amp).replace("torch.", "") if amp else "float32", "device": s.device,
            "measured": MEMORY_NOTE, "runs": rows,
            "saved_ratio_checkpointed": round(rows[1]["saved_tensor_mb"] / max(rows[0]["saved_tensor_mb"], 1e-9), 4)}


def run_suite(out: str | os.PathLike, s: SuiteSettings) -> dict:
    """Run every part into `out`; -> the suite.json contents."""
    from ..data.prepare import prepare_data  # lazy: torch; psann.cli imports this module at start-up
    from ..models import count_parameters
    from ..train.run import train
    from .system import system_info

    out = Path(out)
    if (out / "baseline").exists():  # the trainer would append to the old run's metrics
        raise ConfigError(f"{out} already holds a suite (baseline/); pass a new --out directory or delete it.")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"bench suite: {s.describe()}", flush=True)
    write_atomic(out / "system.json", json.dumps(system_info(s.device), indent=2) + "\n")

    corpus = out / "data" / "demo_corpus.txt"
    write_demo_corpus(corpus, target_bytes=s.corpus_bytes, seed=s.seed)
    config = _run_config(s, corpus, out / "baseline")
    dp = prepare_data(config.data)
    run = train(config, data=dp)
    records = read_metrics(out / "baseline" / "metrics.jsonl")
    summary = {**run.info, **summarize_metrics(records), "parameters": count_parameters(run.model)}
    write_atomic(out / "metrics.json", json.dumps({"records": records, "summary": summary}, indent=2) + "\n")
    _write_csv(out / "metrics.csv", records)
    write_atomic(out / "loss_curve.png", curves_png([("baseline", records)]))

    grid = []
    for base in s.bases:
        for batch_tokens in s.grid_batch_tokens:
            work = out / ".grid" / f"{base}-{batch_tokens}"
            try:
                grid.append(measure_throughput(dp, s, base, batch_tokens, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out / ".grid", ignore_errors=True)
    _write_csv(out / "throughput.csv", grid)

    memory = measure_memory(dp, run.config.model, s)
    write_atomic(out / "memory.json", json.dumps(memory, indent=2) + "\n")

    suite = {"scale": s.scale, "scale_note": s.describe(), "command": s.command(), "settings": dataclasses.asdict(s),
             "elapsed_s": round(time.perf_counter() - started, 1),
             "throughput_note": "tok/s, TFLOP/s and MFU: the median over the timed steps of the trainer's per-step figures "
                                "(MFU on CPU uses the trainer's nominal CPU peak estimate); peak memory is CUDA max "
                                "allocated and is left empty on CPU.",
             "baseline": {k: summary.get(k) for k in ("parameters", "steps", "tokens", "train_loss", "val_loss",
                                                       "val_ppl", "tok_per_s", "mfu")},
             "files": ["system.json", "baseline/", "metrics.json", "metrics.csv", "loss_curve.png", "throughput.csv",
                       "memory.json", "suite.json"]}
    write_atomic(out / "suite.json", json.dumps(suite, indent=2) + "\n")
    _print_summary(out, suite, grid, memory)
    return suite


def _print_summary(out: Path, suite: dict, grid: list[dict], memory: dict) -> None:
    b = suite["baseline"]
    val = "no validation text" if b["val_loss"] is None else f"val loss {b['val_loss']:.3f} (ppl {b['val_ppl']:.1f})"
    print(f"\nbaseline: {b['parameters']:,} parameters, {b['steps']} steps; train loss {b['train_loss']:.3f}, {val}, "
          f"{b['tok_per_s']:,.0f} tok/s")
    for r in grid:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"throughput: {r['base']:<12} {r['batch_tokens']:>8,} tokens/step  {r['tok_per_s']:>10,.0f} tok/s  "
              f"MFU {mfu}")
    for r in memory["runs"]:
        print(f"memory: grad_checkpoint={str(r['grad_checkpoint']):<5}  saved for backward {r['saved_tensor_mb']:,.1f} MB  "
              f"(plan {r['planned_activation_mb']:,.1f} MB)")
    print(f"wrote {out} in {suite['elapsed_s']:.0f} s; render it with: psannlm report {out} --out {out / 'report.html'}")
