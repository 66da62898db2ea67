"""Training objectives, each one object chosen once from `ModelConfig.objective` (see base.Objective)."""

from __future__ import annotations

from ..config import ModelConfig
from .base import Objective, causal_lm_loss_sum, cross_entropy_sum
from .causal import CausalLM
from .diffusion import MaskedDiffusion

OBJECTIVES: dict[str, type[Objective]] = {"causal": CausalLM, "diffusion": MaskedDiffusion}


def objective_for(config: ModelConfig) -> Objective:
    """The objective `config` trains with (its keys, e.g. the mask id, read from `config`)."""
    return OBJECTIVES[config.objective](config)


__all__ = ["OBJECTIVES", "Objective", "objective_for", "causal_lm_loss_sum", "cross_entropy_sum"]
