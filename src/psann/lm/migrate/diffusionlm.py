"""The diffusionlm console scripts on psann-lm: `diffusionlm-train`, `-train-ddp`, `-infer`,
`-make-data` and `-train-tokenizer`, each driven by its TOML layout (examples/diffusionlm/*.toml).

Each TOML key is translated onto a psann-lm config key or command flag and every key is
honoured or refused: an unknown key stops with the list of known ones. `--print-config` prints
the TOML as read, with its defaults, beside the psann-lm config it becomes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import tomllib
from pathlib import Path

from ..config import RunConfig
from ..console import SuggestingParser
from ..errors import ConfigError, did_you_mean
from . import guarded

log = logging.getLogger("psann.lm")

# section -> key -> (psann-lm key or None when the translation below handles it, default)
TRAIN_LAYOUT = {
    "model": {"vocab_size": ("model.vocab_size", None), "context_length": ("data.max_length", 256),
              "d_model": ("model.d_model", 512), "num_layers": ("model.n_layers", 4), "num_heads": ("model.n_heads", 16),
              "d_ff": ("model.d_mlp", 1344), "rope_theta": ("model.rope_theta", 10000.0), "device": ("train.device", "auto"),
              "dtype": (None, "float32"), "mask_token_id": ("model.mask_token_id", None),
              "noise_epsilon": ("model.noise_epsilon", 1e-3), "random_trunc_prob": ("model.random_trunc_prob", 0.01)},
    "optimizer": {"lr": ("train.lr", 3e-4), "min_lr": ("train.min_lr", None), "warmup_iters": ("train.warmup_steps", None),
                  "weight_decay": ("train.weight_decay", 0.1), "betas": ("train.betas", [0.9, 0.95]),
                  "grad_clip": ("train.grad_clip", 1.0)},
    "training": {"batch_size": (None, 32), "max_iters": ("train.max_steps", 1000),
                 "eval_interval": ("train.eval_interval_steps", 200), "eval_iters": ("train.eval_batches", None),
                 "save_interval": ("train.save_interval_steps", 0), "seed": ("train.seed", 1337),
                 "out_dir": ("train.checkpoint_dir", None)},
    "data": {"np_dat_train_path": (None, None), "total_train_tokens": (None, None), "np_dat_valid_path": (None, None),
             "total_val_tokens": (None, None), "tokenizer_dir": ("data.tokenizer_model_path", None)},
    "logging": {"backend": (None, "console"), "run_name": ("train.wandb_run_name", None),
                "architecture": (None, "TransformerLM"), "dataset": (None, None), "log_norms": ("train.log_norms", False)},
    "wandb": {"entity": ("train.wandb_entity", None), "project": ("train.wandb_project", "psann-lm"),
              "artifacts": ("train.wandb_artifacts", True)},
    "ddp": {"backend": (None, None), "optimizer_state_sharding": (None, True)},
}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
INFER_LAYOUT = {
    "inference": {"checkpoint": (None, None), "prompt": (None, ""), "steps": (None, None), "gen_length": (None, 64),
                  "block_length": (None, None), "temperature": (None, 0.0), "mask_id": (None, None), "seed": (None, None),
                  "top_p": (None, None)},
    "model": {"device": (None, "cpu")},
}
MAKE_DATA_LAYOUT = {"data": {"input_path": (None, None), "output_path": (None, None), "tokenizer_dir": (None, None),
                             "vocab_path": (None, None), "merges_path": (None, None)}}
TOKENIZER_LAYOUT = {"tokenizer": {"input_path": (None, None), "vocab_size": (None, None),
                                  "special_tokens": (None, ["<|endoftext|>"]), "output_dir": (None, None)}}


def read_layout(path: str, layout: dict, *, only: tuple[str, ...] = ()) -> dict:
    """The TOML at `path` as {section: {key: value}} with every default filled in; an unknown
    section or key, or a missing required one (default None where `only` names it), is a ConfigError."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} not found; start from the examples in examples/diffusionlm/.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    values = {}
    for section, table in raw.items():
        if section not in layout or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}].{did_you_mean(section, layout)} "
                              f"Sections: {', '.join(f'[{s}]' for s in layout)}.")
        for key in table:
            if key not in layout[section]:
                raise ConfigError(f"{path}: unknown key [{section}].{key}.{did_you_mean(key, layout[section])} "
                                  f"Keys of [{section}]: {', '.join(layout[section])}.")
    for section, keys in layout.items():
        values[section] = {key: raw.get(section, {}).get(key, default) for key, (_, default) in keys.items()}
    for dotted in only:
        section, key = dotted.split(".")
        if values[section][key] is None:
            raise ConfigError(f"{path}: [{section}].{key} is required.")
    return values


def _count_tokens(path: str, vocab_size: int) -> int:
    from ..data.prepare import read_token_array  # lazy: torch (data.prepare reads shards)

    return int(read_token_array(path, vocab_size).shape[0])


def run_config(path: str, values: dict, *, ddp: bool = False) -> RunConfig:
    """The psann-lm run config a train.toml describes (masked diffusion, as diffusionlm trains)."""
    sections: dict[str, dict] = {"model": {"objective": "diffusion"}, "data": {}, "train": {}}
    wandb = values["logging"]["backend"] == "wandb"  # [wandb] and run_name name a W&B run: only with that backend
    for section, keys in TRAIN_LAYOUT.items():
        for key, (target, _) in keys.items():
            if target and values[section][key] not in (None, "") and (wandb or not target.startswith("train.wandb_")):
                name, field = target.split(".")
                sections[name][field] = values[section][key]
    model, data, training, logging_ = values["model"], values["data"], values["training"], values["logging"]
    if model["dtype"] not in DTYPES:
        raise ConfigError(f"{path}: [model].dtype must be one of {', '.join(DTYPES)}, got {model['dtype']!r}.")
    sections["train"]["amp"] = DTYPES[model["dtype"]]
    if not data["np_dat_train_path"]:
        raise ConfigError(f"{path}: [data].np_dat_train_path is required (make one with diffusionlm-make-data).")
    sections["data"]["train_token_files"] = [data["np_dat_train_path"]]
    if data["np_dat_valid_path"]:
        sections["data"]["val_token_files"] = [data["np_dat_valid_path"]]
    sections["train"]["batch_tokens"] = int(training["batch_size"]) * int(model["context_length"])
    if logging_["backend"] not in ("console", "wandb"):
        raise ConfigError(f"{path}: [logging].backend must be console or wandb, got {logging_['backend']!r}.")
    # console: JSON lines on stdout (`| jq`), as diffusionlm's console logger printed them
    sections["train"]["loggers"] = ["json", "jsonl", "csv"] + (["wandb"] if logging_["backend"] == "wandb" else [])
    # diffusionlm trained with AdamW on a cosine schedule (psann-lm's defaults are Muon and wsd)
    sections["train"]["optimizer"] = "zero_adamw" if ddp and values["ddp"]["optimizer_state_sharding"] else "adamw"
    sections["train"]["lr_schedule"] = "cosine"
    config = RunConfig.from_dict(sections)
    _check_backend(path, values["ddp"]["backend"], config.train.device)
    return config


def _check_backend(path: str, backend: str | None, device: str) -> None:
    """torch.distributed runs NCCL on CUDA and gloo on CPU; the TOML must say the same."""
    if backend is None:
        return
    wanted = "nccl" if device.startswith("cuda") else "gloo" if device == "cpu" else None
    if backend not in ("nccl", "gloo") or (wanted and backend != wanted):
        raise ConfigError(f"{path}: [ddp].backend={backend!r} with [model].device={device!r}; use "
                          f"{wanted or 'nccl (CUDA) or gloo (CPU)'}.")


def _check_totals(path: str, values: dict, config: RunConfig) -> None:
    """total_train_tokens / total_val_tokens, when given, must be the memmaps' lengths."""
    from ..tokenizers import build_tokenizer  # lazy: as in _count_tokens
    from ..data.tokens import token_array_tokenizer

    data = values["data"]
    for file_key, total_key in (("np_dat_train_path", "total_train_tokens"), ("np_dat_valid_path", "total_val_tokens")):
        if data[total_key] is None or not data[file_key]:
            continue
        source = config.data.tokenizer_model_path or token_array_tokenizer(data[file_key])
        if not Path(source).exists():
            return  # preparing the data names the missing tokenizer
        _check_totals_of(path, data[file_key], data[total_key], build_tokenizer("auto", model_path=source).vocab_size,
                         total_key)


def _check_totals_of(path: str, file: str, total: int | None, vocab_size: int, key: str = "total_val_tokens") -> None:
    if total is None:
        return
    n = _count_tokens(file, vocab_size)
    if n != int(total):
        raise ConfigError(f"{path}: [data].{key}={total} but {file} holds {n} tokens; set {key} = {n}.")


def check_mask_id(path: str, inference: dict, lm) -> None:
    if inference["mask_id"] is not None and inference["mask_id"] != lm.model_config.mask_token_id:
        raise ConfigError(f"{path}: [inference].mask_id={inference['mask_id']} but {inference['checkpoint']} was trained "
                          f"with mask token {lm.model_config.mask_token_id}; set mask_id to that or remove it.")


def generate_options(inference: dict) -> dict:
    """An [inference] table as psann-lm generation options."""
    options = {"max_new_tokens": inference["gen_length"], "temperature": inference["temperature"]}
    options.update({k: inference[k] for k in ("steps", "block_length", "seed", "top_p") if inference[k] is not None})
    return options


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    parser = SuggestingParser(prog=prog, description=f"{what} (the diffusionlm command on psann-lm).")
    parser.add_argument("--config", required=True, help="the TOML file (see examples/diffusionlm/)")
    parser.add_argument("--print-config", action="store_true", help="print the TOML as read (with defaults) and the "
                        "psann-lm config it becomes, then exit")
    return parser


def _train_main(argv: list[str] | None, prog: str, ddp: bool) -> int:
    args = _parser(prog, "Train a masked diffusion LM from a TOML config").parse_args(argv)

    def run() -> int:
        values = read_layout(args.config, TRAIN_LAYOUT)
        config = run_config(args.config, values, ddp=ddp)
        if args.print_config:
            print(json.dumps({"toml": values, "psann": config.to_dict()}, indent=2, default=str))
            return 0
        labels = {k: values["logging"][k] for k in ("architecture", "dataset") if values["logging"][k]}
        if labels:
            log.info("diffusionlm labels (not part of the psann-lm config): %s", labels)
        _check_totals(args.config, values, config)
        from ..train.run import train  # lazy: torch

        summary = train(config).info
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=2))
        return 0
    return guarded(run)


def train_main(argv: list[str] | None = None) -> int:
    """diffusionlm-train --config train.toml [--print-config]"""
    return _train_main(argv, "diffusionlm-train", ddp=False)


def train_ddp_main(argv: list[str] | None = None) -> int:
    """diffusionlm-train-ddp --config train_ddp.toml, under torchrun: DDP with the AdamW state sharded
    across ranks unless [ddp].optimizer_state_sharding = false."""
    return _train_main(argv, "diffusionlm-train-ddp", ddp=True)


def infer_main(argv: list[str] | None = None) -> int:
    """diffusionlm-infer --config infer.toml: block diffusion sampling; one JSON line with params,
    text and metrics."""
    args = _parser("diffusionlm-infer", "Sample from a masked diffusion checkpoint").parse_args(argv)

    def run() -> int:
        values = read_layout(args.config, INFER_LAYOUT, only=("inference.checkpoint",))
        inf = values["inference"]
        options = generate_options(inf)
        if args.print_config:
            print(json.dumps({"toml": values, "psann": {"checkpoint": inf["checkpoint"], "generate": options}}, indent=2))
            return 0
        from .. import psannLM  # lazy: torch

        lm = psannLM.load(inf["checkpoint"], device=values["model"]["device"])
        check_mask_id(args.config, inf, lm)
        start = time.perf_counter()
        output = lm.generate(inf["prompt"], **options)
        latency = (time.perf_counter() - start) * 1000
        settings = lm.generation_settings(**options)
        print(json.dumps({"params": {"temperature": settings.temperature, "p": settings.top_p,
                                     "eos_token_id": lm.tokenizer.eos_id, "steps": settings.steps,
                                     "gen_length": settings.max_new_tokens, "block_length": settings.block_length,
                                     "mask_id": lm.model_config.mask_token_id},
                          "text": {"prompt": inf["prompt"], "output": output},
                          "metrics": {"latency_ms": round(latency, 2)}}))
        return 0
    return guarded(run)


def make_data_main(argv: list[str] | None = None) -> int:
    """diffusionlm-make-data --config make_data.toml: text -> a raw memmap of token ids (uint16 when
    the vocabulary fits) with the tokenizer saved beside it; prints the token count."""
    args = _parser("diffusionlm-make-data", "Encode text into a memmap of token ids").parse_args(argv)

    def run() -> int:
        data = read_layout(args.config, MAKE_DATA_LAYOUT, only=("data.input_path", "data.output_path"))["data"]
        argv = ["tokenizer", "encode", "--input", data["input_path"], "--output", data["output_path"]]
        if data["tokenizer_dir"]:
            argv += ["--tokenizer", data["tokenizer_dir"]]
        if bool(data["vocab_path"]) != bool(data["merges_path"]):
            raise ConfigError(f"{args.config}: [data].vocab_path and merges_path go together; give both.")
        if data["vocab_path"]:
            argv += ["--vocab", data["vocab_path"], "--merges", data["merges_path"]]
        return _psannlm(argv, args.print_config, data)
    return guarded(run)


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    """diffusionlm-train-tokenizer --config train_tokenizer.toml: byte-level BPE -> vocab.json, merges.txt."""
    args = _parser("diffusionlm-train-tokenizer", "Train a byte-level BPE tokenizer").parse_args(argv)

    def run() -> int:
        tok = read_layout(args.config, TOKENIZER_LAYOUT,
                          only=("tokenizer.input_path", "tokenizer.vocab_size", "tokenizer.output_dir"))["tokenizer"]
        inputs = tok["input_path"] if isinstance(tok["input_path"], list) else [tok["input_path"]]
        argv = ["tokenizer", "train", "--input", *inputs, "--vocab-size", str(tok["vocab_size"]), "--out", tok["output_dir"]]
        for special in tok["special_tokens"]:
            argv += ["--special-token", special]
        return _psannlm(argv, args.print_config, tok)
    return guarded(run)


def _psannlm(argv: list[str], print_config: bool, values: dict) -> int:
    from psann.cli import main  # lazy: the command layer above, reached only when a script runs

    if print_config:
        print(json.dumps({"toml": values, "psannlm": argv}, indent=2))
        return 0
    return main(argv)
