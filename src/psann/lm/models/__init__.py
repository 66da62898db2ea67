"""Model registry: `base` name -> model class. Families register themselves here."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError, unknown_choice
from .transformer import TransformerLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "transformer": TransformerLM,
}

# Bases the project plans but does not ship yet: asking for one is a clear error, not a fallback.
PLANNED_BASES: dict[str, str] = {
    "respsann": "the PSANN sine bases (respsann, waveresnet) are not available in this version yet",
    "waveresnet": "the PSANN sine bases (respsann, waveresnet) are not available in this version yet",
}


def check_base(base: str) -> None:
    if base in MODEL_REGISTRY:
        return
    if base in PLANNED_BASES:
        raise ConfigError(f"base '{base}' is not available: {PLANNED_BASES[base]}. "
                          f"Use one of: {', '.join(sorted(MODEL_REGISTRY))} (e.g. base='transformer').")
    raise ConfigError(unknown_choice("base", base, MODEL_REGISTRY))


def build_model(config: ModelConfig) -> nn.Module:
    check_base(config.base)
    if config.vocab_size is None or config.max_seq_len is None:
        raise ConfigError("model.vocab_size and model.max_seq_len must be resolved before building a model "
                          "(psannLM and the trainer fill them from the tokenizer and data.max_length).")
    if config.sine_params is not None and config.base == "transformer":
        raise ConfigError("'model.sine_params' configures the sine activation of the PSANN bases; the transformer "
                          "base has none. Remove sine_params or choose a PSANN base.")
    return MODEL_REGISTRY[config.base](config)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
