"""Model registry: `base` name -> family class (a layers.LanguageModel, which says what is its own)."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError, unknown_choice
from .byte import ByteLM
from .hnet import HNetLM
from .layers import LanguageModel
from .respsann import ResPSANNLM
from .transformer import TransformerLM
from .waveresnet import WaveResNetLM

MODEL_REGISTRY: dict[str, type[LanguageModel]] = {
    "transformer": TransformerLM,
    "respsann": ResPSANNLM,
    "waveresnet": WaveResNetLM,
    "byte": ByteLM,
    "hnet": HNetLM,
}


def family(base: str) -> type[LanguageModel]:
    """The family class of `base`; a ConfigError naming the registered ones for anything else."""
    if base not in MODEL_REGISTRY:
        raise ConfigError(unknown_choice("base", base, MODEL_REGISTRY))
    return MODEL_REGISTRY[base]


def check_model_config(config: ModelConfig) -> type[LanguageModel]:
    """What ModelConfig cannot check without the families (their structure, bidirectional attention,
    sine_params, a fixed vocabulary); returns the family."""
    cls = family(config.base)
    cls.check_config(config)
    if not config.causal and cls.causal_only:
        either = ", ".join(b for b, c in MODEL_REGISTRY.items() if not c.causal_only)
        raise ConfigError(f"objective diffusion needs bidirectional attention over all positions; {cls.causal_only}. "
                          f"Use base {either}.")
    if config.sine_params is not None and not cls.sine_params:
        sine = ", ".join(b for b, c in MODEL_REGISTRY.items() if c.sine_params)
        raise ConfigError(f"'model.sine_params' configures the sine activation of the PSANN bases ({sine}); "
                          f"base '{config.base}' has none. Remove sine_params or choose a PSANN base.")
    if cls.vocab_size is not None and config.vocab_size not in (None, cls.vocab_size):
        raise ConfigError(f"base '{config.base}' reads the '{cls.tokenizer}' tokenizer's ids (vocab_size {cls.vocab_size}), "
                          f"got vocab_size {config.vocab_size}: prepare the data with tokenizer='{cls.tokenizer}'.")
    return cls


def build_model(config: ModelConfig) -> nn.Module:
    cls = check_model_config(config)
    if config.vocab_size is None or config.max_seq_len is None:
        raise ConfigError("model.vocab_size and model.max_seq_len must be resolved before building a model "
                          "(psannLM and the trainer fill them from the tokenizer and data.max_length).")
    if config.dropout is None:  # the trainer decides it from the run's plan; a model built outside a run has none
        config = dataclasses.replace(config, dropout=0.0)
    return cls(config)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Unique parameters (model.parameters() yields a tied weight once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
