"""Model registry: `base` name -> model class. Families register themselves here."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError, unknown_choice
from .byte import ByteLM
from .hnet import HNetLM
from .respsann import ResPSANNLM
from .transformer import TransformerLM
from .waveresnet import WaveResNetLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "transformer": TransformerLM,
    "respsann": ResPSANNLM,
    "waveresnet": WaveResNetLM,
    "byte": ByteLM,
    "hnet": HNetLM,
}


SINE_BASES = ("respsann", "waveresnet")
BYTE_BASES = ("byte", "hnet")  # read raw bytes: vocab 256, the byte tokenizer


def check_base(base: str) -> None:
    if base not in MODEL_REGISTRY:
        raise ConfigError(unknown_choice("base", base, MODEL_REGISTRY))


def build_model(config: ModelConfig) -> nn.Module:
    check_base(config.base)
    if config.vocab_size is None or config.max_seq_len is None:
        raise ConfigError("model.vocab_size and model.max_seq_len must be resolved before building a model "
                          "(psannLM and the trainer fill them from the tokenizer and data.max_length).")
    if config.sine_params is not None and config.base not in SINE_BASES:
        raise ConfigError(f"'model.sine_params' configures the sine activation of the PSANN bases ({', '.join(SINE_BASES)}); "
                          f"base '{config.base}' has none. Remove sine_params or choose a PSANN base.")
    if config.base in BYTE_BASES and config.vocab_size != 256:
        raise ConfigError(f"base '{config.base}' reads bytes (vocab_size 256), got vocab_size {config.vocab_size}: "
                          "prepare the data with tokenizer='byte'.")
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
