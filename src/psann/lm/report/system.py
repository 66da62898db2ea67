"""What a benchmark ran on: versions, device, CPU and the git commit (system.json)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("psann-lm", "torch", "numpy", "tokenizers", "tiktoken", "safetensors", "matplotlib", "transformers")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | os.PathLike | None = None) -> dict | None:
    """{"commit", "dirty"} of the checkout holding `path` (default: this package), or None outside git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _device(device: torch.device) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, count=torch.cuda.device_count(), memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return info


def system_info(device: torch.device | str = "cpu") -> dict:
    """Everything system.json records; JSON-serialisable."""
    device = torch.device(device)
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "versions": _versions(),
        "device": _device(device),
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))},
        "git": git_commit(),
    }
