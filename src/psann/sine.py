"""SineParam: the PSANN activation, y = A * exp(-d * g(z)) * sin(f * z), with per-feature A, f, d.

    A = softplus(a_raw)          amplitude
    f = softplus(b_raw) + 1e-6   frequency
    d = softplus(c_raw)          damping (an envelope on the size of the pre-activation, not on time)
    g(z) = |z| ("abs"), relu(z) ("relu") or 0 ("none")

Raw parameters start at the inverse softplus of their init value, so A, f, d start exactly there
(or, with `*_init_std`, at per-feature draws around it). Usable in any network, not only LMs.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lm.errors import ConfigError, did_you_mean

PARAM_NAMES = ("amplitude", "frequency", "decay")
DECAY_MODES = ("abs", "relu", "none")
_EPS = 1e-4  # smallest init value: inverse softplus of ~0 is -inf


@dataclass
class SineConfig:
    amp_init: float = 1.0
    freq_init: float = 1.0
    damp_init: float = 0.01
    amp_init_std: float = 0.0
    freq_init_std: float = 0.0
    damp_init_std: float = 0.0
    decay_mode: str = "abs"
    trainable: bool = True
    learnable: list[str] = field(default_factory=lambda: list(PARAM_NAMES))
    amp_bounds: tuple[float, float] | None = None
    freq_bounds: tuple[float, float] | None = None
    damp_bounds: tuple[float, float] | None = None
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        for name in ("amp_init", "freq_init", "damp_init", "amp_init_std", "freq_init_std", "damp_init_std", "lr_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"'sine_params.{name}' must be a number >= 0, got {value!r}.")
        if self.lr_mult == 0:
            raise ConfigError("'sine_params.lr_mult' must be > 0 (use trainable=false to freeze the sine parameters).")
        if self.decay_mode not in DECAY_MODES:
            raise ConfigError(f"'sine_params.decay_mode' must be one of {', '.join(DECAY_MODES)}, got {self.decay_mode!r}."
                              f"{did_you_mean(str(self.decay_mode), DECAY_MODES)}")
        if not isinstance(self.trainable, bool):
            raise ConfigError(f"'sine_params.trainable' must be true or false, got {self.trainable!r}.")
        if isinstance(self.learnable, str):
            self.learnable = [self.learnable]
        for name in self.learnable:
            if name not in PARAM_NAMES:
                raise ConfigError(f"'sine_params.learnable' item {name!r} is not one of {', '.join(PARAM_NAMES)}."
                                  f"{did_you_mean(str(name), PARAM_NAMES)}")
        for name in ("amp_bounds", "freq_bounds", "damp_bounds"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            if len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ConfigError(f"'sine_params.{name}' must be [low, high] with low <= high, got {bounds!r}.")
            setattr(self, name, (float(bounds[0]), float(bounds[1])))

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, typing.Any] | None) -> "SineConfig":
        values = dict(values or {})
        names = list(cls.__dataclass_fields__)
        for key in values:
            if key not in names:
                raise ConfigError(f"unknown key 'sine_params.{key}'.{did_you_mean(key, names)} "
                                  f"Valid keys: {', '.join(names)}.")
        return cls(**values)

    def is_learnable(self, name: str) -> bool:
        return self.trainable and name in self.learnable


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    # log(expm1(x)), written to stay finite for large x
    return x + torch.log(-torch.expm1(-x))


class SineParam(nn.Module):
    """Per-feature parameterised sine. `dim` is the feature axis of the input (-1, or 1 for conv)."""

    def __init__(self, features: int, config: SineConfig | None = None, *, dim: int = -1):
        super().__init__()
        self.config = config = config or SineConfig()
        self.features, self.dim = features, dim
        for raw, name, init, std in (("a_raw", "amplitude", config.amp_init, config.amp_init_std),
                                     ("b_raw", "frequency", config.freq_init, config.freq_init_std),
                                     ("c_raw", "decay", config.damp_init, config.damp_init_std)):
            value = torch.full((features,), float(init))
            if std > 0:
                value = value + std * torch.randn(features)
            param = nn.Parameter(inverse_softplus(value.clamp(min=_EPS)), requires_grad=config.is_learnable(name))
            self.register_parameter(raw, param)

    def param_group_options(self) -> dict:
        """Optimizer options for A, f, d: no weight decay, and the configured LR multiplier."""
        return {"weight_decay": 0.0, "lr_mult": self.config.lr_mult}

    def _shaped(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.dim in (-1, ndim - 1):
            return t
        shape = [1] * ndim
        shape[self.dim] = self.features
        return t.view(shape)

    def amplitude(self) -> torch.Tensor:
        return _clamp(F.softplus(self.a_raw), self.config.amp_bounds)

    def frequency(self) -> torch.Tensor:
        return _clamp(F.softplus(self.b_raw) + 1e-6, self.config.freq_bounds)

    def decay(self) -> torch.Tensor:
        return _clamp(F.softplus(self.c_raw), self.config.damp_bounds)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        A = self._shaped(self.amplitude(), z.ndim).to(z.dtype)
        f = self._shaped(self.frequency(), z.ndim).to(z.dtype)
        y = A * torch.sin(f * z)
        mode = self.config.decay_mode
        if mode == "none":
            return y
        d = self._shaped(self.decay(), z.ndim).to(z.dtype)
        g = z.abs() if mode == "abs" else F.relu(z)
        return y * torch.exp(-d * g)

    def extra_repr(self) -> str:
        return f"features={self.features}, dim={self.dim}, decay_mode={self.config.decay_mode}"


def _clamp(t: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    return t if bounds is None else t.clamp(bounds[0], bounds[1])
