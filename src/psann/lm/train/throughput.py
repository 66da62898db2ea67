"""FLOPs per token, device peak FLOP/s, MFU and peak memory; and the dry-run memory plan.

FLOPs per token are each family's own estimate (models.layers.LanguageModel.flops_per_token: PaLM's
6 N + 12 n_layers d_model seq_len unless the family says otherwise).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..models import family
from ..models.layers import LanguageModel
from .optim import muon_groups, parameter_groups

# Dense peak TFLOP/s by device-name substring: (bf16/fp16 tensor cores, fp32 without TF32).
# From the vendors' datasheets; the first match wins, so longer names come first.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),        # SXM
    "GH200": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
    "A10G": (70.0, 31.2),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def flops_formula(model: LanguageModel) -> str:
    """Where a model's FLOPs/token come from, for the logs and the dry run."""
    own = type(model).flops_per_token is not LanguageModel.flops_per_token
    return f"{type(model).__name__}.flops_per_token" if own else "6N + 12 L d T"


def _cpu_peak_tflops(dtype: torch.dtype | None) -> float:
    """Nominal CPU peak: cores x clock x FLOPs/cycle of its vector units (an estimate; set
    train.peak_tflops for an exact figure)."""
    flags, mhz = "", 0.0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":")[1])
    except OSError:
        pass
    per_cycle = 32 if " fma" in flags else 8  # fp32: two 256-bit FMA pipes
    if dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle *= 2
    cores = len(os.sched_getaffinity(0))
    return cores * (mhz or 2000.0) * 1e6 * per_cycle / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype | None, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device at this precision, where the figure comes from)."""
    if override:
        return override, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single) in PEAK_TFLOPS.items():
            if key in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else single), f"{key} datasheet"
        return 0.0, f"unknown GPU {name!r}: set train.peak_tflops for MFU"
    if device.type == "cpu":
        return _cpu_peak_tflops(dtype), "CPU estimate (cores x clock x FLOPs/cycle)"
    return 0.0, f"no peak figure for {device.type}: set train.peak_tflops for MFU"


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --- dry-run memory plan ----------------------------------------------------------------------
@dataclass
class MemoryPlan:
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb + self.activations_gb


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state for the whole (unsharded) model (`optimizer` resolved, not auto)."""
    momentum_only = set()  # Muon keeps one fp32 momentum per matrix it orthogonalises
    if optimizer == "muon":
        momentum_only = {id(p) for g in muon_groups(model, parameter_groups(model, 0.0)) if g["muon"] for p in g["params"]}
    total = 0
    for p in model.parameters():
        if id(p) in momentum_only:
            total += 4 * p.numel()
        elif optimizer == "adafactor":
            total += 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel())  # row + column moments
        elif optimizer == "adamw8bit":
            total += 2 * p.numel()  # two 8-bit moments (plus small per-block scales)
        else:
            total += 8 * p.numel()  # two fp32 moments
    return total


def activation_bytes_per_token(config: ModelConfig, grad_checkpoint: bool, half: bool) -> int:
    """Activations kept for backward, per token, across all blocks plus the loss.

    Per block (h = d_model, k = kv width, m = MLP width, a = 2 bytes under amp else 4): the
    fp32 residual input of both norms (2 x 4h), norm outputs (2 x a h), q/k/v before and after
    RoPE (2 x a (h + 2k)), the attention output (a h) and the MLP's gate, up, activation and
    product (4 x a m). SDPA keeps no T x T scores. With checkpointing only each block's input
    (4h) stays, plus one block being recomputed. The logits are held in the compute dtype and
    upcast to fp32 for the loss.
    """
    a = 2 if half else 4
    total = (a + 4) * (config.vocab_size or 0)  # the logits
    for stack, compression in family(config.base).block_stacks(config):  # one position per `compression` tokens
        total += _blocks_bytes(stack, a, grad_checkpoint) / compression
    return int(total)


def _blocks_bytes(config: ModelConfig, a: int, grad_checkpoint: bool) -> int:
    h, m = config.d_model, config.mlp_hidden
    k = config.kv_heads * config.head_dim
    block = 8 * h + 2 * a * h + 2 * a * (h + 2 * k) + a * h + 4 * a * m
    return config.n_layers * 4 * h + block if grad_checkpoint else config.n_layers * block


def memory_plan(model: nn.Module, config: ModelConfig, *, optimizer: str, shard_factor: int, optimizer_shards: int,
                micro_batch_tokens: int, grad_checkpoint: bool, half: bool) -> MemoryPlan:
    """Per-device memory: fp32 params and grads divided over `shard_factor` devices, optimizer
    state over `optimizer_shards`, activations for one micro-batch."""
    n = sum(p.numel() for p in model.parameters())
    gb = 2**30
    return MemoryPlan(
        params_gb=4 * n / shard_factor / gb,
        grads_gb=4 * n / shard_factor / gb,
        optimizer_gb=optimizer_state_bytes(model, optimizer) / optimizer_shards / gb,
        activations_gb=activation_bytes_per_token(config, grad_checkpoint, half) * micro_batch_tokens / gb,
    )
