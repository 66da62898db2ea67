"""Reading a run's metrics.jsonl back, and the loss-curve plot drawn from it (the writers are in loggers.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import DataError

log = logging.getLogger("psann.lm")


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl -> records, naming the file and line of a bad line."""
    path = Path(jsonl_path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}); the run may have been cut off while "
                            "writing: delete that line and try again.") from exc
    return records


def plot_loss_curve(jsonl_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Train and validation loss against step; returns None (with a notice) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("loss curve skipped: matplotlib is not installed (pip install 'psann-lm[viz]').")
        return None
    records = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
