"""Run metrics: one JSON line and one CSV row per record, and a loss-curve plot at the end."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("psann.lm")

CSV_FIELDS = ("kind", "step", "epoch", "tokens", "loss", "val_loss", "val_ppl", "lr", "grad_norm", "tok_per_s", "tflops_per_device", "mfu",
              "peak_mem_gb", "elapsed_s")


class MetricsLogger:
    """Appends to metrics.jsonl and metrics.csv in the run directory (resumed runs keep appending)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.csv_path = Path(run_dir) / "metrics.csv"
        new_csv = not self.csv_path.exists()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csv_file = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    def log(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
    with open(jsonl_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


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
