"""The training loop: batch plan, AMP, accumulation, schedule, clipping, eval, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import RunConfig, TrainConfig, dump_config
from ..data.loader import TokenWindows, WindowLoader
from ..errors import CheckpointError, ConfigError, TrainingError
from ..files import DirectoryLock
from ..data.sft import SFTWindows, response_positions
from ..eval.evaluate import evaluate_loss_sum, evaluate_nelbo
from ..objectives import DiffusionBatch, causal_lm_loss_sum, diffusion_batch, diffusion_loss_sum
from ..profiling import memory_snapshot_from_env, nvtx_range
from ..report.loggers import Loggers, open_loggers
from ..report.metrics import plot_loss_curve
from . import checkpoint as ckpt
from .distributed import all_gather_object, all_reduce_max, all_reduce_sum, barrier, broadcast_object, init_distributed, teardown
from .optim import build_optimizer, default_warmup, lr_at
from .parallel import no_grad_sync, parallelize, uncompile_blocks
from .sharded import full_optimizer_state, on_main_rank, save_fsdp_checkpoint
from .throughput import flops_per_token, peak_memory_gb, peak_tflops

log = logging.getLogger("psann.lm")
CPU_MICRO_BATCH_TOKENS = 16384  # keeps CPU activations small without hurting matmul efficiency
INIT_AND_RESUME = ("train.init_from and train.resume_from are both set: resume_from continues a run (its weights, "
                   "optimizer, data position and tokenizer), init_from starts a new one from weights. Drop one of "
                   "them (e.g. --train.init_from=null to resume).")
LATEST_NEEDS_DIR = ("train.resume_from=latest needs train.checkpoint_dir: the run directory to look in for the newest "
                    "checkpoint (e.g. --train.checkpoint_dir=runs/<name>).")


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


@dataclass
class BatchPlan:
    max_length: int
    windows_per_step: int   # over all ranks
    micro_batch_size: int   # windows per forward, per rank
    grad_accum_steps: int
    total_steps: int
    warmup_steps: int
    n_windows: int
    world_size: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.max_length

    def describe(self) -> str:
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"batch: {self.tokens_per_step:,} tokens/step = {self.windows_per_step} windows x {self.max_length} "
                f"(micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation steps{ranks}); "
                f"{self.total_steps:,} steps ({self.total_steps * self.windows_per_step / self.n_windows:.2f} epochs of "
                f"{self.n_windows:,} windows), warmup {self.warmup_steps}")


def plan_batches(cfg: TrainConfig, max_length: int, n_windows: int, device: torch.device, world_size: int = 1) -> BatchPlan:
    """Split batch_tokens into ranks x accumulation steps x micro-batches of windows."""
    windows = cfg.batch_tokens // max_length
    if windows < 1:
        raise ConfigError(f"'train.batch_tokens' ({cfg.batch_tokens}) is smaller than one window of "
                          f"data.max_length={max_length} tokens; raise batch_tokens to at least {max_length} or lower max_length.")
    if windows > n_windows:
        log.warning("data: only %d training window(s) of %d tokens, fewer than the %d per step that batch_tokens=%d "
                    "asks for; each step uses all %d. Add text for a meaningful run.",
                    n_windows, max_length, windows, cfg.batch_tokens, n_windows)
        windows = n_windows
    if windows < world_size:
        raise ConfigError(f"'train.batch_tokens' ({cfg.batch_tokens}) gives {windows} window(s) per step, fewer than the "
                          f"{world_size} ranks; raise batch_tokens to at least {world_size * max_length}.")
    per_rank = windows // world_size
    if per_rank * world_size != windows:
        log.info("batch: %d windows per step do not split over %d ranks; using %d.", windows, world_size, per_rank * world_size)
    if cfg.micro_batch_size is not None and cfg.grad_accum_steps is not None:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    elif cfg.grad_accum_steps is not None:
        accum = min(cfg.grad_accum_steps, per_rank)
        micro = per_rank // accum
    else:
        cap = cfg.micro_batch_size or (max(1, CPU_MICRO_BATCH_TOKENS // max_length) if device.type == "cpu" else per_rank)
        accum = math.ceil(per_rank / min(cap, per_rank))
        micro = math.ceil(per_rank / accum)  # spread evenly: 10 windows, cap 4 -> 3 x 4 (not 4+4+2)
    if micro * accum != per_rank:
        log.info("batch: %d windows per rank and step do not split into %s; using %d x %d = %d windows.",
                 per_rank, "grad_accum_steps" if cfg.grad_accum_steps else "micro-batches", micro, accum, micro * accum)
    per_step = micro * accum * world_size
    if cfg.max_steps is not None:
        total = cfg.max_steps
    elif cfg.max_tokens is not None:
        total = math.ceil(cfg.max_tokens / (per_step * max_length))
    else:
        total = max(1, math.ceil(cfg.epochs * n_windows / per_step))
    warmup = default_warmup(total) if cfg.warmup_steps is None else cfg.warmup_steps
    return BatchPlan(max_length, per_step, micro, accum, total, warmup, n_windows, world_size)


def halve_micro_batch(plan: BatchPlan) -> BatchPlan | None:
    """The same windows per step in micro-batches about half as large (None at 1): the largest
    divisor of the per-rank windows not above half the current micro-batch."""
    per_rank = plan.micro_batch_size * plan.grad_accum_steps
    micro = next((m for m in range(plan.micro_batch_size // 2, 0, -1) if per_rank % m == 0), None)
    if micro is None:
        return None
    return dataclasses.replace(plan, micro_batch_size=micro, grad_accum_steps=per_rank // micro)


def check_same_tokenizer(tokenizer, checkpoint: str) -> None:
    """Weights only mean something with the ids they were trained on."""
    from ..tokenizers import load_tokenizer, tokenizer_fingerprint

    theirs = load_tokenizer(ckpt.resolve_checkpoint(checkpoint) / ckpt.TOKENIZER)
    if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"the data's tokenizer ({tokenizer.kind}, vocab {tokenizer.vocab_size}) is not the one "
                          f"{checkpoint} was trained with ({theirs.kind}, vocab {theirs.vocab_size}); use "
                          f"data.tokenizer_model_path={Path(checkpoint) / ckpt.TOKENIZER} (or leave it unset).")


# Data keys that decide the token stream a resumed run continues (the tokenizer is compared by
# fingerprint; cache_dir is where the run keeps its own copy).
RESUME_DATA_KEYS = ("train_files", "val_files", "path", "sft_files", "max_length", "pack_sequences", "val_split",
                    "seed", "doc_separator", "sampling", "bos_aligned")


def check_resumable(checkpoint: str, config: RunConfig, tokenizer) -> None:
    """A resume continues exactly the run the checkpoint belongs to: the same format, tokenizer,
    model and data, or it is refused naming the key that differs."""
    theirs = ckpt.read_checkpoint_config(checkpoint)  # also checks the format version
    check_same_tokenizer(tokenizer, checkpoint)
    mine_model, their_model = config.model.to_dict(), theirs.model.to_dict()
    mine_data, their_data = config.data.to_dict(), theirs.data.to_dict()
    differ = [f"model.{k}" for k in mine_model if mine_model[k] != their_model.get(k)]
    differ += [f"data.{k}" for k in RESUME_DATA_KEYS if mine_data[k] != their_data.get(k)]
    if differ:
        key = differ[0]
        section, name = key.split(".")
        ours, old = (mine_model, their_model) if section == "model" else (mine_data, their_data)
        raise ConfigError(f"cannot resume from {checkpoint}: '{key}' is {ours[name]!r} here but {old.get(name)!r} "
                          f"in the checkpoint{f' (and {len(differ) - 1} more key(s))' if len(differ) > 1 else ''}. "
                          f"Resume with the checkpoint's settings, or start a new run from its weights with "
                          f"train.init_from={checkpoint}.")


def new_run_dir(root: str = "runs") -> Path:
    return Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds no checkpoint and no metrics (a run that failed before
    training): its data cache and lock file are not worth a stray directory."""
    if not any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "metrics.csv")):
        shutil.rmtree(run_dir, ignore_errors=True)


class Trainer:
    """One training run, in one process or as one rank of a torchrun job."""

    def __init__(self, model: nn.Module, tokenizer, config: RunConfig, train_windows: TokenWindows,
                 val_windows: TokenWindows | None = None, make_loader=None):
        """`make_loader(batch_size, seed, rank, world_size)` builds the training loader (default:
        shuffled windows)."""
        cfg = config.train
        if len(train_windows) == 0:
            raise ConfigError("no training windows: the training text tokenised to fewer than 2 tokens.")
        if cfg.init_from and cfg.resume_from:
            raise ConfigError(INIT_AND_RESUME)
        context = config.model.max_seq_len
        if context and train_windows.max_length > context:
            raise ConfigError(f"'data.max_length' ({train_windows.max_length}) is longer than the model's context "
                              f"'model.max_seq_len' ({context}); lower data.max_length or raise model.max_seq_len.")
        if cfg.resume_from == "latest" and not cfg.checkpoint_dir:
            raise ConfigError(LATEST_NEEDS_DIR)
        self.config, self.cfg, self.tokenizer = config, cfg, tokenizer
        device = resolve_device(cfg.device)
        self.dist = init_distributed(device.type)
        if self.dist.active and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.device = device
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.model = model.to(device)
        self.train_windows, self.val_windows = train_windows, (val_windows if val_windows and len(val_windows) else None)
        self.plan = plan_batches(cfg, train_windows.max_length, len(train_windows), device, self.dist.world_size)
        make_loader = make_loader or (lambda batch_size, seed, rank, world_size: WindowLoader(
            train_windows, batch_size, seed=seed, rank=rank, world_size=world_size))
        self.loader = make_loader(self.plan.micro_batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        self.step, self.tokens_seen, self.best_val, self.bad_steps, self.skipped_steps = 0, 0, math.inf, 0, 0
        self.resumed_step: int | None = None
        self.run_dir = Path(broadcast_object(self._pick_run_dir() if self.dist.is_main else None, self.dist))
        self._created_run_dir = not self.run_dir.exists()
        self._lock = DirectoryLock(self.run_dir, "training run").acquire() if self.dist.is_main else None
        try:
            self._setup(cfg)
        except BaseException:
            self._release_run_dir()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        """Everything after the run directory is locked: weights, parallelism, optimizer, resume."""
        device, config, tokenizer = self.device, self.config, self.tokenizer
        if self.dist.is_main:  # leftovers of a run killed mid-save (we hold the lock: nobody is writing)
            ckpt.recover_checkpoints(self.run_dir / "checkpoints")
        barrier(self.dist)
        if cfg.init_from:
            ckpt.read_checkpoint_config(cfg.init_from)  # says "not found" or lists a run directory's checkpoints
            check_same_tokenizer(tokenizer, cfg.init_from)
            ckpt.load_weights(self.model, cfg.init_from)
            log.info("initialised weights from %s", cfg.init_from)
        # The weights were initialised identically on every rank; dropout and sampling now differ.
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.train_model, self.mode = parallelize(self.model, cfg, self.dist, device, self.amp_dtype)
        # FSDP computes in bf16 through its mixed-precision policy; the others use autocast.
        self.autocast_dtype = None if self.mode == "fsdp" else self.amp_dtype
        self.optimizer = build_optimizer(self.model, cfg, device, self.mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        if cfg.resume_from:
            self._resume(cfg.resume_from)
        self.model_has_aux = "return_aux" in inspect.signature(self.model.forward).parameters
        self.flops_per_token = flops_per_token(self.model, config.model, self.plan.max_length)
        self.peak_tflops, self.peak_source = peak_tflops(device, self.amp_dtype, cfg.peak_tflops)
        self._pending_save = None

    def _pick_run_dir(self) -> str:
        """checkpoint_dir; else the run a resumed checkpoint belongs to (run/checkpoints/NAME); else a new one."""
        cfg = self.cfg
        if cfg.checkpoint_dir:
            return cfg.checkpoint_dir
        if cfg.resume_from:
            return str(Path(cfg.resume_from).resolve().parent.parent)
        return str(new_run_dir())

    def _release_run_dir(self) -> None:
        """At the end of a run: release the directory's lock; a run that failed before it wrote
        anything also removes the directory it made."""
        if self._lock is None:
            return
        self._lock.release()
        self._lock = None
        if self._created_run_dir:
            remove_if_unused(self.run_dir)

    # -- setup -------------------------------------------------------------------------------
    def _resume(self, where: str) -> None:
        if where == "latest":  # rank 0 chooses (it verified the files), so every rank resumes the same step
            where = broadcast_object(str(ckpt.latest_checkpoint(self.run_dir)) if self.dist.is_main else None, self.dist)
        where = str(ckpt.resolve_checkpoint(where))  # a killed save's previous version, while recovery is pending
        check_resumable(where, self.config, self.tokenizer)
        state, rng = ckpt.load_training_state(where)
        ckpt.load_model_and_optimizer(where, self.model, self.optimizer, sharded_model=self.mode == "fsdp")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if len(rng["cpu"]) == self.dist.world_size:
            torch.set_rng_state(rng["cpu"][self.dist.rank])
            if self.device.type == "cuda" and rng["cuda"][self.dist.rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.dist.rank], self.device)
        else:
            log.info("resuming %d rank(s) from a checkpoint of %d: data order and weights continue exactly; dropout "
                     "randomness starts afresh.", self.dist.world_size, len(rng["cpu"]))
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val_loss", math.inf)
        self.skipped_steps, self.resumed_step = state.get("skipped_steps", 0), self.step
        log.info("resumed from %s at step %d", where, self.step)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """(logits, aux) where aux is a model's auxiliary loss and metrics (H-Net's ratio loss), or None."""
        kwargs = {"return_aux": True} if self.model_has_aux else {}
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
        batches = [self._objective_batch(*self.loader.next_batch()) for _ in range(self.plan.grad_accum_steps)]
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
                if isinstance(y, DiffusionBatch):
                    loss_sum = diffusion_loss_sum(logits, y)
                else:
                    loss_sum, _ = causal_lm_loss_sum(logits, y.to(self.device, non_blocking=True), self.cfg.label_smoothing)
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

    def _objective_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, object, int]:
        """(model input, what the loss compares against, tokens the step's loss is normalised by):
        the shifted labels for causal models; a noised batch for diffusion (the masks come from the
        global RNG, whose state checkpoints carry, so resumes are exact)."""
        model = self.config.model
        if model.objective != "diffusion":
            return x, y, int((y != -100).sum())
        if isinstance(self.train_windows, SFTWindows):  # fine-tuning: only response tokens are ever masked
            maskable = response_positions(y)
        else:
            pad = self.tokenizer.pad_id
            maskable = x != pad if bool((x == pad).any()) else None
        noised = diffusion_batch(x, mask_id=model.mask_token_id, eps=model.noise_epsilon, t_sampling=model.t_sampling,
                                 trunc_prob=model.random_trunc_prob, maskable=maskable)
        return noised.inputs, noised, noised.n_tokens

    # -- evaluation and checkpoints --------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.val_windows is None:
            return None
        eval_model = self.train_model if self.mode == "fsdp" else self.model  # FSDP must gather its shards
        if self.config.model.objective == "diffusion":
            # the Monte-Carlo NELBO (an upper bound on the NLL), same masks at every evaluation
            r = evaluate_nelbo(eval_model, self.val_windows, self.plan.micro_batch_size, self.device,
                               mask_id=self.config.model.mask_token_id, draws=self.cfg.eval_mc_draws, seed=self.cfg.seed,
                               pad_id=self.tokenizer.pad_id, max_batches=self.cfg.eval_batches, autocast=self._autocast,
                               rank=self.dist.rank, world_size=self.dist.world_size)
            total, n, var = all_reduce_sum([r["nelbo_sum"], r["tokens"], r["variance"]], self.dist, self.device)
            loss = total / max(1.0, n)
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(n),
                    "val_nelbo_se": math.sqrt(var) / max(1.0, n)}
        total, n = evaluate_loss_sum(eval_model, self.val_windows, self.plan.micro_batch_size, self.device,
                                     self._autocast, self.cfg.eval_batches, self.dist.rank, self.dist.world_size)
        total, n = all_reduce_sum([total, n], self.dist, self.device)
        loss = total / max(1.0, n)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(n)}

    def _trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val,
                "skipped_steps": self.skipped_steps,
                "loader": self.loader.state_dict(), "scaler": self.scaler.state_dict() or None,
                "world_size": self.dist.world_size, "parallel": self.mode}

    def _rng_states(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        states = all_gather_object((torch.get_rng_state(), cuda), self.dist)
        return {"cpu": [c for c, _ in states], "cuda": [g for _, g in states]}

    def save(self, name: str, *, full: bool = True) -> Path:
        """Write checkpoints/<name> (all ranks call this). full=False writes weights only."""
        self.finish_pending_save()
        directory = self.run_dir / "checkpoints" / name
        state = self._trainer_state() if full else None
        rng = self._rng_states() if full else None
        if self.mode == "fsdp":
            weights_only_or_final = not full or name == "final"
            self._pending_save = save_fsdp_checkpoint(
                directory, self.model, self.optimizer if full else None, self.tokenizer, self.config, self.dist,
                trainer_state=state, rng_state=rng, consolidated=weights_only_or_final,
                async_save=self.cfg.async_checkpoint and full and name != "final")
            if name == "final":
                self.finish_pending_save()
            return directory
        optim = None
        if full:
            optim = full_optimizer_state(self.model, self.optimizer, self.dist)
        on_main_rank(self.dist, lambda: ckpt.save_checkpoint(directory, self.model, self.tokenizer, self.config,
                                                             trainer_state=state, optimizer_state=optim, rng_state=rng))
        return directory

    def finish_pending_save(self) -> None:
        if self._pending_save is not None:
            self._pending_save()
            self._pending_save = None

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            with memory_snapshot_from_env(self.dist.rank):
                return self._fit()
        finally:
            self._release_run_dir()
            teardown(self.dist)

    def _fit(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
            log.info("run directory: %s", self.run_dir)
            log.info("device %s, precision %s, parallelism %s; %s", self.device,
                     str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                     f"{self.mode} x {self.dist.world_size}" if self.mode != "none" else "none", self.plan.describe())
            formula = (f"{type(self.model).__name__}.flops_per_token" if hasattr(self.model, "flops_per_token")
                       else "6N + 12 L d T")
            log.info("%.3g FLOPs/token (%s); peak %.1f TFLOP/s per device (%s)", self.flops_per_token, formula,
                     self.peak_tflops, self.peak_source)
        barrier(self.dist)
        metrics = open_loggers(cfg.loggers, self.run_dir, is_main=main, run_config=self.config.to_dict(),
                               wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name, wandb_mode=cfg.wandb_mode,
                               resume_step=self.resumed_step)
        bar = tqdm(total=self.plan.total_steps, initial=self.step, disable=not (cfg.progress and main), unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        start, window_loss, window_n, window_tokens, window_start = time.perf_counter(), 0.0, 0, 0, time.perf_counter()
        window_aux, window_steps = {}, 0
        last_eval = None
        try:
            self.train_model.train()
            while self.step < self.plan.total_steps:
                lr = lr_at(self.step, cfg, self.plan.total_steps, self.plan.warmup_steps)
                loss_sum, n_targets, grad_norm, aux, bad = self._train_step(lr)
                self.step += 1
                self.tokens_seen += self.plan.tokens_per_step
                bar.update(1)
                self._count_bad_step(bad)
                if not bad:  # a skipped step changed nothing: it stays out of the logged means
                    for key, value in aux.items():
                        window_aux[key] = window_aux.get(key, 0.0) + value
                    window_steps += 1
                    window_loss, window_n = window_loss + loss_sum, window_n + n_targets
                window_tokens += self.plan.tokens_per_step
                log_now = self.step % cfg.log_interval_steps == 0 or self.step == self.plan.total_steps
                if log_now and window_steps:  # the ranks agree on skipped steps, so on window_steps
                    now = time.perf_counter()
                    loss_total, n_total = all_reduce_sum([window_loss, window_n], self.dist, self.device)
                    rec = {"kind": "train", "step": self.step, "epoch": round(self.loader.epoch, 4),
                           "tokens": self.tokens_seen, "loss": loss_total / max(1, n_total), "lr": lr,
                           "grad_norm": grad_norm, **self._throughput(window_tokens, now - window_start),
                           "elapsed_s": now - start, "skipped_steps": self.skipped_steps}
                    if window_aux:  # per-step means, averaged over the window and the ranks
                        keys = sorted(window_aux)
                        sums = all_reduce_sum([window_aux[k] for k in keys], self.dist, self.device)
                        rec.update({k: v / (window_steps * self.dist.world_size) for k, v in zip(keys, sums)})
                    if main:
                        metrics.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:,.0f}",
                                        mfu=f"{rec['mfu']:.1%}" if rec.get("mfu") is not None else "-")
                    window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, now
                    window_aux, window_steps = {}, 0
                if cfg.eval_interval_steps and self.step % cfg.eval_interval_steps == 0 and self.step < self.plan.total_steps:
                    last_eval = self._eval_and_track(metrics, start)
                if cfg.save_interval_steps and self.step % cfg.save_interval_steps == 0:
                    self.save(f"step_{self.step:07d}")
        except KeyboardInterrupt:
            bar.close()
            path = self.save(f"step_{self.step:07d}")
            self.finish_pending_save()
            log.warning("interrupted: saved %s (resume with train.resume_from=%s)", path, path)
            metrics.close()
            raise
        except BaseException:
            bar.close()
            metrics.close()
            raise
        bar.close()
        last_eval = self._eval_and_track(metrics, start) or last_eval
        final = self.save("final")
        summary = {"run_dir": str(self.run_dir), "final_checkpoint": str(final), "steps": self.step,
                   "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - start,
                   "world_size": self.dist.world_size, "parallel": self.mode, "loss_curve": None, **(last_eval or {})}
        metrics.close()
        if main:
            plot = plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png") if cfg.plot else None
            summary["loss_curve"] = str(plot) if plot else None
        if self.best_val < math.inf:
            summary["best_checkpoint"] = str(self.run_dir / "checkpoints" / "best")
            summary["best_val_loss"] = self.best_val
        if main:
            log.info("done: %d steps, %s tokens in %.1fs%s; checkpoint %s", self.step, f"{self.tokens_seen:,}",
                     summary["elapsed_s"], f", val loss {last_eval['val_loss']:.4f}" if last_eval else "", final)
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
