"""Profiling helpers: NVTX ranges for Nsight, CUDA memory history and summaries, saved-tensor bytes.

    PSANN_NVTX=1 [PSANN_NVTX_LEVEL=coarse|fine|verbose] nsys profile -t cuda,nvtx python -m psann.cli train ...

`nvtx_range(name, level)` marks a region when PSANN_NVTX=1 and CUDA is available and the region's
level is within PSANN_NVTX_LEVEL (coarse: optimizer steps; fine, the default: also forward,
backward, optimizer; verbose: also the loading of each batch); otherwise it returns a shared
do-nothing context (a few environment lookups per call). TRANSFORMERLM_NVTX and
TRANSFORMERLM_NVTX_LEVEL, the earlier diffusionlm names, work too. The CUDA memory helpers return None
or {} on machines without CUDA, so callers need no device checks; the trainer records a whole
run's allocations under PSANN_CUDA_MEMORY_SNAPSHOT=path.pickle (`memory_snapshot_from_env`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

NVTX_ENV, NVTX_LEVEL_ENV = "PSANN_NVTX", "PSANN_NVTX_LEVEL"
NVTX_LEVELS = ("coarse", "fine", "verbose")
MEMORY_SNAPSHOT_ENV = "PSANN_CUDA_MEMORY_SNAPSHOT"
_NULL = contextlib.nullcontext()
_cuda_available = functools.cache(torch.cuda.is_available)


def _env(name: str) -> str | None:
    return os.environ.get(name, os.environ.get(name.replace("PSANN_", "TRANSFORMERLM_")))


def nvtx_enabled(level: str = "fine") -> bool:
    if _env(NVTX_ENV) != "1" or not _cuda_available():
        return False
    wanted = (_env(NVTX_LEVEL_ENV) or "fine").lower()
    if wanted not in NVTX_LEVELS:
        raise ValueError(f"{NVTX_LEVEL_ENV}={wanted!r}: choose one of {', '.join(NVTX_LEVELS)}")
    return NVTX_LEVELS.index(level) <= NVTX_LEVELS.index(wanted)


def nvtx_range(name: str, level: str = "fine"):
    """`with nvtx_range("forward"):` -- an NVTX range under PSANN_NVTX=1 on CUDA when `level` is
    within PSANN_NVTX_LEVEL, else a no-op."""
    return torch.cuda.nvtx.range(name) if nvtx_enabled(level) else _NULL


def start_memory_history(max_entries: int = 100_000) -> bool | None:
    """Record every CUDA allocation (with stack traces) for `dump_memory_snapshot`; None on CPU."""
    if not _cuda_available():
        return None
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    return True


def stop_memory_history() -> None:
    if _cuda_available():
        torch.cuda.memory._record_memory_history(enabled=None)


def dump_memory_snapshot(path: str | os.PathLike) -> Path | None:
    """Write the recorded history as a pickle (open it at pytorch.org/memory_viz); None on CPU."""
    if not _cuda_available():
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.cuda.memory._dump_snapshot(str(tmp))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def memory_snapshot_from_env(rank: int = 0):
    """With PSANN_CUDA_MEMORY_SNAPSHOT=run.pickle on CUDA, record every allocation while the block
    (the trainer's fit: the training loop, not the model's construction) runs and dump the history there at its end, also when it fails (an out-of-memory error is when
    it is wanted most); rank r > 0 writes run.rank<r>.pickle. Otherwise a no-op."""
    path = os.environ.get(MEMORY_SNAPSHOT_ENV)
    if not path or not start_memory_history():
        yield
        return
    try:
        yield
    finally:
        target = Path(path)
        if rank:
            target = target.with_name(f"{target.stem}.rank{rank}{target.suffix}")
        try:
            dump_memory_snapshot(target)
        except (OSError, RuntimeError) as exc:  # never hide the error the block raised (an OOM, say)
            logging.getLogger("psann.lm").warning("CUDA memory snapshot not written to %s: %s", target, exc)
        finally:
            stop_memory_history()


def memory_summary(device: torch.device | str | None = None) -> dict:
    """Current and peak allocated/reserved GiB and the OOM count of a CUDA device; {} on CPU."""
    if not _cuda_available() or (device is not None and torch.device(device).type != "cuda"):
        return {}
    stats = torch.cuda.memory_stats(device)
    gib = 2**30
    return {"allocated_gb": stats.get("allocated_bytes.all.current", 0) / gib,
            "max_allocated_gb": stats.get("allocated_bytes.all.peak", 0) / gib,
            "reserved_gb": stats.get("reserved_bytes.all.current", 0) / gib,
            "max_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / gib,
            "num_ooms": stats.get("num_ooms", 0)}


def peaks(device: torch.device | str | None = None) -> dict:
    """Peak allocated and reserved GiB since the last `reset_peaks`; {} on CPU."""
    summary = memory_summary(device)
    return {k: summary[k] for k in ("max_allocated_gb", "max_reserved_gb")} if summary else {}


def reset_peaks(device: torch.device | str | None = None) -> None:
    """Start the peaks of `peaks` afresh (a no-op on CPU)."""
    if _cuda_available():
        torch.cuda.reset_peak_memory_stats(device)


class SavedTensorBytes:
    """Bytes autograd keeps for backward while the context is open: unique storages, parameters
    excluded (they exist anyway). Works on every device; read `.bytes` after the forward pass.

    Activation checkpointing saves only each block's inputs here; the activations it recomputes
    during backward are transient and not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
