"""`psannlm train` / `python -m psann.lm.train.cli`: train from a YAML/TOML/JSON config plus overrides.

    python -m psann.lm.train.cli --config examples/lm/configs/waveresnet_cpu.yaml --train.lr=3e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..config import RunConfig, dump_config, load_config
from ..errors import PsannError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML, TOML or JSON file with sections model/data/train/generate")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.epilog = ("Any config key can be overridden as --section.key=value, e.g. --train.lr=3e-4 "
                     "--model.n_layers=4 --data.train_files=[a.txt,b.txt].")


def split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Unparsed arguments must all be --section.key=value overrides."""
    overrides = []
    for arg in extra:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
        else:
            parser.error(f"unrecognised argument {arg!r}; config overrides look like --train.lr=3e-4")
    return overrides


def resolve_run_config(config: RunConfig) -> RunConfig:
    """Fill defaults that depend on the run: run directory, and the data cache inside it."""
    from .trainer import new_run_dir

    train, data = config.train, config.data
    if train.checkpoint_dir is None:
        train = dataclasses.replace(train, checkpoint_dir=str(new_run_dir()))
    if data.cache_dir is None:
        data = dataclasses.replace(data, cache_dir=f"{train.checkpoint_dir}/data")
    return dataclasses.replace(config, train=train, data=data)


def run_train(config: RunConfig) -> dict:
    from ..api import psannLM, psannLMDataPrep

    config = resolve_run_config(config)
    dp = psannLMDataPrep.from_config(config.data)
    lm = psannLM(**config.model.to_dict())
    lm.generate_config = config.generate
    lm.fit(dp, **config.train.to_dict())
    return lm.last_run


def main(argv: list[str] | None = None, prog: str = "python -m psann.lm.train.cli") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Train a psann-lm model from a config file.")
    add_config_args(parser)
    args, extra = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, split_overrides(extra, parser))
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        summary = run_train(config)
    except PsannError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
