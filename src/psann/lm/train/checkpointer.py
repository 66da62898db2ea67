"""The trainer's checkpointer: the only part of a run that writes checkpoints (single-process or
sharded, synchronous or async) or reads one back to resume, checking that the checkpoint belongs
to this run first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..tokenizers import load_tokenizer, tokenizer_fingerprint
from . import checkpoint as ckpt
from .distributed import DistInfo, all_gather_object
from .optim import resolved_optimizer
from .resume import load_model_and_optimizer, load_training_state
from .sharded import full_optimizer_state, on_main_rank, save_fsdp_checkpoint

log = logging.getLogger("psann.lm")

# Data keys that decide the token stream a resumed run continues (the tokenizer is compared by
# fingerprint; cache_dir is where the run keeps its own copy).
# data.sampling is not here: the loader's state holds the mode it resolved to (auto's meaning has
# changed once) and refuses another
RESUME_DATA_KEYS = ("train_files", "val_files", "train_token_files", "val_token_files", "path", "sft_files",
                    "max_length", "pack_sequences", "val_split", "seed", "doc_separator", "bos_aligned")


def check_same_tokenizer(tokenizer, checkpoint: str) -> None:
    """Weights only mean something with the ids they were trained on."""
    theirs = load_tokenizer(ckpt.resolve_checkpoint(checkpoint) / ckpt.TOKENIZER)
    if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"the data's tokenizer ({tokenizer.kind}, vocab {tokenizer.vocab_size}) is not the one "
                          f"{checkpoint} was trained with ({theirs.kind}, vocab {theirs.vocab_size}); use "
                          f"data.tokenizer_model_path={Path(checkpoint) / ckpt.TOKENIZER} (or leave it unset).")


def load_init_weights(model: nn.Module, checkpoint: str) -> None:
    """train.init_from: the checkpoint's weights. A causal checkpoint starting a diffusion model
    lacks the mask token appended after the vocabulary: its embedding (and head) row starts as the
    mean of the others; every other tensor must fit exactly."""
    theirs = ckpt.read_checkpoint_config(checkpoint).model
    mine = getattr(model, "config", None)
    grows = (mine is not None and theirs.objective == "causal" and mine.objective == "diffusion"
             and theirs.vocab_size is not None and mine.vocab_size == theirs.vocab_size + 1)
    directory = ckpt.resolve_checkpoint(checkpoint)
    if not grows or not (directory / ckpt.WEIGHTS).exists():
        ckpt.load_weights(model, checkpoint)
        return
    ckpt.verify_checkpoint(directory, ckpt.WEIGHTS)
    state = load_file(str(directory / ckpt.WEIGHTS))
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tensor.ndim == 2 and tensor.shape[0] + 1 == own[name].shape[0] == mine.vocab_size:
            state[name] = torch.cat([tensor, tensor.mean(0, keepdim=True)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[name].data_ptr() for name in state if name in own}
    missing = [name for name in missing if own[name].data_ptr() not in loaded]  # tied weights are stored once
    if missing or unexpected:
        raise CheckpointError(f"weights in {directory} do not fit the diffusion model built from them "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}).")
    log.info("the mask token's embedding starts as the mean of the causal checkpoint's")


def check_resumable(checkpoint: str, config: RunConfig, tokenizer) -> RunConfig:
    """A resume continues exactly the run the checkpoint belongs to: the same format, tokenizer,
    model and data, or it is refused naming the key that differs. -> the checkpoint's config."""
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
    return theirs


class Checkpointer:
    """Writes run_dir/checkpoints/<name> and resumes from a checkpoint, on every rank."""

    def __init__(self, run_dir: Path, model: nn.Module, optimizer, tokenizer, config: RunConfig, dist: DistInfo,
                 device: torch.device, mode: str):
        self.root = run_dir / "checkpoints"
        self.model, self.optimizer, self.tokenizer, self.config = model, optimizer, tokenizer, config
        self.dist, self.device, self.mode = dist, device, mode
        self._pending = None

    def save(self, name: str, trainer_state: dict | None) -> Path:
        """Weights, config and tokenizer; with `trainer_state` also the optimizer and RNG states a
        resume needs (all ranks call this). FSDP saves are sharded, and async unless final."""
        self.finish_pending()
        directory = self.root / name
        full = trainer_state is not None
        rng = self._rng_states() if full else None
        if self.mode == "fsdp":
            self._pending = save_fsdp_checkpoint(
                directory, self.model, self.optimizer if full else None, self.tokenizer, self.config, self.dist,
                trainer_state=trainer_state, rng_state=rng, consolidated=not full or name == "final",
                async_save=self.config.train.async_checkpoint and full and name != "final")
            if name == "final":
                self.finish_pending()
            return directory
        optim = full_optimizer_state(self.model, self.optimizer, self.dist) if full else None
        on_main_rank(self.dist, lambda: ckpt.save_checkpoint(directory, self.model, self.tokenizer, self.config,
                                                             trainer_state=trainer_state, optimizer_state=optim,
                                                             rng_state=rng))
        return directory

    def finish_pending(self) -> None:
        if self._pending is not None:
            self._pending()
            self._pending = None

    def _rng_states(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        states = all_gather_object((torch.get_rng_state(), cuda), self.dist)
        return {"cpu": [c for c, _ in states], "cuda": [g for _, g in states]}

    def resume(self, where: str, scaler: torch.amp.GradScaler) -> dict:
        """Load weights, optimizer, loss scaler and RNG state of checkpoint `where` (train.run's
        resolve_latest has made "latest" a path); -> its trainer state."""
        where = str(ckpt.resolve_checkpoint(where))
        their_config = check_resumable(where, self.config, self.tokenizer)
        state, rng = load_training_state(where)
        theirs = resolved_optimizer(their_config.train.optimizer, state.get("parallel", "none"))
        mine = resolved_optimizer(self.config.train.optimizer, self.mode)
        if (theirs == "muon") != (mine == "muon"):  # their states have different parameter groups
            raise ConfigError(f"cannot resume from {where}: it holds {theirs}'s optimizer state and this run would "
                              f"train with {mine} (train.optimizer={self.config.train.optimizer}). Resume with "
                              f"train.optimizer={theirs}, or start a new run from its weights with train.init_from={where}.")
        load_model_and_optimizer(where, self.model, self.optimizer, sharded_model=self.mode == "fsdp")
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rank = self.dist.rank
        if len(rng["cpu"]) == self.dist.world_size:
            torch.set_rng_state(rng["cpu"][rank])
            if self.device.type == "cuda" and rng["cuda"][rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][rank], self.device)
        else:
            log.info("resuming %d rank(s) from a checkpoint of %d: data order and weights continue exactly; dropout "
                     "randomness starts afresh.", self.dist.world_size, len(rng["cpu"]))
        log.info("resumed from %s at step %d", where, state["step"])
        return state
