"""`train.log_norms`: the weights' global L2 norm and each block's output RMS at a log step."""

from __future__ import annotations

import torch
import torch.nn as nn


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every member of a ModuleList named `blocks`, at any depth (a Transformer's layers, each
    H-Net stage's encoder and decoder blocks), by its dotted name."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks":
            found += [(f"{name}.{i}", block) for i, block in enumerate(module)]
    return found


class NormProbe:
    """Forward hooks keep the RMS of each block's output from the latest training forward (as a
    tensor: reading it would stall an accelerator every micro-batch); `read` turns them into
    numbers at a log step."""

    def __init__(self, model: nn.Module):
        self.model, self._rms = model, {}
        self._handles = [block.register_forward_hook(self._hook(name)) for name, block in block_modules(model)]

    def _hook(self, name: str):
        def keep(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if module.training and torch.is_tensor(out):
                self._rms[name] = out.detach().float().pow(2).mean().sqrt()
        return keep

    def weight_square_sum(self) -> float:
        """Sum of squares of this process's parameters (an FSDP rank holds its shards only)."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.detach().double().pow(2).sum().cpu()
        return float(total)

    def activations(self) -> dict[str, float]:
        return {f"act_rms.{name}": float(value) for name, value in sorted(self._rms.items())}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
