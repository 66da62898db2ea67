"""Optimizers (AdamW, ZeRO-sharded AdamW, 8-bit AdamW, Adafactor, Muon for the hidden matrices
with AdamW for the rest) with decay only on weight matrices, and the warmup + cosine learning-rate
schedule."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..errors import ConfigError

log = logging.getLogger("psann.lm")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices; never norms, biases, embeddings (tied heads included), gains or
    sine parameters (decay would drag their raw values towards softplus(0) = 0.69).

    A module may define `param_group_options()` -> {"weight_decay": ..., "lr_mult": ...} for its
    own direct parameters (SineParam uses it for its LR multiplier), and `lr_mult_subtree` for all
    parameters beneath it (H-Net stages; modules() visits outer stages first, so inner ones win).
    """
    options: dict[int, dict] = {}
    subtree: dict[int, float] = {}
    for module in model.modules():
        if hasattr(module, "lr_mult_subtree"):
            subtree.update({id(p): module.lr_mult_subtree for p in module.parameters()})
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.Embedding):
            options.update({id(p): {"weight_decay": 0.0} for p in own.values()})
        if hasattr(module, "param_group_options"):
            options.update({id(p): module.param_group_options() for p in own.values()})
    groups: dict[tuple[float, float], list] = {}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        opt = options.get(id(p), {})
        decay = opt.get("weight_decay", weight_decay if p.ndim >= 2 else 0.0)
        groups.setdefault((decay, opt.get("lr_mult", 1.0) * subtree.get(id(p), 1.0)), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_mult": lr_mult}
            for (decay, lr_mult), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def resolved_optimizer(choice: str, parallel_mode: str) -> str:
    """train.optimizer with auto resolved: Muon where it runs (docs/results/recipe.md); FSDP holds
    the matrices in shards and Muon orthogonalises them whole."""
    if choice == "auto":
        return "adamw" if parallel_mode == "fsdp" else "muon"
    return choice


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, parallel_mode: str = "none") -> torch.optim.Optimizer:
    """`cfg.optimizer` over `parameter_groups`; a choice this machine cannot run falls back to
    AdamW with a message that says why and what to install."""
    groups = parameter_groups(model, cfg.weight_decay)
    choice = resolved_optimizer(cfg.optimizer, parallel_mode)
    if cfg.optimizer == "auto" and parallel_mode == "fsdp":
        log.info("train.optimizer=auto: AdamW, as FSDP shards the matrices Muon orthogonalises whole.")
    if choice == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if device.type == "cuda" and bnb is not None:
            return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
        log.warning("train.optimizer=adamw8bit needs CUDA and bitsandbytes (pip install 'psann-lm[cuda]'); "
                    "%s. Using AdamW.", "bitsandbytes is not installed" if bnb is None else f"this run is on {device.type}")
        choice = "adamw"
    if choice == "zero_adamw":
        if parallel_mode != "ddp":
            raise ConfigError("train.optimizer=zero_adamw shards AdamW state across DDP ranks; it needs DDP "
                              "(torchrun with 2+ processes). FSDP already shards optimizer state: use adamw with train.fsdp.")
        from torch.distributed.optim import ZeroRedundancyOptimizer

        first, *rest = groups
        zero = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas,
                                       weight_decay=first["weight_decay"])
        zero.param_groups[0]["lr_mult"] = first["lr_mult"]
        for group in rest:
            zero.add_param_group(group)
        return zero
    if choice == "muon":
        if parallel_mode == "fsdp":
            raise ConfigError("train.optimizer=muon orthogonalises whole matrices; FSDP holds shards of them. Use "
                              "adamw with train.fsdp, or muon with DDP or one process.")
        return MuonAdamW(muon_groups(model, groups), lr=cfg.lr, betas=cfg.betas)
    if choice == "adafactor":
        # Factored second moments: O(rows + cols) state per matrix instead of AdamW's 2x params.
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    fused = device.type == "cuda"  # the fused kernel exists for CUDA tensors only
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """`groups` with each one's hidden weight matrices (2-D, not an embedding, not the output
    head) moved into a group of their own marked "muon", as the Muon recipes split them."""
    head = getattr(model, "lm_head", None)
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    excluded |= {id(p) for p in head.parameters()} if head is not None else set()
    out = []
    for group in groups:
        matrices = [p for p in group["params"] if p.ndim == 2 and id(p) not in excluded]
        rest = [p for p in group["params"] if not (p.ndim == 2 and id(p) not in excluded)]
        if matrices:
            out.append({**group, "params": matrices, "muon": True})
        if rest:
            out.append({**group, "params": rest, "muon": False})
    return out


class MuonAdamW(torch.optim.AdamW):
    """torch.optim.Muon for the groups marked "muon" (its learning rate matched to AdamW's update
    RMS, adjust_lr_fn="match_rms_adamw", so train.lr serves both) and AdamW for the others, as one
    optimizer: every state lives in self.state, so it checkpoints and resumes like AdamW."""

    MUON = {"momentum": 0.95, "nesterov": True, "ns_coefficients": (3.4445, -4.775, 2.0315), "eps": 1e-7,
            "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"}

    def __init__(self, groups: list[dict], **adamw):
        super().__init__([{**self.MUON, **g} if g["muon"] else g for g in groups], **adamw)
        self._link()

    def _link(self) -> None:
        muon = [g for g in self.param_groups if g.get("muon")]
        self._muon = torch.optim.Muon(muon, lr=self.defaults["lr"]) if muon else None
        if self._muon is not None:  # the same group dicts and state: lr changes and checkpoints reach both
            self._muon.param_groups, self._muon.state = muon, self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        try:
            self.param_groups = [g for g in groups if not g.get("muon")]
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        if self._muon is not None:
            self._muon.step()
            for group in self._muon.param_groups:  # a step count as AdamW keeps one (its state loader expects it)
                for p in group["params"]:
                    if p.grad is not None:
                        state = self.state[p]
                        state["step"] = state.get("step", torch.tensor(0.0)) + 1
        return loss


def lr_at(step: int, cfg: TrainConfig, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from lr/warmup to lr, then cosine, linear or warmup-stable-decay
    (train.lr_schedule) to min_lr at the last step."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.lr_schedule == "wsd":  # hold lr, then fall linearly over the last decay_fraction of the run
        decay_start = max(warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))
        progress = min(1.0, max(0, step - decay_start) / max(1, total_steps - decay_start))
        return cfg.lr - (cfg.lr - min_lr) * progress
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def default_warmup(total_steps: int) -> int:
    return min(1000, math.ceil(0.05 * total_steps))
