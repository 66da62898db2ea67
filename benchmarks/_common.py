"""Helpers shared by the benchmark scripts: machine description, compact JSON, preset arguments,
the TinyStories inputs in ../shared/data."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from psann.lm.report.system import cpu_model as cpu_name  # noqa: F401  (the benchmarks' JSON names the CPU)

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


def add_tinystories_args(p: argparse.ArgumentParser, valid_bytes: int | None = None) -> None:
    """--train and --valid (the TinyStories heads), and --valid-bytes when given a default."""
    p.add_argument("--train", default=str(TINYSTORIES / "tinystories_v1_train_head2MiB.txt"))
    p.add_argument("--valid", default=str(TINYSTORIES / "tinystories_v1_valid_head.txt"))
    if valid_bytes is not None:
        p.add_argument("--valid-bytes", type=int, default=valid_bytes, help="score this many bytes of the valid head")


def add_small_lm_args(p: argparse.ArgumentParser) -> None:
    """The size of the TinyStories BPE models the base and objective comparisons train."""
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)


def require_inputs(args: argparse.Namespace) -> None:
    for path in (args.train, args.valid):
        if not Path(path).exists():
            sys.exit(f"missing {path}: this benchmark reads TinyStories from ../shared/data/tinystories")


def validation_head(args: argparse.Namespace, directory: str) -> tuple[str, list[str]]:
    """The whole stories (blank-line separated) in the first --valid-bytes of --valid, written to
    directory/valid.txt -> (that path, the stories)."""
    text = Path(args.valid).read_bytes()[:args.valid_bytes].decode("utf-8", errors="ignore")
    stories = [d.strip() for d in text.split("\n\n") if d.strip()]
    path = Path(directory) / "valid.txt"
    path.write_text("\n\n".join(stories), encoding="utf-8")
    return str(path), stories


def to_json(obj) -> str:
    """Indented JSON with lists of plain values kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def preset_parser(description: str, presets: dict[str, dict]) -> argparse.ArgumentParser:
    """--preset plus one integer override per preset key, --tied, --threads and --seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(presets), default="default")
    for name in presets["default"]:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help="overrides the preset")
    p.add_argument("--tied", action="store_true", help="tie the embedding and output head (default: untied)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p


def apply_preset(args: argparse.Namespace, presets: dict[str, dict]) -> argparse.Namespace:
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
