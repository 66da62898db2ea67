"""The training loop: batch plan, AMP, accumulation, schedule, clipping, eval, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import RunConfig, TrainConfig, dump_config
from ..data.loader import TokenWindows, WindowLoader
from ..errors import ConfigError
from ..eval.evaluate import evaluate_loss
from ..objectives import causal_lm_loss_sum
from ..report.metrics import MetricsLogger, plot_loss_curve
from . import checkpoint as ckpt
from .optim import build_optimizer, default_warmup, lr_at
from .parallel import apply_activation_checkpointing, maybe_compile

log = logging.getLogger("psann.lm")
CPU_MICRO_BATCH_TOKENS = 16384  # keeps CPU activations small without hurting matmul efficiency


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"'train.device' {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'train.device' is cuda but no CUDA device is visible; use train.device=auto or cpu.")
    return device


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls only beat fp32 on CPUs with bf16 instructions (measured ~1.7x on avx512_bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `amp` on `device` (None = fp32), with a one-line notice on any fallback."""
    if amp == "fp32":
        return None
    if device.type == "cuda":
        if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if amp == "bf16":
            log.warning("amp=bf16 is not supported by this GPU; using fp16 with loss scaling.")
        return torch.float16
    if device.type == "cpu":
        if amp in ("auto", "bf16") and cpu_has_native_bf16():
            return torch.bfloat16
        if amp != "auto":
            log.warning("amp=%s would be slower than fp32 on this CPU (no native bf16/fp16 kernels); training in fp32.", amp)
        return None
    if amp != "auto":
        log.warning("amp=%s is not supported on %s; training in fp32.", amp, device.type)
    return None


@dataclass
class BatchPlan:
    max_length: int
    windows_per_step: int
    micro_batch_size: int
    grad_accum_steps: int
    total_steps: int
    warmup_steps: int
    n_windows: int

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.max_length

    def describe(self) -> str:
        return (f"batch: {self.tokens_per_step:,} tokens/step = {self.windows_per_step} windows x {self.max_length} "
                f"(micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation steps); "
                f"{self.total_steps:,} steps ({self.total_steps * self.windows_per_step / self.n_windows:.2f} epochs of "
                f"{self.n_windows:,} windows), warmup {self.warmup_steps}")


def plan_batches(cfg: TrainConfig, max_length: int, n_windows: int, device: torch.device) -> BatchPlan:
    windows = cfg.batch_tokens // max_length
    if windows < 1:
        raise ConfigError(f"'train.batch_tokens' ({cfg.batch_tokens}) is smaller than one window of "
                          f"data.max_length={max_length} tokens; raise batch_tokens to at least {max_length} or lower max_length.")
    if windows > n_windows:
        log.warning("data: only %d training window(s) of %d tokens, fewer than the %d per step that batch_tokens=%d "
                    "asks for; each step uses all %d. Add text for a meaningful run.",
                    n_windows, max_length, windows, cfg.batch_tokens, n_windows)
        windows = n_windows
    if cfg.micro_batch_size is not None and cfg.grad_accum_steps is not None:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    elif cfg.grad_accum_steps is not None:
        accum = min(cfg.grad_accum_steps, windows)
        micro = windows // accum
    else:
        cap = cfg.micro_batch_size or (max(1, CPU_MICRO_BATCH_TOKENS // max_length) if device.type == "cpu" else windows)
        accum = math.ceil(windows / min(cap, windows))
        micro = math.ceil(windows / accum)  # spread evenly: 10 windows, cap 4 -> 3 x 4 (not 4+4+2)
    if micro * accum != windows:
        log.info("batch: %d windows per step do not split into %s; using %d x %d = %d windows.",
                 windows, "grad_accum_steps" if cfg.grad_accum_steps else "micro-batches", micro, accum, micro * accum)
    per_step = micro * accum
    if cfg.max_steps is not None:
        total = cfg.max_steps
    elif cfg.max_tokens is not None:
        total = math.ceil(cfg.max_tokens / (per_step * max_length))
    else:
        total = max(1, math.ceil(cfg.epochs * n_windows / per_step))
    warmup = default_warmup(total) if cfg.warmup_steps is None else cfg.warmup_steps
    return BatchPlan(max_length, per_step, micro, accum, total, warmup, n_windows)


def new_run_dir(root: str = "runs") -> Path:
    return Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")


class Trainer:
    def __init__(self, model: nn.Module, tokenizer, config: RunConfig, train_windows: TokenWindows,
                 val_windows: TokenWindows | None = None, make_loader=None):
        """`make_loader(batch_size, seed)` builds the training loader (default: shuffled windows)."""
        cfg = config.train
        if cfg.ddp == "on" or (cfg.ddp == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1):
            raise ConfigError("data-parallel training (train.ddp) is not part of this version yet; run one process "
                              "(plain python, not torchrun) with train.ddp=off or auto.")
        if len(train_windows) == 0:
            raise ConfigError("no training windows: the training text tokenised to fewer than 2 tokens.")
        self.config, self.cfg, self.tokenizer = config, cfg, tokenizer
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.model = model.to(self.device)
        self.train_windows, self.val_windows = train_windows, (val_windows if val_windows and len(val_windows) else None)
        self.plan = plan_batches(cfg, train_windows.max_length, len(train_windows), self.device)
        make_loader = make_loader or (lambda batch_size, seed: WindowLoader(train_windows, batch_size, seed=seed))
        self.loader = make_loader(self.plan.micro_batch_size, cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        self.run_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if cfg.resume_from:
            self._resume(cfg.resume_from)
        elif cfg.init_from:
            ckpt.load_weights(self.model, cfg.init_from)
            log.info("initialised weights from %s", cfg.init_from)
        if self.run_dir is None:
            self.run_dir = new_run_dir()
        if cfg.grad_checkpoint:
            log.info("activation checkpointing on %d blocks", apply_activation_checkpointing(self.model))
        self.forward = maybe_compile(self.model, cfg.compile)

    # -- setup -------------------------------------------------------------------------------
    def _resume(self, where: str) -> None:
        if where == "latest":
            if self.run_dir is None:
                raise ConfigError("train.resume_from=latest needs train.checkpoint_dir (the run directory) to look in.")
            where = str(ckpt.latest_checkpoint(self.run_dir))
        state, opt_state = ckpt.load_training_state(where)
        ckpt.load_weights(self.model, where)
        self.optimizer.load_state_dict(opt_state["optimizer"])
        self.scaler.load_state_dict(opt_state["scaler"])
        torch.set_rng_state(opt_state["rng_cpu"])
        if torch.cuda.is_available() and opt_state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(opt_state["rng_cuda"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val_loss", math.inf)
        if self.run_dir is None:
            self.run_dir = Path(where).resolve().parent.parent
        log.info("resumed from %s at step %d", where, self.step)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.forward(x)
        except Exception as exc:  # compile errors surface at the first call, not at torch.compile()
            if self.forward is self.model:
                raise
            log.warning("torch.compile failed (%s: %s); training eagerly.", type(exc).__name__, str(exc).splitlines()[0][:200])
            self.forward = self.model
            return self.forward(x)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- one optimizer step ------------------------------------------------------------------
    def _train_step(self, lr: float) -> tuple[float, int, float]:
        """-> (summed loss, target tokens, grad norm). The loss of the step is normalised by all
        its target tokens, so accumulation gives the same update as one large batch."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        batches = [self.loader.next_batch() for _ in range(self.plan.grad_accum_steps)]
        n_targets = sum(int((y != -100).sum()) for _, y in batches)
        total = 0.0
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self._forward(x)
            loss_sum, _ = causal_lm_loss_sum(logits, y, self.cfg.label_smoothing)
            self.scaler.scale(loss_sum / max(1, n_targets)).backward()
            total += float(loss_sum.detach())
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])))
        if not math.isfinite(total):
            log.warning("step %d: non-finite loss; try a lower train.lr%s.", self.step + 1,
                        "" if self.amp_dtype != torch.float16 else " or amp=bf16")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, n_targets, grad_norm

    # -- evaluation and checkpoints --------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.val_windows is None:
            return None
        loss, n = evaluate_loss(self.model, self.val_windows, self.plan.micro_batch_size, self.device,
                                self._autocast, self.cfg.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n}

    def save(self, name: str, *, full: bool = True) -> Path:
        state = opt_state = None
        if full:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
                     "loader": self.loader.state_dict()}
            opt_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "rng_cpu": torch.get_rng_state(),
                         "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        return ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self.tokenizer, self.config,
                                    trainer_state=state, optimizer_state=opt_state)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, plan = self.cfg, self.plan
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        log.info("run directory: %s", self.run_dir)
        log.info("device %s, precision %s; %s", self.device, str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                 plan.describe())
        metrics = MetricsLogger(self.run_dir)
        bar = tqdm(total=plan.total_steps, initial=self.step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        start, window_loss, window_n, window_tokens, window_start = time.perf_counter(), 0.0, 0, 0, time.perf_counter()
        last_eval = None
        try:
            self.model.train()
            while self.step < plan.total_steps:
                lr = lr_at(self.step, cfg, plan.total_steps, plan.warmup_steps)
                loss_sum, n_targets, grad_norm = self._train_step(lr)
                self.step += 1
                step_tokens = plan.windows_per_step * plan.max_length
                self.tokens_seen += step_tokens
                window_loss, window_n, window_tokens = window_loss + loss_sum, window_n + n_targets, window_tokens + step_tokens
                bar.update(1)
                if self.step % cfg.log_interval_steps == 0 or self.step == plan.total_steps:
                    now = time.perf_counter()
                    rec = {"kind": "train", "step": self.step, "epoch": round(self.loader.epoch, 4),
                           "tokens": self.tokens_seen, "loss": window_loss / max(1, window_n), "lr": lr,
                           "grad_norm": grad_norm, "tok_per_s": window_tokens / max(1e-9, now - window_start),
                           "elapsed_s": now - start}
                    metrics.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:,.0f}")
                    window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, now
                if cfg.eval_interval_steps and self.step % cfg.eval_interval_steps == 0 and self.step < plan.total_steps:
                    last_eval = self._eval_and_track(metrics, start)
                if cfg.save_interval_steps and self.step % cfg.save_interval_steps == 0:
                    self.save(f"step_{self.step:07d}")
        except KeyboardInterrupt:
            bar.close()
            path = self.save(f"step_{self.step:07d}")
            log.warning("interrupted: saved %s (resume with train.resume_from=%s)", path, path)
            metrics.close()
            raise
        bar.close()
        last_eval = self._eval_and_track(metrics, start) or last_eval
        final = self.save("final")
        metrics.close()
        plot = plot_loss_curve(metrics.jsonl_path, self.run_dir / "loss_curve.png") if cfg.plot else None
        summary = {"run_dir": str(self.run_dir), "final_checkpoint": str(final), "steps": self.step,
                   "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - start,
                   "loss_curve": str(plot) if plot else None, **(last_eval or {})}
        if self.best_val < math.inf:
            summary["best_checkpoint"] = str(self.run_dir / "checkpoints" / "best")
            summary["best_val_loss"] = self.best_val
        log.info("done: %d steps, %s tokens in %.1fs%s; checkpoint %s", self.step, f"{self.tokens_seen:,}",
                 summary["elapsed_s"], f", val loss {last_eval['val_loss']:.4f}" if last_eval else "", final)
        return summary

    def _eval_and_track(self, metrics: MetricsLogger, start: float) -> dict | None:
        result = self.evaluate()
        self.model.train()
        if result is None:
            return None
        metrics.log({"kind": "val", "step": self.step, "tokens": self.tokens_seen, "epoch": round(self.loader.epoch, 4),
                     "elapsed_s": time.perf_counter() - start, **result})
        tqdm.write(f"step {self.step}: val loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.2f})", file=sys.stderr)
        if result["val_loss"] < self.best_val:
            self.best_val = result["val_loss"]
            self.save("best", full=False)
        return result

