"""`psannlm train` / `python -m psann.lm.train.cli` / `scripts/train_psann_lm.py`: train from a
YAML/TOML/JSON config plus overrides, or from the original spec's flags; `--dry-run` prints the cost.

    python -m psann.lm.train.cli --config examples/lm/configs/waveresnet_cpu.yaml --train.lr=3e-4
    torchrun --nproc-per-node 8 scripts/train_psann_lm.py --config examples/lm/configs/psann_3b.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..config import RunConfig, dump_config, load_config
from ..errors import ConfigError, PsannError
from ..files import DirectoryLock


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML, TOML or JSON file with sections model/data/train/generate")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.epilog = ("Any config key can be overridden as --section.key=value, e.g. --train.lr=3e-4 "
                     "--model.n_layers=4 --data.train_files=[a.txt,b.txt].")


# The original spec's flags, each an alias of one config key.
SPEC_FLAGS = {
    "--base": "model.base", "--d-model": "model.d_model", "--n-layers": "model.n_layers", "--n-heads": "model.n_heads",
    "--d-mlp": "model.d_mlp", "--vocab-size": "model.vocab_size", "--tokenizer-backend": "data.tokenizer",
    "--tokenizer-model-path": "data.tokenizer_model_path", "--data-path": "data.path", "--max-length": "data.max_length",
    "--batch-tokens": "train.batch_tokens", "--grad-accum-steps": "train.grad_accum_steps",
    "--micro-batch-size": "train.micro_batch_size", "--amp": "train.amp", "--fsdp": "train.fsdp",
    "--optimizer": "train.optimizer", "--lr": "train.lr", "--epochs": "train.epochs", "--max-steps": "train.max_steps",
    "--max-tokens": "train.max_tokens", "--save-interval-steps": "train.save_interval_steps",
    "--checkpoint-dir": "train.checkpoint_dir", "--resume-from": "train.resume_from", "--seed": "train.seed",
}


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    for flag, key in SPEC_FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, metavar="V", help=f"= --{key}")
    parser.add_argument("--grad-checkpoint", dest="train.grad_checkpoint", action="store_const", const="true",
                        help="= --train.grad_checkpoint=true")
    parser.add_argument("--compile", dest="train.compile", action="store_const", const="true", help="= --train.compile=true")
    parser.add_argument("--data-manifest", help="a file listing text files, one per line; with --tokenizer-model-path "
                        "they are built into token shards under <checkpoint-dir>/data first (resumable, flat memory)")
    parser.add_argument("--out-ckpt", help="also write the final weights (with config and tokenizer) to this directory")
    parser.add_argument("--dry-run", action="store_true", help="print parameters, per-GPU memory, FLOPs/token and time "
                        "to the token budget, then exit (touches no GPU)")
    parser.add_argument("--world-size", type=int, default=None, help="dry run: number of GPUs (default: WORLD_SIZE or 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="dry run: GPUs per node (for fsdp=hybrid)")
    parser.add_argument("--gpu", default="H100", help="dry run: GPU model of the peak-FLOP/s table (default H100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="dry run: assumed model FLOPs utilisation (default 0.4)")


def spec_overrides(args: argparse.Namespace) -> list[str]:
    keys = [*SPEC_FLAGS.values(), "train.grad_checkpoint", "train.compile"]
    return [f"--{key}={getattr(args, key)}" for key in keys if getattr(args, key, None) is not None]


def split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Unparsed arguments must all be --section.key=value overrides."""
    overrides = []
    for arg in extra:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
        else:
            parser.error(f"unrecognised argument {arg!r}; config overrides look like --train.lr=3e-4")
    return overrides


def apply_start_checkpoint(config: RunConfig, info=None) -> RunConfig:
    """Start from a checkpoint: fine-tuning (train.init_from) or resuming (train.resume_from).
    The model is the checkpoint's with the model keys the config names on top, the tokenizer is the
    checkpoint's unless data names one, and data.max_length its context unless set (longer is an
    error). Resuming also takes every data key the config does not name, so a resume needs no config
    file; the trainer then refuses any named key that differs from the checkpoint's. "Names" means
    the keys of the config file and overrides (`RunConfig.given`); a RunConfig built in Python names none."""
    from ..config import DataConfig, ModelConfig
    from .checkpoint import latest_checkpoint, read_checkpoint_config, resolve_checkpoint
    from .distributed import DistInfo, broadcast_object
    from .trainer import INIT_AND_RESUME, LATEST_NEEDS_DIR

    train = config.train
    if train.init_from and train.resume_from:
        raise ConfigError(INIT_AND_RESUME)
    if train.resume_from == "latest" and not train.checkpoint_dir:
        raise ConfigError(LATEST_NEEDS_DIR)
    source = train.init_from or train.resume_from
    if not source:
        return config
    if source == "latest":  # rank 0 chooses, so that every rank starts from the same checkpoint
        main = info is None or info.is_main
        source = broadcast_object(str(latest_checkpoint(train.checkpoint_dir)) if main else None, info or DistInfo())
    source = str(resolve_checkpoint(source))
    start = read_checkpoint_config(source)
    model = _overlay(ModelConfig, start.model, config.model, config.given)
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
    return dataclasses.replace(config, model=model, data=data)


def _overlay(section, theirs, mine, given: frozenset[str]):
    """`theirs` (a config section) with the keys of `mine` that `given` names."""
    named = {f.name: getattr(mine, f.name) for f in dataclasses.fields(section) if f"{section.section}.{f.name}" in given}
    return section(**{**theirs.to_dict(), **named})


def resolve_run_config(config: RunConfig, info=None) -> RunConfig:
    """Fill defaults that depend on the run: the start checkpoint's model and tokenizer (apply_start_checkpoint), the
    run directory (rank 0's, on every rank), the data cache inside it (one per rank: ranks tokenise
    side by side), and the byte tokenizer for the byte-level bases when the tokenizer is left on auto."""
    from ..models import BYTE_BASES
    from .distributed import DistInfo, broadcast_object
    from .trainer import new_run_dir

    info = info or DistInfo()
    config = apply_start_checkpoint(config, info)
    train, data, model = config.train, config.data, config.model
    if model.base in BYTE_BASES and data.tokenizer == "auto" and not (data.tokenizer_model_path or data.path):
        data = dataclasses.replace(data, tokenizer="byte")
    if train.checkpoint_dir is None:
        run_dir = str(new_run_dir()) if info.is_main else None
        train = dataclasses.replace(train, checkpoint_dir=broadcast_object(run_dir, info))
    if data.cache_dir is None:
        suffix = f"/rank_{info.rank}" if info.active else ""
        data = dataclasses.replace(data, cache_dir=f"{train.checkpoint_dir}/data{suffix}")
    return dataclasses.replace(config, model=model, train=train, data=data)


def run_train(config: RunConfig, manifest: str | None = None, out_ckpt: str | None = None) -> dict:
    from ..api import psannLM, psannLMDataPrep
    from .distributed import init_distributed, teardown
    from .trainer import remove_if_unused, resolve_device

    info = init_distributed(resolve_device(config.train.device).type)  # torchrun: join the group first
    lock = None
    try:
        config = resolve_run_config(config, info)
        run_dir = Path(config.train.checkpoint_dir)
        created = not run_dir.exists()
        # locked before the data cache inside it is written; the trainer's own lock nests in this one
        lock = DirectoryLock(run_dir, "training run").acquire() if info.is_main else None
        try:
            if manifest:
                config = build_from_manifest(config, manifest, info)
            dp = psannLMDataPrep.from_config(config.data, objective=config.model.objective)
            lm = psannLM(**config.model.to_dict())
            lm.generate_config = config.generate
            lm.fit(dp, **config.train.to_dict())
        except BaseException:
            if lock is not None and created:
                remove_if_unused(run_dir)  # before the lock goes: no other run may start in it meanwhile
            raise
        if out_ckpt and info.is_main:
            psannLM.load(lm.last_run["final_checkpoint"]).save(out_ckpt)
            lm.last_run["out_ckpt"] = out_ckpt
        return lm.last_run
    finally:
        if lock is not None:
            lock.release()
        teardown(info)


def build_from_manifest(config: RunConfig, manifest: str, info) -> RunConfig:
    """--data-manifest: train on the listed text files; with a tokenizer given, build them into
    token shards first (rank 0 builds, resumably; the others wait)."""
    from ..data.sources import resolve_inputs
    from .distributed import barrier

    data = config.data
    if not data.tokenizer_model_path:
        files = [str(f) for f in resolve_inputs([], [manifest])]
        return dataclasses.replace(config, data=dataclasses.replace(data, train_files=files))
    from ..data.build import INDEX_FILE, BuildConfig, build_dataset

    out = f"{config.train.checkpoint_dir}/data"
    if info.is_main and not os.path.exists(os.path.join(out, INDEX_FILE)):
        build_dataset(BuildConfig(inputs=[], manifests=[manifest], tokenizer=data.tokenizer_model_path, out=out,
                                  separator=data.doc_separator or "eot", progress=True))
    barrier(info)
    built = dataclasses.replace(data, path=out, tokenizer_model_path=None, tokenizer="auto", doc_separator=None)
    return dataclasses.replace(config, data=built)


def main(argv: list[str] | None = None, prog: str = "python -m psann.lm.train.cli") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Train a psann-lm model from a config file.")
    add_config_args(parser)
    add_spec_args(parser)
    args, extra = parser.parse_known_args(argv)
    try:
        config = apply_start_checkpoint(load_config(args.config, [*spec_overrides(args), *split_overrides(extra, parser)]))
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        if args.dry_run:
            from .dry_run import describe, plan_run

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            plan = plan_run(config, world_size=world, gpus_per_node=args.gpus_per_node, gpu=args.gpu, mfu=args.mfu)
            print(describe(plan))
            print(json.dumps(plan))
            return 0
        summary = run_train(config, manifest=args.data_manifest, out_ckpt=args.out_ckpt)
    except PsannError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
