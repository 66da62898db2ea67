"""Offline lm-eval tasks over local JSONL files.

Two shipped templates under tasks/ hold the task formats: psann_mc.yaml (multiple choice,
{"query", "choices", "gold"} rows: acc, acc_norm, acc_bytes) and psann_ppl.yaml (perplexity,
{"text"} rows: word_perplexity, byte_perplexity, bits_per_byte). `write_task_dir` writes one small
task YAML per data file that includes its template and names the file, for lm-eval's
--include_path. lm-eval reads the files with the `datasets` json loader, which needs no network;
`offline_env` tells datasets and the hub client not to try.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError
from ..files import jsonl_rows

TEMPLATES = {"mc": Path(__file__).with_name("tasks") / "psann_mc.yaml",
             "ppl": Path(__file__).with_name("tasks") / "psann_ppl.yaml"}


def offline_env() -> None:
    """Keep datasets and huggingface_hub off the network (a user's explicit setting wins)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _check_mc(row: dict, where: str) -> None:
    choices = row.get("choices")
    if not isinstance(row.get("query"), str):
        raise DataError(f"{where}: 'query' must be a string.")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings.")
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1}), got {gold!r}.")


def _check_ppl(row: dict, where: str) -> None:
    if not isinstance(row.get("text"), str):
        raise DataError(f"{where}: each line needs a 'text' string.")


def read_jsonl(path: str | os.PathLike, kind: str) -> list[dict]:
    """The rows of a task file, checked: kind "mc" ({"query", "choices", "gold"}) or "ppl" ({"text"})."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a task data file (.jsonl).")
    if not path.is_file():
        raise DataError(f"task data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8.") from None
    check = {"mc": _check_mc, "ppl": _check_ppl}[kind]
    rows = []
    for number, row in jsonl_rows(text.splitlines(), path, "write one JSON object per line."):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: each line must be a JSON object.")
        check(row, where)
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def parse_task_file(spec: str) -> tuple[str, Path]:
    """"NAME=PATH" (or just PATH: the name is the file's stem) -> (task name, absolute path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    name = re.sub(r"\W", "_", name)
    if not name:
        raise ConfigError(f"task file {spec!r} needs a name: NAME=PATH.")
    return name, Path(path).expanduser().resolve()


def write_task_dir(directory: str | os.PathLike, files: dict[str, list[str]]) -> list[str]:
    """Write one task YAML per "NAME=PATH" spec in `files` ({"mc": [...], "ppl": [...]}) into
    `directory` (after checking every file); returns the task names."""
    directory = Path(directory)
    names: list[str] = []
    for kind, specs in files.items():
        for spec in specs:
            name, path = parse_task_file(spec)
            if name in names:
                raise ConfigError(f"two task files are both named {name!r}; name them: NAME=PATH.")
            read_jsonl(path, kind)
            task = {"include": str(TEMPLATES[kind]), "task": name,
                    "dataset_kwargs": {"data_files": {"test": str(path)}}}
            (directory / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
            names.append(name)
    return names
