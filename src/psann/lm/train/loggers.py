"""Where training metrics go: console lines, metrics.jsonl, metrics.csv, TensorBoard, Weights & Biases.

A record is the dict the trainer logs: `kind` (train, val), `step` and the metrics. Every backend
takes records through `log(record)` and is closed once with `close()`; `open_loggers` builds the
chosen ones behind one fan-out, which is empty (writes nothing) on ranks other than 0.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..config import check_logger_names
from ..errors import ConfigError
from ..files import write_atomic

log = logging.getLogger("psann.lm")
OPTIONAL = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # logger -> module its extra installs


def scalars(record: dict) -> dict[str, int | float]:
    """The numeric metrics of a record: kind and step are its coordinates, and strings or None
    (e.g. mfu without a known peak) have no place on a curve."""
    return {k: v for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _optional(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"train.loggers includes {extra}, which needs a package that is not installed ({exc}); "
                          f"pip install 'psann-lm[{extra}]' or remove {extra} from train.loggers.") from exc


class ConsoleLogger:
    """One line per record on stderr; tqdm.write keeps a running progress bar below the lines."""

    HIDDEN = ("epoch", "tokens", "elapsed_s", "tflops_per_device", "val_tokens")  # in the files; too much for a line

    def log(self, record: dict) -> None:
        values = ", ".join(f"{k} {v:.1%}" if k == "mfu" else f"{k} {_short(v)}"
                           for k, v in scalars(record).items() if k not in self.HIDDEN)
        tqdm.write(f"{record.get('kind')} step {record.get('step')}: {values}", file=sys.stderr)

    def close(self) -> None:
        pass


class JsonConsoleLogger:
    """Each record as one JSON line on stdout, {"kind", "step", "metrics": {...}}: the diffusionlm
    console format (its name for the gradient norm, grad_l2_norm, beside ours), for `jq`."""

    def log(self, record: dict) -> None:
        metrics = scalars(record)
        if "grad_norm" in metrics:
            metrics["grad_l2_norm"] = metrics["grad_norm"]
        metrics.pop("step", None)
        print(json.dumps({"kind": record.get("kind"), "step": record.get("step"), "metrics": metrics}), flush=True)

    def close(self) -> None:
        pass


def _short(value: int | float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _after(resume_step: int | None, step) -> bool:
    """A record of a step after the resumed one: a resumed run replays those steps, so they go."""
    try:
        return resume_step is not None and int(step) > resume_step
    except (TypeError, ValueError):
        return False


class JsonlLogger:
    """metrics.jsonl, one JSON object per record; a run resumed at step s first drops the records
    after s (they are replayed), so each step appears once. The loss plot reads it."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                step = _step_of(line)
                if step is None:  # a line cut by the crash the run resumes from
                    log.warning("%s: dropping a damaged line (%r) before resuming.", self.path, line[:80])
                elif not _after(resume_step, step):
                    kept.append(line + "\n")
            write_atomic(self.path, "".join(kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str):
    try:
        return json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None


class CsvLogger:
    """metrics.csv, one row per record and one column per key ever logged, in order of first
    appearance. A key first seen mid-run (validation metrics, a model's auxiliary losses) rewrites
    the file with the wider header, keeping every earlier row; resumed runs drop the rows after the
    resumed step and append under the same header."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.fields = self._header()
        if resume_step is not None and self.fields:
            self._rewrite([r for r in self._rows() if not _after(resume_step, r.get("step"))])

    def _header(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh), [])

    def log(self, record: dict) -> None:
        new = [k for k in record if k not in self.fields]
        if new:
            self._widen(new)
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            csv.DictWriter(fh, self.fields).writerow(record)

    def _widen(self, new: list[str]) -> None:
        rows = self._rows() if self.fields else []
        self.fields = self.fields + new
        self._rewrite(rows)

    def _rows(self) -> list[dict]:
        with open(self.path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.fields)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, buffer.getvalue())

    def close(self) -> None:
        pass  # every row is written through a file opened and closed for it


class TensorBoardLogger:
    """Scalars tagged `kind/name` (train/loss, val/val_loss) against the step, in <run_dir>/tensorboard."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        writer_class = _optional(OPTIONAL["tensorboard"], "tensorboard").SummaryWriter
        # purge_step hides the events after the resumed step, which the resumed run writes again
        purge = None if resume_step is None else resume_step + 1
        self._writer = writer_class(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self._writer.add_scalar(f"{record.get('kind')}/{name}", value, record.get("step"))
        self._writer.flush()  # a watching TensorBoard sees each interval; a crash loses nothing

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A W&B run with the run config as its config and scalars keyed `kind/name` by step. Offline
    mode keeps everything in <run_dir>/wandb (no network); `wandb sync` uploads it later."""

    def __init__(self, run_dir: str | os.PathLike, project: str, name: str | None, mode: str, config: dict | None,
                 entity: str | None = None):
        wandb = _optional(OPTIONAL["wandb"], "wandb")
        self._run = wandb.init(project=project, entity=entity, name=name or Path(run_dir).resolve().name, mode=mode,
                               dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        kind = record.get("kind")
        self._run.log({f"{kind}/{k}": v for k, v in scalars(record).items()}, step=record.get("step"))

    def log_artifacts(self, checkpoints: dict[str, Path]) -> None:
        """Each checkpoint as a version of one `model` artifact, aliased by its name (final last, so
        W&B's `latest` is the final one), and the tokenizer files once as a `tokenizer` artifact."""
        wandb, name = _optional(OPTIONAL["wandb"], "wandb"), self._run.name
        for alias, directory in sorted(checkpoints.items(), key=lambda item: item[0] == "final"):
            artifact = wandb.Artifact(f"{name}-model", type="model", metadata={"checkpoint": alias})
            artifact.add_dir(str(directory))
            self._run.log_artifact(artifact, aliases=[alias])
        tokenizer = next(iter(checkpoints.values())) / "tokenizer"
        artifact = wandb.Artifact(f"{name}-tokenizer", type="tokenizer")
        artifact.add_dir(str(tokenizer))
        self._run.log_artifact(artifact)

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """Fan-out: every record goes to each chosen backend in turn."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, record: dict) -> None:
        for backend in self.backends:
            backend.log(record)

    def log_artifacts(self, checkpoints: dict[str, Path]) -> None:
        for backend in self.backends:
            if hasattr(backend, "log_artifacts"):
                backend.log_artifacts(checkpoints)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_loggers(names: Iterable[str], run_dir: str | os.PathLike, *, is_main: bool = True, run_config: dict | None = None,
                 wandb_project: str = "psann-lm", wandb_run_name: str | None = None, wandb_mode: str = "offline",
                 wandb_entity: str | None = None, resume_step: int | None = None) -> Loggers:
    """The backends `names` (from LOGGERS) writing into `run_dir`; a no-op fan-out unless `is_main`.
    `resume_step`: the run continues from that step, so the file backends drop what came after it.
    Every rank imports the optional packages first, so a missing one stops all ranks together
    instead of leaving the others waiting for rank 0."""
    names = list(dict.fromkeys(names))
    check_logger_names(names)
    for name in names:
        if name in OPTIONAL:
            _optional(OPTIONAL[name], name)
    if not is_main:
        return Loggers([])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    backends = []
    for name in names:
        if name == "console":
            backends.append(ConsoleLogger())
        elif name == "json":
            backends.append(JsonConsoleLogger())
        elif name == "jsonl":
            backends.append(JsonlLogger(run_dir, resume_step))
        elif name == "csv":
            backends.append(CsvLogger(run_dir, resume_step))
        elif name == "tensorboard":
            backends.append(TensorBoardLogger(run_dir, resume_step))
        else:
            backends.append(WandbLogger(run_dir, wandb_project, wandb_run_name, wandb_mode, run_config, wandb_entity))
    return Loggers(backends)
