"""Reading a run's metrics.jsonl back, and the loss-curve plot drawn from it (the writers are in loggers.py)."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

from ..files import jsonl_rows

log = logging.getLogger("psann.lm")


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl -> records, naming the file and line of a bad line."""
    path = Path(jsonl_path)
    hint = "the run may have been cut off while writing: delete that line and try again."
    return [record for _, record in jsonl_rows(path.read_text(encoding="utf-8").splitlines(), path, hint)]


def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize_metrics(records: list[dict]) -> dict:
    """The figures a run is compared by. tok/s and MFU are medians over the logged windows after
    the first (which holds the warm-up); peak memory is the largest logged."""
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val" and r.get("val_loss") is not None]
    timed = train[1:] or train
    last = train[-1] if train else {}
    return {"steps": last.get("step"), "tokens": last.get("tokens"), "train_loss": last.get("loss"),
            "val_loss": val[-1]["val_loss"] if val else None, "val_ppl": val[-1].get("val_ppl") if val else None,
            "best_val_loss": min(r["val_loss"] for r in val) if val else None,
            "tok_per_s": median_of(timed, "tok_per_s"), "mfu": median_of(timed, "mfu"),
            "peak_mem_gb": max((r["peak_mem_gb"] for r in train if r.get("peak_mem_gb") is not None), default=None)}


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
