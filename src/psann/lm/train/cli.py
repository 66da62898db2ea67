"""`psannlm train` / `python -m psann.lm.train.cli` / `scripts/train_psann_lm.py`: train from a
YAML/TOML/JSON config plus overrides, or from the original spec's flags; `--dry-run` prints the cost.

    python -m psann.lm.train.cli --config examples/lm/configs/waveresnet_cpu.yaml --train.lr=3e-4
    torchrun --nproc-per-node 8 scripts/train_psann_lm.py --config examples/lm/configs/psann_3b.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import RunConfig, config_keys_help, dump_config, load_config
from ..console import SuggestingParser, setup_logging
from ..data.cli import add_filter_args, filters_from_args
from ..data.sources import iter_documents_from, resolve_inputs
from ..data.text import resolve_separator
from ..tokenizers import build_tokenizer
from ..errors import ConfigError, PsannError
from ..tokenizers.hf import hub_file
from ..models import check_model_config
from .exports import copy_checkpoint, export_bundle, export_state_dict
from .dry_run import describe, plan_run
from .run import apply_start_checkpoint, train


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML, TOML or JSON file with sections model/data/train/generate")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = config_keys_help()


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


# The CS336-style train.py's flags (docs: "Migrating"): --train_data X.npy --val_data Y.npy --out_dir D
# --device cuda --batch_size 64 --max_iters 5000 --lr 5e-4 --wandb. --batch_size counts windows.
CS336_FLAGS = {
    "--train_data": "data.train_token_files", "--val_data": "data.val_token_files", "--tokenizer": "data.tokenizer_model_path",
    "--context_length": "data.max_length", "--out_dir": "train.checkpoint_dir", "--device": "train.device",
    "--max_iters": "train.max_steps", "--min_lr": "train.min_lr", "--warmup_iters": "train.warmup_steps",
    "--weight_decay": "train.weight_decay", "--eval_interval": "train.eval_interval_steps",
    "--eval_iters": "train.eval_batches", "--save_interval": "train.save_interval_steps",
    "--wandb_project": "train.wandb_project", "--wandb_run_name": "train.wandb_run_name", "--d_model": "model.d_model",
    "--num_layers": "model.n_layers", "--num_heads": "model.n_heads", "--d_ff": "model.d_mlp",
    "--rope_theta": "model.rope_theta",
}
LIST_KEYS = ("data.train_token_files", "data.val_token_files")
# The shape a CS336 user trains on TinyStories when no config file says otherwise.
CS336_MODEL = {"model.d_model": 512, "model.n_layers": 4, "model.n_heads": 16, "model.d_mlp": 1344, "data.max_length": 256}


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    for flag, key in SPEC_FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, metavar="V", help=f"= --{key}")
    cs336 = parser.add_argument_group("CS336-style flags (train on .npy token arrays)")
    for flag, key in CS336_FLAGS.items():
        cs336.add_argument(flag, dest=key, default=None, metavar="V", help=f"= --{key}")
    cs336.add_argument("--batch_size", type=int, default=None, metavar="N",
                       help="windows per step: = --train.batch_tokens=N*context_length")
    cs336.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline unless "
                       "--train.wandb_mode=online)")
    parser.add_argument("--grad-checkpoint", dest="train.grad_checkpoint", action="store_const", const="true",
                        help="= --train.grad_checkpoint=true")
    parser.add_argument("--compile", dest="train.compile", action="store_const", const="true", help="= --train.compile=true")
    parser.add_argument("--data-manifest", help="a file listing text files, one per line; with --tokenizer-model-path "
                        "they are built into token shards under <checkpoint-dir>/data first (resumable, flat memory)")
    parser.add_argument("--hf-tokenizer-repo", metavar="REPO", help="load the tokenizer from this Hugging Face repo "
                        "(through the local HF cache; offline, the cached copy)")
    parser.add_argument("--hf-tokenizer-filename", default="tokenizer.json", metavar="FILE",
                        help="the tokenizer file in --hf-tokenizer-repo (default tokenizer.json)")
    add_filter_args(parser.add_argument_group("--data-manifest filters (as psannlm data build; they need a "
                                              "tokenizer given: --tokenizer-model-path or --hf-tokenizer-repo)"))
    parser.add_argument("--preflight", action="store_true", help="before training, round-trip sample texts of the "
                        "data through the tokenizer and check its size against the model's vocab_size; stop loudly "
                        "on a mismatch")
    parser.add_argument("--out-ckpt", help="also write the final weights: a directory (weights, config, tokenizer), or "
                        "X.pt, a PyTorch file {model: state dict, config} that torch.load(weights_only=True) reads")
    parser.add_argument("--export-dir", help="also write an export bundle for a model hub: the final checkpoint plus "
                        "tokenizer.json/special_tokens_map.json (when the tokenizer has them), metadata.json and a "
                        "README.md model card")
    parser.add_argument("--dry-run", action="store_true", help="print parameters, per-GPU memory, FLOPs/token and time "
                        "to the token budget, then exit (touches no GPU)")
    parser.add_argument("--world-size", type=int, default=None, help="dry run: number of GPUs (default: WORLD_SIZE or 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="dry run: GPUs per node (for fsdp=hybrid)")
    parser.add_argument("--gpu", default="H100", help="dry run: GPU model of the peak-FLOP/s table (default H100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="dry run: assumed model FLOPs utilisation (default 0.4)")


def spec_overrides(args: argparse.Namespace) -> list[str]:
    keys = [*SPEC_FLAGS.values(), *CS336_FLAGS.values(), "train.grad_checkpoint", "train.compile"]
    given = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    if getattr(args, "hf_tokenizer_repo", None):
        if given.get("data.tokenizer_model_path"):
            raise ConfigError("--hf-tokenizer-repo and --tokenizer-model-path both name the tokenizer; keep one.")
        given["data.tokenizer_model_path"] = hub_file(args.hf_tokenizer_repo, args.hf_tokenizer_filename)
    if given.get("data.train_token_files") and not args.config:
        given = {**CS336_MODEL, **given}
    return [f"--{key}=[{value}]" if key in LIST_KEYS else f"--{key}={value}" for key, value in given.items()]


def load_with_windows(path: str | None, overrides: list[str], windows: int | None) -> RunConfig:
    """load_config, with train.batch_tokens = `windows` (per step) x the context length the run will
    have: the config's data.max_length, or the resumed checkpoint's."""
    config = load_config(path, overrides)
    if windows is None:
        return config
    length = apply_start_checkpoint(config).data.max_length
    return load_config(path, [*overrides, f"--train.batch_tokens={windows * length}"])


def load_run_config(args: argparse.Namespace, overrides: list[str]):
    """The config file with the flags and overrides on top; --batch_size and --wandb are read
    against the resolved context length and loggers."""
    overrides = [*spec_overrides(args), *overrides]
    if getattr(args, "wandb", False):
        loggers = load_config(args.config, overrides).train.loggers
        if "wandb" not in loggers:
            overrides.append(f"--train.loggers=[{','.join([*loggers, 'wandb'])}]")
    return load_with_windows(args.config, overrides, getattr(args, "batch_size", None))


def split_overrides(extra: list[str], parser: SuggestingParser) -> list[str]:
    """Unparsed arguments must all be config overrides: --section.key=value or --section.key value."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not (arg.startswith("--") and "." in arg.split("=", 1)[0]):
            parser.error(f"unrecognised argument {arg!r}; config overrides look like --train.lr=3e-4 or "
                         f"--train.lr 3e-4.{parser.suggest_flags([arg])}")
        if "=" not in arg and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            arg, i = f"{arg}={extra[i + 1]}", i + 1  # the jsonargparse / LitGPT spelling
        overrides.append(arg)
        i += 1
    return overrides


def preflight(config: RunConfig, manifest: str | None, n_samples: int = 8) -> dict:
    """Fail before any data is built or any GPU hour spent: the first documents of the data must
    round-trip through the tokenizer (decode(encode(text)) == text), and the model's vocab_size,
    when set, must cover the tokenizer's ids."""
    data = config.data
    if not data.tokenizer_model_path:
        raise ConfigError("--preflight checks a given tokenizer: pass --tokenizer-model-path or --hf-tokenizer-repo.")
    tok = build_tokenizer(data.tokenizer, model_path=data.tokenizer_model_path)
    files = resolve_inputs(list(data.train_files), [manifest] if manifest else [])
    docs = []
    for _, doc in iter_documents_from(files, separator=resolve_separator(data.doc_separator or "eot")):
        docs.append(doc[:2000])
        if len(docs) == n_samples:
            break
    broken = [d for d in docs if tok.decode(tok.encode(d)) != d]
    if not docs:
        raise ConfigError("--preflight found no text in the data to check.")
    if broken:
        raise ConfigError(f"--preflight: {len(broken)} of {len(docs)} sample texts do not survive encode -> decode "
                          f"with {data.tokenizer_model_path}, e.g. {broken[0][:80]!r} -> "
                          f"{tok.decode(tok.encode(broken[0]))[:80]!r}; the model would learn other text than given.")
    if config.model.vocab_size is not None and config.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"--preflight: model.vocab_size={config.model.vocab_size} (the lm_head) is smaller than the "
                          f"tokenizer's {tok.vocab_size} ids.")
    return {"samples": len(docs), "round_trip": "ok", "tokenizer_vocab": tok.vocab_size,
            "model_vocab": config.model.vocab_size or tok.vocab_size}


def main(argv: list[str] | None = None, prog: str = "python -m psann.lm.train.cli") -> int:
    setup_logging()
    parser = SuggestingParser(prog=prog, description="Train a psann-lm model from a config file.")
    add_config_args(parser)
    add_spec_args(parser)
    args, extra = parser.parse_known_args(argv)
    try:
        config = load_run_config(args, split_overrides(extra, parser))
        if args.print_config:
            config = apply_start_checkpoint(config)
            check_model_config(config.model)
            print(dump_config(config), end="")
            return 0
        if args.dry_run:
            config = apply_start_checkpoint(config)
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            plan = plan_run(config, world_size=world, gpus_per_node=args.gpus_per_node, gpu=args.gpu, mfu=args.mfu)
            print(describe(plan))
            print(json.dumps(plan))
            return 0
        filters = filters_from_args(args)
        if filters.applied() and not (args.data_manifest and config.data.tokenizer_model_path):
            raise ConfigError("the filters run while --data-manifest is built into token shards, which needs the "
                              "tokenizer given (--tokenizer-model-path or --hf-tokenizer-repo); or build with "
                              "`psannlm data build` and train on --data-path.")
        if args.preflight:
            print(json.dumps({"preflight": preflight(config, args.data_manifest)}), flush=True)
        summary = train(config, manifest=args.data_manifest, filters=filters).info
        if args.out_ckpt and int(os.environ.get("RANK", "0")) == 0:
            export = export_state_dict if args.out_ckpt.endswith(".pt") else copy_checkpoint
            summary["out_ckpt"] = str(export(summary["final_checkpoint"], args.out_ckpt))
        if args.export_dir and int(os.environ.get("RANK", "0")) == 0:
            summary["export_dir"] = str(export_bundle(summary["final_checkpoint"], args.export_dir))
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
