"""`train(run_config)`: the one way a training run starts, for `psannlm train`, `psannLM.fit`, the
scripts and the benchmarks. In order: join the process group (torchrun), choose and lock the run
directory, recover checkpoints a killed run left half-written, resolve the config (the start
checkpoint's model and tokenizer, the data cache), prepare the data, build the model, train."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..data.build import BuildConfig, build_dataset
from ..data.filters import FilterConfig
from ..data.tokens import INDEX_FILE
from ..data.prepare import PreparedData, prepare_data
from ..data.sources import resolve_inputs
from ..errors import ConfigError
from ..files import DirectoryLock
from ..tokenizers import build_tokenizer
from ..models import build_model, check_model_config, count_parameters
from ..objectives import objective_for
from . import checkpoint as ckpt
from .distributed import DistInfo, barrier, broadcast_object, init_distributed, teardown
from .plan import planned_epochs
from .resume import latest_checkpoint
from .trainer import Trainer, resolve_device

log = logging.getLogger("psann.lm")
REPEATED_TEXT_DROPOUT = 0.1
REPEATED_TEXT_EPOCHS = 5.0
INIT_AND_RESUME = ("train.init_from and train.resume_from are both set: resume_from continues a run (its weights, "
                   "optimizer, data position and tokenizer), init_from starts a new one from weights. Drop one of "
                   "them (e.g. --train.init_from=null to resume).")
LATEST_NEEDS_DIR = ("train.resume_from=latest needs train.checkpoint_dir: the run directory to look in for the newest "
                    "checkpoint (e.g. --train.checkpoint_dir=runs/<name>).")


@dataclass
class RunSummary:
    """What a run produced: `info` (run directory, checkpoints, steps, last validation: what
    `psannlm train` prints), and the trained model with its tokenizer and resolved config. After
    FSDP the model's shards went with the process group, so `model` is None (load the final
    checkpoint)."""

    info: dict
    model: nn.Module | None
    tokenizer: object
    config: RunConfig


def train(config: RunConfig, *, data: PreparedData | None = None, model: nn.Module | None = None,
          manifest: str | None = None, filters: FilterConfig | None = None) -> RunSummary:
    """Train as `config` says. `data` and `model` (the Python API's) replace what the config would
    prepare and build; `manifest` lists text files to build into token shards first (through
    `filters`)."""
    info = init_distributed(resolve_device(config.train.device).type)  # torchrun: join the group first
    lock = None
    try:
        check_start(config)
        run_dir = Path(broadcast_object(pick_run_dir(config) if info.is_main else None, info))
        created = not run_dir.exists()
        lock = DirectoryLock(run_dir, "training run").acquire() if info.is_main else None
        try:
            if info.is_main:  # leftovers of a run killed mid-save (we hold the lock: nobody is writing)
                ckpt.recover_checkpoints(run_dir / "checkpoints")
            barrier(info)
            config = resolve_run_config(dataclasses.replace(config, train=dataclasses.replace(
                config.train, checkpoint_dir=str(run_dir))), info, data_given=data is not None)
            if manifest:
                config = build_from_manifest(config, manifest, info, filters)
            objective = objective_for(config.model)
            data = data or prepare_data(config.data, eos_padded_answers=objective.eos_padded_answers)
            if model is None:
                model_config = model_config_for(config.model, data.tokenizer, data.max_length)
                model_config = with_run_dropout(model_config, config.train, len(data.train_windows), data.max_length)
                torch.manual_seed(config.train.seed)
                model = build_model(model_config)
                log.info("model: %s, %s parameters", model_config.base, f"{count_parameters(model):,}")
                config = dataclasses.replace(config, model=model_config)
            elif config.model.dropout is None:  # a model built outside a run (build_model) has none
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.0))
            config = dataclasses.replace(config, data=data.config)
            trainer = Trainer(model, data.tokenizer, config, data.train_windows, data.val_windows,
                              make_loader=data.make_loader, dist=info)
            summary = trainer.fit()
        except BaseException:
            if lock is not None and created:
                remove_if_unused(run_dir)  # before the lock goes: no other run may start in it meanwhile
            raise
        return RunSummary(summary, None if trainer.mode == "fsdp" else model, data.tokenizer, config)
    finally:
        if lock is not None:
            lock.release()
        teardown(info)


def check_start(config: RunConfig) -> None:
    train = config.train
    if train.attention_anneal_steps and config.model.objective != "diffusion":
        raise ConfigError("'train.attention_anneal_steps' opens a diffusion model's attention from causal to "
                          "bidirectional; this model is causal. Remove it or set model.objective=diffusion.")
    if train.init_from and train.resume_from:
        raise ConfigError(INIT_AND_RESUME)
    if train.resume_from == "latest" and not train.checkpoint_dir:
        raise ConfigError(LATEST_NEEDS_DIR)


def pick_run_dir(config: RunConfig) -> str:
    """checkpoint_dir; else the run a resumed checkpoint belongs to (run/checkpoints/NAME); else a new one."""
    train = config.train
    if train.checkpoint_dir:
        return train.checkpoint_dir
    if train.resume_from:
        return str(Path(train.resume_from).resolve().parent.parent)
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds no checkpoint and no metrics (a run that failed before
    training): its data cache and lock file are not worth a stray directory."""
    if not any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "metrics.csv")):
        shutil.rmtree(run_dir, ignore_errors=True)


def model_config_for(config: ModelConfig, tokenizer, max_length: int) -> ModelConfig:
    """`config` completed for the data: vocabulary (the tokenizer's unless larger), context
    (data.max_length unless set) and what the objective adds (a diffusion mask token)."""
    if config.vocab_size is not None and config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                          "use vocab_size=dp.vocab_size (or leave it unset).")
    config = dataclasses.replace(config, vocab_size=config.vocab_size or tokenizer.vocab_size,
                                 max_seq_len=config.max_seq_len or max_length)
    return objective_for(config).prepare(config, tokenizer)


def with_run_dropout(config: ModelConfig, train: TrainConfig, n_windows: int, max_length: int) -> ModelConfig:
    """model.dropout unset: REPEATED_TEXT_DROPOUT on the residual branches (none on the attention
    weights, which would cost the fused attention kernel) when the run reads its training text at
    least REPEATED_TEXT_EPOCHS times, else none. The default recipe learns fast enough to memorise
    a small corpus it repeats; dropout helps there but costs where the text is read once or twice
    (docs/results/recipe.md, section 2). A resume keeps the dropout its run started with."""
    if config.dropout is not None:
        return config
    if train.resume_from:
        start = ckpt.read_checkpoint_config(str(ckpt.resolve_checkpoint(train.resume_from))).model
        attention = start.attention_dropout if config.attention_dropout is None else config.attention_dropout
        return dataclasses.replace(config, dropout=start.dropout or 0.0, attention_dropout=attention)
    epochs = planned_epochs(train, max_length, n_windows) if n_windows else 0.0  # no windows: the trainer says so
    if epochs < REPEATED_TEXT_EPOCHS:
        return dataclasses.replace(config, dropout=0.0)
    log.info("model.dropout=%s: this run reads its training text %.1f times (>= %s); set model.dropout to choose.",
             REPEATED_TEXT_DROPOUT, epochs, REPEATED_TEXT_EPOCHS)
    attention = 0.0 if config.attention_dropout is None else config.attention_dropout
    return dataclasses.replace(config, dropout=REPEATED_TEXT_DROPOUT, attention_dropout=attention)


def apply_start_checkpoint(config: RunConfig, info: DistInfo | None = None) -> RunConfig:
    """Start from a checkpoint: fine-tuning (train.init_from) or resuming (train.resume_from).
    The model is the checkpoint's with the model keys the config names on top, the tokenizer is the
    checkpoint's unless data names one, and data.max_length its context unless set (longer is an
    error). Resuming also takes every data key the config does not name, so a resume needs no config
    file; the trainer then refuses any named key that differs from the checkpoint's. "Names" means
    the keys of the config file and overrides (`RunConfig.given`). resume_from=latest becomes the
    newest intact checkpoint, chosen by rank 0 so that every rank starts from the same one."""
    config = resolve_latest(config, info)
    train = config.train
    source = train.init_from or train.resume_from
    if not source:
        return config
    source = str(ckpt.resolve_checkpoint(source))
    start = ckpt.read_checkpoint_config(source)
    model = _overlay(ModelConfig, start.model, config.model, config.given)
    if train.init_from and not {"model.dropout", "model.attention_dropout"} & config.given:
        model = dataclasses.replace(model, dropout=None, attention_dropout=None)  # decided for this run's plan
    data = config.data
    if train.resume_from:
        tokenizer_keys = ("cache_dir", "tokenizer", "tokenizer_model_path", "tokenizer_vocab_size")
        data = _overlay(DataConfig, start.data, data, config.given | {f"data.{k}" for k in tokenizer_keys})
    if not (data.tokenizer_model_path or data.path):
        data = dataclasses.replace(data, tokenizer_model_path=os.path.join(source, "tokenizer"))
    if model.max_seq_len and "data.max_length" not in config.given and not train.resume_from:
        data = dataclasses.replace(data, max_length=model.max_seq_len)
    elif model.max_seq_len and data.max_length > model.max_seq_len:
        raise ConfigError(f"data.max_length={data.max_length} is longer than the {model.max_seq_len}-token "
                          f"context of {source}; lower it (or leave it unset to use the checkpoint's).")
    return dataclasses.replace(config, model=model, data=data, train=train)


def resolve_latest(config: RunConfig, info: DistInfo | None = None) -> RunConfig:
    """resume_from=latest becomes the newest intact checkpoint of the run, chosen by rank 0 so that
    every rank resumes the same step."""
    check_start(config)
    train = config.train
    if train.resume_from != "latest":
        return config
    main = info is None or info.is_main
    latest = broadcast_object(str(latest_checkpoint(train.checkpoint_dir)) if main else None, info or DistInfo())
    return dataclasses.replace(config, train=dataclasses.replace(train, resume_from=latest))


def _overlay(section, theirs, mine, given: frozenset[str]):
    """`theirs` (a config section) with the keys of `mine` that `given` names."""
    named = {f.name: getattr(mine, f.name) for f in dataclasses.fields(section) if f"{section.section}.{f.name}" in given}
    return section(**{**theirs.to_dict(), **named})


def resolve_run_config(config: RunConfig, info: DistInfo | None = None, *, data_given: bool = False) -> RunConfig:
    """Fill what depends on the run: the start checkpoint's model and tokenizer (apply_start_checkpoint),
    the data cache inside the run directory (one per rank: ranks tokenise side by side), and the
    tokenizer a family needs (byte-level bases read bytes) when the tokenizer is left on auto."""
    info = info or DistInfo()
    # data prepared by the caller is what it is: only the checkpoint to resume is resolved
    config = resolve_latest(config, info) if data_given else apply_start_checkpoint(config, info)
    train, data, model = config.train, config.data, config.model
    needs = check_model_config(model).tokenizer  # fails before any data is prepared
    if needs and data.tokenizer == "auto" and not (data.tokenizer_model_path or data.path):
        data = dataclasses.replace(data, tokenizer=needs)
    if data.cache_dir is None and train.checkpoint_dir:
        suffix = f"/rank_{info.rank}" if info.active else ""
        data = dataclasses.replace(data, cache_dir=f"{train.checkpoint_dir}/data{suffix}")
    return dataclasses.replace(config, model=model, train=train, data=data)


def build_from_manifest(config: RunConfig, manifest: str, info: DistInfo, filters: FilterConfig | None = None) -> RunConfig:
    """--data-manifest: train on the listed text files; with a tokenizer given, build them into
    token shards first (rank 0 builds, resumably; the others wait)."""
    data = config.data
    if not data.tokenizer_model_path:
        files = [str(f) for f in resolve_inputs([], [manifest])]
        return dataclasses.replace(config, data=dataclasses.replace(data, train_files=files))
    out = f"{config.train.checkpoint_dir}/data"
    if info.is_main and not os.path.exists(os.path.join(out, INDEX_FILE)):
        tokenizer = data.tokenizer_model_path
        if not os.path.isdir(tokenizer):  # a tokenizer file (tokenizer.json, .model): the build reads a directory
            tokenizer = f"{config.train.checkpoint_dir}/tokenizer_source"
            build_tokenizer(data.tokenizer, model_path=data.tokenizer_model_path).save(tokenizer)
        build_dataset(BuildConfig(inputs=[], manifests=[manifest], tokenizer=tokenizer, out=out,
                                  separator=data.doc_separator or "eot", progress=True,
                                  filters=filters or FilterConfig()))
    barrier(info)
    built = dataclasses.replace(data, path=out, tokenizer_model_path=None, tokenizer="auto", doc_separator=None)
    return dataclasses.replace(config, data=built)
