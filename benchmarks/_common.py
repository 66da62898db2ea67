"""Helpers shared by the benchmark scripts: machine description, compact JSON, preset arguments."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
