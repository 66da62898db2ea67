"""HGRN-Bit blocks (the "MatMul-free LM" layer): BitLinear projections around the HGRN gated linear
recurrence, then a BitLinear GLU. Usable wherever a DecoderBlock is (flat byte models, H-Net stages).

BitLinear: RMSNorm the input, fake-quantise activations per token to int8 (absmax) and weights to
ternary {-1, 0, 1} times their mean magnitude (absmean), both with straight-through estimators,
and multiply in floating point. Training gets no speed from it without dedicated kernels; what it
buys is a model whose weights deploy as 1.58-bit values.

Token mixer: i, f, g = BitLinear(x); f = sigmoid(f); u = silu(i) * (1 - f);
h[t] = f[t] * h[t-1] + u[t] per channel (models/scan.py); out = BitLinear(RMSNorm(g) * silu(h)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import BlockInputs, RMSNorm
from .scan import linear_scan


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantisation (values stay in x's dtype)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def quantize_weights(w: torch.Tensor) -> torch.Tensor:
    """Ternary {-1, 0, 1} * mean |w| (absmean) fake quantisation."""
    scale = 1.0 / w.abs().mean().clamp_min(1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


class BitLinear(nn.Linear):
    quantize = True  # class switch: False runs the same layer unquantised (ablations, exactness tests)

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__(in_features, out_features, bias=False)
        self.norm = RMSNorm(in_features, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.norm(x), self.weight
        if self.quantize:  # straight-through estimators: quantised forward, identity gradient
            x = x + (quantize_activations(x) - x).detach()
            w = w + (quantize_weights(w) - w).detach()
        return F.linear(x, w.to(x.dtype))


class HGRNBitMixer(nn.Module):
    """The recurrent token mixer. Its state in a cache is h at the last position (fp32)."""

    def __init__(self, d_model: int, expand_ratio: int, n_heads: int, eps: float, layer_index: int):
        super().__init__()
        inner = d_model * expand_ratio
        if inner % n_heads:
            raise ValueError(f"hgrn_bit: recurrence width {inner} is not divisible by n_heads={n_heads}")
        self.layer_index, self.n_heads = layer_index, n_heads
        self.i_proj = BitLinear(d_model, inner, eps)
        self.f_proj = BitLinear(d_model, inner, eps)
        self.g_proj = BitLinear(d_model, inner, eps)
        self.g_norm = RMSNorm(inner // n_heads, eps)  # per head
        self.out = BitLinear(inner, d_model, eps)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        B, T, _ = x.shape
        f = torch.sigmoid(self.f_proj(x))
        u = F.silu(self.i_proj(x)) * (1 - f)
        if inputs.token_mask is not None:  # padding and skipped slots leave the state unchanged
            keep = inputs.token_mask[..., None].bool()
            f, u = torch.where(keep, f, torch.ones_like(f)), torch.where(keep, u, torch.zeros_like(u))
        cache = inputs.cache
        h0 = cache.states.get(self.layer_index) if cache is not None else None
        h = linear_scan(f, u, h0)  # fp32
        if cache is not None:
            cache.states[self.layer_index] = h[:, -1]
        g = self.g_proj(x).view(B, T, self.n_heads, -1)
        o = self.g_norm(g) * F.silu(h.to(g.dtype)).view_as(g)
        return self.out(o.reshape(B, T, -1))


class BitGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, eps: float):
        super().__init__()
        self.hidden = hidden
        self.gate_up = BitLinear(d_model, 2 * hidden, eps)
        self.down = BitLinear(hidden, d_model, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class HGRNBitBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + glu(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.mixer_norm = RMSNorm(d, eps)
        self.mixer = HGRNBitMixer(d, config.expand_ratio, config.n_heads, eps, layer_index)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = BitGLU(d, config.mlp_hidden, eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        x = x + self.drop(self.mixer(self.mixer_norm(x), inputs))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
