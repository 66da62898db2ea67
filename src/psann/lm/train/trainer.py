"""The training loop: batch plan, AMP, accumulation, schedule, clipping, eval, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import RunConfig, dump_config
from ..data.shards import Loader, Windows
from ..errors import ConfigError, TrainingError
from ..objectives import objective_for
from ..objectives.diffusion import annealed_visibility
from ..profiling import memory_snapshot_from_env, nvtx_range
from .loggers import Loggers, open_loggers
from .norms import NormProbe
from .metrics import plot_loss_curve
from . import checkpoint as ckpt
from .checkpointer import Checkpointer, check_same_tokenizer, load_init_weights
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier
from .optim import build_optimizer, lr_at
from .parallel import no_grad_sync, parallelize, uncompile_blocks
from .plan import halve_micro_batch, plan_batches
from .throughput import flops_formula, peak_memory_gb, peak_tflops

log = logging.getLogger("psann.lm")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`key` names the option the device came from (train.device, --device), for the error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"'{key}' {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'{key}' is {name} but no CUDA device is visible; use {key}{'=' if '.' in key else ' '}auto or cpu.")
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


class Trainer:
    """One training run, in one process or as one rank of a torchrun job, in `config.train.checkpoint_dir`
    (`train()` chooses and locks it, and joins the process group; `dist` describes the group)."""

    def __init__(self, model: nn.Module, tokenizer, config: RunConfig, train_windows: Windows,
                 val_windows: Windows | None = None, make_loader=None, dist: DistInfo | None = None):
        """`make_loader(batch_size, seed, rank, world_size)` builds the training loader (default:
        shuffled windows)."""
        cfg = config.train
        if len(train_windows) == 0:
            raise ConfigError("no training windows: the training text tokenised to fewer than 2 tokens.")
        context = config.model.max_seq_len
        if context and train_windows.max_length > context:
            raise ConfigError(f"'data.max_length' ({train_windows.max_length}) is longer than the model's context "
                              f"'model.max_seq_len' ({context}); lower data.max_length or raise model.max_seq_len.")
        self.config, self.cfg, self.tokenizer = config, cfg, tokenizer
        self.objective = objective_for(config.model)
        self.dist = dist or DistInfo()
        self.run_dir = Path(cfg.checkpoint_dir)
        device = resolve_device(cfg.device)
        if self.dist.active and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.device = device
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.model = model.to(device)
        self.train_windows, self.val_windows = train_windows, (val_windows if val_windows and len(val_windows) else None)
        self.plan = plan_batches(cfg, train_windows.max_length, len(train_windows), device, self.dist.world_size)
        make_loader = make_loader or (lambda batch_size, seed, rank, world_size: Loader(
            train_windows, batch_size, seed=seed, rank=rank, world_size=world_size))
        self.loader = make_loader(self.plan.micro_batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        self.step, self.tokens_seen, self.best_val, self.bad_steps, self.skipped_steps = 0, 0, math.inf, 0, 0
        self.resumed_step: int | None = None
        if cfg.init_from:
            ckpt.read_checkpoint_config(cfg.init_from)  # says "not found" or lists a run directory's checkpoints
            check_same_tokenizer(tokenizer, cfg.init_from)
            load_init_weights(self.model, cfg.init_from)
            log.info("initialised weights from %s", cfg.init_from)
        # The weights were initialised identically on every rank; dropout and sampling now differ.
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.train_model, self.mode = parallelize(self.model, cfg, self.dist, device, self.amp_dtype)
        # FSDP computes in bf16 through its mixed-precision policy; the others use autocast.
        self.autocast_dtype = None if self.mode == "fsdp" else self.amp_dtype
        self.optimizer = build_optimizer(self.model, cfg, device, self.mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.checkpointer = Checkpointer(self.run_dir, self.model, self.optimizer, tokenizer, config, self.dist, device,
                                         self.mode)
        if cfg.resume_from:
            state = self.checkpointer.resume(cfg.resume_from, self.scaler)
            self.loader.load_state_dict(state["loader"])
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.best_val = state.get("best_val_loss", math.inf)
            self.skipped_steps, self.resumed_step = state.get("skipped_steps", 0), self.step
        self.model_has_aux = "return_aux" in inspect.signature(self.model.forward).parameters
        if cfg.attention_anneal_steps >= self.plan.total_steps:
            raise ConfigError(f"'train.attention_anneal_steps' ({cfg.attention_anneal_steps}) must be below the run's "
                              f"{self.plan.total_steps} steps, or the model never trains with the bidirectional "
                              "attention it is scored and sampled with; lower it.")
        self.norms = NormProbe(self.model) if cfg.log_norms else None
        self.flops_per_token = self.model.flops_per_token(self.plan.max_length)
        self.peak_tflops, self.peak_source = peak_tflops(device, self.amp_dtype, cfg.peak_tflops)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """(logits, aux) where aux is a model's auxiliary loss and metrics (H-Net's ratio loss), or None."""
        kwargs = {"return_aux": True} if self.model_has_aux else {}
        if self.step < self.cfg.attention_anneal_steps:  # drawn from the global RNG, so resumes repeat it
            kwargs["visible"] = annealed_visibility(x.shape[1], (self.step + 1) / self.cfg.attention_anneal_steps)
        try:
            out = self.train_model(x, **kwargs)
        except Exception as exc:  # compile errors surface at the first call, not at torch.compile()
            if not uncompile_blocks(self.model):
                raise
            log.warning("torch.compile failed (%s: %s); training eagerly.", type(exc).__name__, str(exc).splitlines()[0][:200])
            out = self.train_model(x, **kwargs)
        return out if self.model_has_aux else (out, None)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one optimizer step ------------------------------------------------------------------
    def _train_step(self, lr: float) -> tuple[float, int, float, dict, bool]:
        """-> (summed loss of this rank, target tokens of this rank, grad norm, summed aux metrics,
        whether the step was skipped as non-finite)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        start = self.loader.state_dict()
        while True:
            try:
                return self._accumulate_and_step()
            except torch.cuda.OutOfMemoryError:
                smaller = halve_micro_batch(self.plan) if self.cfg.auto_micro_batch and not self.dist.active else None
                if smaller is None:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.loader.load_state_dict(start)  # the same windows again, in smaller pieces
                self.loader.batch_size = smaller.micro_batch_size
                log.warning("out of GPU memory at micro-batch %d; retrying with %d x %d accumulation steps "
                            "(batch_tokens unchanged). Set train.micro_batch_size=%d to start there.",
                            self.plan.micro_batch_size, smaller.micro_batch_size, smaller.grad_accum_steps,
                            smaller.micro_batch_size)
                self.plan = smaller

    def _accumulate_and_step(self) -> tuple[float, int, float, dict, bool]:
        """The loss of a step is normalised by the target tokens of all its micro-batches on all
        ranks, so any split (accumulation, ranks) gives the same update as one large batch.
        An auxiliary loss (a per-micro-batch mean) is weighted by the micro-batch's targets, so it
        enters the step as a token-weighted mean beside the cross-entropy."""
        with nvtx_range("batches", "verbose"):
            batches = [self.objective.batch(*self.loader.next_batch(), self.train_windows, self.tokenizer.pad_id)
                       for _ in range(self.plan.grad_accum_steps)]
        n_local = sum(n for _, _, n in batches)
        n_global = all_reduce_sum([n_local], self.dist, self.device)[0]
        # DDP and FSDP average gradients over ranks; scale back up so the result is sum / n_global.
        scale = self.dist.world_size / max(1.0, n_global)
        total, aux_sums = 0.0, {}
        for i, (x, y, n) in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            with no_grad_sync(self.train_model, self.mode, last_micro_step=i == len(batches) - 1):
                with self._autocast(), nvtx_range("forward"):
                    logits, aux = self._forward(x)
                loss_sum = self.objective.loss_sum(logits, y, self.cfg.label_smoothing)
                objective = loss_sum if aux is None else loss_sum + aux["loss"] * n
                with nvtx_range("backward"):
                    self.scaler.scale(objective * scale).backward()
            total += float(loss_sum.detach())
            for key, value in (aux or {}).get("metrics", {}).items():
                aux_sums[key] = aux_sums.get(key, 0.0) + float(value) / len(batches)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # Every rank must agree to skip. With fp16 the loss scaler handles overflowing gradients itself.
        bad = not math.isfinite(total) or (not math.isfinite(grad_norm) and not self.scaler.is_enabled())
        bad = all_reduce_max(float(bad), self.dist, self.device) > 0
        grad_norm = grad_norm if math.isfinite(grad_norm) else None  # JSON has no NaN
        with nvtx_range("optimizer"):
            if not bad:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return total, n_local, grad_norm, aux_sums, bad

    def _count_bad_step(self, bad: bool) -> None:
        """A step with a non-finite loss or gradient norm changes no weight; after max_bad_steps of
        them in a row the run stops, its last checkpoint (all finite) left as the newest."""
        if not bad:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        hint = "lower train.lr" + (" or use amp=bf16" if self.autocast_dtype == torch.float16 else "")
        log.warning("step %d: non-finite loss or gradient norm; the step was skipped (no update). %d in a row; %s.",
                    self.step, self.bad_steps, hint)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingError(f"stopped at step {self.step}: {self.bad_steps} steps in a row had a non-finite loss or "
                                f"gradient norm (train.max_bad_steps={self.cfg.max_bad_steps}). The weights diverged or "
                                f"the data holds bad values: {hint}, raise train.warmup_steps or lower train.grad_clip, "
                                f"then resume from the last checkpoint (train.resume_from=latest) or start again. Skipped "
                                f"steps change no weight, so every checkpoint holds finite weights.")

    # -- evaluation and checkpoints --------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.val_windows is None:
            return None
        eval_model = self.train_model if self.mode == "fsdp" else self.model  # FSDP must gather its shards
        sums = self.objective.validation_sums(
            eval_model, self.val_windows, self.plan.micro_batch_size, self.device, pad_id=self.tokenizer.pad_id,
            autocast=self._autocast, max_batches=self.cfg.eval_batches, rank=self.dist.rank,
            world_size=self.dist.world_size, draws=self.cfg.eval_mc_draws, seed=self.cfg.seed)
        keys = sorted(sums)
        summary = self.objective.summary(dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.dist, self.device))))
        return {"val_loss": summary["loss"], "val_ppl": summary["ppl"], "val_tokens": summary["tokens"],
                **({"val_nelbo_se": summary["nelbo_se"]} if "nelbo_se" in summary else {})}

    def save(self, name: str, *, full: bool = True) -> Path:
        """Write checkpoints/<name> (all ranks call this). full=False writes weights only."""
        state = None
        if full:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
                     "skipped_steps": self.skipped_steps, "loader": self.loader.state_dict(),
                     "scaler": self.scaler.state_dict() or None, "world_size": self.dist.world_size,
                     "parallel": self.mode}
        return self.checkpointer.save(name, state)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        with memory_snapshot_from_env(self.dist.rank):
            return self._fit()

    def _fit(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self._announce()
        barrier(self.dist)
        metrics = open_loggers(cfg.loggers, self.run_dir, is_main=main, run_config=self.config.to_dict(),
                               wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name, wandb_mode=cfg.wandb_mode,
                               wandb_entity=cfg.wandb_entity, resume_step=self.resumed_step)
        start = time.perf_counter()
        try:
            with tqdm(total=self.plan.total_steps, initial=self.step, disable=not (cfg.progress and main), unit="step",
                      dynamic_ncols=True, mininterval=0.5) as bar:
                last_eval = self._steps(metrics, bar, start)
            last_eval = self._eval_and_track(metrics, start) or last_eval
            final = self.save("final")
            if cfg.wandb_artifacts:
                self.checkpointer.finish_pending()  # the best checkpoint may still be writing
                best = self.run_dir / "checkpoints" / "best"
                metrics.log_artifacts({"final": final, **({"best": best} if best.is_dir() else {})})
        finally:
            metrics.close()
        return self._summary(final, last_eval, time.perf_counter() - start)

    def _steps(self, metrics: Loggers, bar: tqdm, start: float) -> dict | None:
        """Optimizer steps to the end of the plan, with logging, evaluation and checkpoints on
        their intervals; -> the last evaluation. Ctrl-C saves a resumable checkpoint first."""
        cfg, window, last_eval = self.cfg, LogWindow(time.perf_counter()), None
        self.train_model.train()
        try:
            while self.step < self.plan.total_steps:
                lr = lr_at(self.step, cfg, self.plan.total_steps, self.plan.warmup_steps)
                with nvtx_range(f"step {self.step}", "coarse"):
                    loss_sum, n_targets, grad_norm, aux, bad = self._train_step(lr)
                self.step += 1
                self.tokens_seen += self.plan.tokens_per_step
                bar.update(1)
                self._count_bad_step(bad)
                window.add(self.plan.tokens_per_step, None if bad else (loss_sum, n_targets, aux))
                log_now = self.step % cfg.log_interval_steps == 0 or self.step == self.plan.total_steps
                if log_now and window.steps:  # the ranks agree on skipped steps, so on window.steps
                    rec = self._train_record(window, lr, grad_norm, start)
                    if self.dist.is_main:
                        metrics.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:,.0f}",
                                        mfu=f"{rec['mfu']:.1%}" if rec.get("mfu") is not None else "-")
                    window = LogWindow(time.perf_counter())
                if cfg.eval_interval_steps and self.step % cfg.eval_interval_steps == 0 and self.step < self.plan.total_steps:
                    last_eval = self._eval_and_track(metrics, start)
                if cfg.save_interval_steps and self.step % cfg.save_interval_steps == 0:
                    self.save(f"step_{self.step:07d}")
        except KeyboardInterrupt:
            path = self.save(f"step_{self.step:07d}")
            self.checkpointer.finish_pending()
            log.warning("interrupted: saved %s (resume with train.resume_from=%s)", path, path)
            raise
        return last_eval

    def _announce(self) -> None:
        """The run directory's config.yaml and the plan, before the first step."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        log.info("run directory: %s", self.run_dir)
        log.info("device %s, precision %s, parallelism %s; %s", self.device,
                 str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                 f"{self.mode} x {self.dist.world_size}" if self.mode != "none" else "none", self.plan.describe())
        log.info("%.3g FLOPs/token (%s); peak %.1f TFLOP/s per device (%s)", self.flops_per_token, flops_formula(self.model),
                 self.peak_tflops, self.peak_source)

    def _train_record(self, window: "LogWindow", lr: float, grad_norm: float | None, start: float) -> dict:
        """The window's loss (over all ranks' tokens), per-step means of the auxiliary metrics and throughput."""
        now = time.perf_counter()
        loss_total, n_total = all_reduce_sum([window.loss_sum, window.targets], self.dist, self.device)
        rec = {"kind": "train", "step": self.step, "epoch": round(self.loader.epoch, 4), "tokens": self.tokens_seen,
               "loss": loss_total / max(1, n_total), "lr": lr, "grad_norm": grad_norm,
               **self._throughput(window.tokens, now - window.start), "elapsed_s": now - start,
               "skipped_steps": self.skipped_steps}
        if window.aux:
            keys = sorted(window.aux)
            sums = all_reduce_sum([window.aux[k] for k in keys], self.dist, self.device)
            rec.update({k: v / (window.steps * self.dist.world_size) for k, v in zip(keys, sums)})
        if self.norms is not None:
            rec.update(self._norm_record())
        return rec

    def _norm_record(self) -> dict:
        """train.log_norms: activation RMS averaged over ranks; the weight norm over every shard."""
        acts = self.norms.activations()
        keys = sorted(acts)
        [square, *sums] = all_reduce_sum([self.norms.weight_square_sum(), *(acts[k] for k in keys)], self.dist, self.device)
        if self.mode != "fsdp":
            square /= self.dist.world_size  # every rank holds all the weights
        return {"weight_l2_norm": square ** 0.5, **{k: v / self.dist.world_size for k, v in zip(keys, sums)}}

    def _summary(self, final: Path, last_eval: dict | None, elapsed: float) -> dict:
        summary = {"run_dir": str(self.run_dir), "final_checkpoint": str(final), "steps": self.step,
                   "tokens_seen": self.tokens_seen, "elapsed_s": elapsed, "world_size": self.dist.world_size,
                   "parallel": self.mode, "loss_curve": None, **(last_eval or {})}
        if self.dist.is_main and self.cfg.plot:
            plot = plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
            summary["loss_curve"] = str(plot) if plot else None
        if self.best_val < math.inf:
            summary["best_checkpoint"] = str(self.run_dir / "checkpoints" / "best")
            summary["best_val_loss"] = self.best_val
        if self.dist.is_main:
            log.info("done: %d steps, %s tokens in %.1fs%s; checkpoint %s", self.step, f"{self.tokens_seen:,}",
                     elapsed, f", val loss {last_eval['val_loss']:.4f}" if last_eval else "", final)
        return summary

    def _throughput(self, tokens: int, seconds: float) -> dict:
        """Tokens/s over all ranks, achieved TFLOP/s per device, MFU and peak memory (max over ranks)."""
        tok_s = tokens / max(1e-9, seconds)
        tflops = tok_s * self.flops_per_token / self.dist.world_size / 1e12
        return {"tok_per_s": tok_s, "tflops_per_device": tflops,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                "peak_mem_gb": all_reduce_max(peak_memory_gb(self.device), self.dist, self.device)}

    def _eval_and_track(self, metrics: Loggers, start: float) -> dict | None:
        result = self.evaluate()
        self.train_model.train()
        if result is None:
            return None
        metrics.log({"kind": "val", "step": self.step, "tokens": self.tokens_seen,
                     "epoch": round(self.loader.epoch, 4), "elapsed_s": time.perf_counter() - start, **result})
        if result["val_loss"] < self.best_val:
            self.best_val = result["val_loss"]
            self.save("best", full=False)
        return result


@dataclass
class LogWindow:
    """What the steps since the last train record add up to. A skipped step changed nothing, so it
    counts towards throughput only, not towards the logged means."""

    start: float
    tokens: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    targets: int = 0
    aux: dict = field(default_factory=dict)

    def add(self, tokens: int, step: tuple[float, int, dict] | None) -> None:
        self.tokens += tokens
        if step is None:
            return
        loss_sum, targets, aux = step
        self.steps += 1
        self.loss_sum += loss_sum
        self.targets += targets
        for key, value in aux.items():
            self.aux[key] = self.aux.get(key, 0.0) + value
