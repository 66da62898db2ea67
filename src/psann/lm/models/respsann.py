"""ResPSANN: the Llama-style decoder with a PSANN MLP, alpha * fc2(Sine(fc1(x))), alpha a learnable
residual gain (init 1.0).

Initialisation: fc1 follows SIREN's hidden-layer scheme, U(+-sqrt(6 / d_model) / freq_init), so
that with unit-RMS (normed) inputs the sine's argument f * z has std sqrt(2) and the activation
works in its nonlinear range instead of near sin(z) ~ z; fc2, like every residual output
projection, is N(0, init_std / sqrt(2 * n_layers)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from psann.sine import SineConfig, SineParam

from ..config import ModelConfig
from .transformer import TransformerLM


class SineMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, sine: SineConfig):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.act = SineParam(hidden, sine)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.fc2(self.act(self.fc1(x)))


def siren_init_(weight: torch.Tensor, fan_in: int, freq_init: float) -> None:
    """SIREN hidden-layer init, U(+-sqrt(6 / fan_in) / freq), for weights feeding a sine."""
    bound = math.sqrt(6.0 / fan_in) / max(freq_init, 1e-3)
    nn.init.uniform_(weight, -bound, bound)


class ResPSANNLM(TransformerLM):
    sine_params = True

    def __init__(self, config: ModelConfig):
        self.sine = SineConfig.from_dict(config.sine_params)
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, SineMLP):
                siren_init_(module.fc1.weight, module.fc1.in_features, self.sine.freq_init)

    def make_mlp(self, layer_index: int) -> nn.Module:
        return SineMLP(self.config.d_model, self.config.d_mlp or round(self.config.hidden_ratio * self.config.d_model), self.sine)
