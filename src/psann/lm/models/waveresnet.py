"""WaveResNet: ResPSANN plus wave blocks, RMSNorm -> causal dilated depthwise Conv1d over time ->
Sine -> Linear, added residually after the MLP ("interleave") or in its place ("replace", keeping
the attention residual). Dilation of layer i is growth ** (i % cycle).

Causal by construction: the convolution is padded on the left only, and padding positions of a
left-padded batch are zeroed before it, so they never leak into real tokens. For incremental
decoding each wave block keeps its last (kernel - 1) * dilation normed inputs in the cache.
Bidirectional models (model.causal false, as the diffusion objective sets) centre the kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from psann.sine import SineConfig, SineParam

from ..config import ModelConfig
from .layers import BlockInputs, DecoderBlock, KVCache, RMSNorm
from .respsann import ResPSANNLM, siren_init_


class WaveBlock(nn.Module):
    def __init__(self, d_model: int, kernel: int, dilation: int, sine: SineConfig, norm_eps: float, layer_index: int,
                 causal: bool = True):
        super().__init__()
        self.layer_index, self.context, self.causal = layer_index, (kernel - 1) * dilation, causal
        self.norm = RMSNorm(d_model, norm_eps)
        self.conv = nn.Conv1d(d_model, d_model, kernel, dilation=dilation, groups=d_model, bias=False)
        self.act = SineParam(d_model, sine)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        h = self.norm(x)
        if inputs.token_mask is not None:
            h = h * inputs.token_mask[..., None].to(h.dtype)
        h = h.transpose(1, 2)  # (B, C, T)
        cache = inputs.cache
        if cache is not None:
            h = torch.cat([cache.states[self.layer_index], h], dim=-1)
            cache.states[self.layer_index] = h[..., h.shape[-1] - self.context:]
        elif self.causal:
            h = F.pad(h, (self.context, 0))
        else:  # bidirectional models (diffusion): the kernel is centred on each position
            h = F.pad(h, (self.context // 2, self.context - self.context // 2))
        return self.out(self.act(self.conv(h).transpose(1, 2)))


class WaveDecoderBlock(DecoderBlock):
    """The decoder block (with or without its MLP), then x + wave(x)."""

    def __init__(self, config: ModelConfig, layer_index: int, mlp: nn.Module | None, wave: WaveBlock):
        super().__init__(config, layer_index, mlp)
        self.wave = wave

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        x = super().forward(x, inputs)
        return x + self.drop(self.wave(x, inputs))


class WaveResNetLM(ResPSANNLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, WaveBlock):  # each depthwise channel has fan-in = kernel size
                siren_init_(module.conv.weight, module.conv.kernel_size[0], self.sine.freq_init)

    def dilation(self, layer_index: int) -> int:
        return self.config.wave_dilation_growth ** (layer_index % self.config.wave_dilation_cycle)

    def make_block(self, layer_index: int) -> nn.Module:
        cfg = self.config
        if cfg.wave_mode == "off":
            return super().make_block(layer_index)
        wave = WaveBlock(cfg.d_model, cfg.wave_kernel_size, self.dilation(layer_index), self.sine, cfg.norm_eps, layer_index,
                         causal=cfg.causal)
        mlp = self.make_mlp(layer_index) if cfg.wave_mode == "interleave" else None
        return WaveDecoderBlock(cfg, layer_index, mlp, wave)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        cache = super().new_cache(batch_size, max_len, device, dtype)
        for i, block in enumerate(self.blocks):
            if isinstance(block, WaveDecoderBlock):  # zeros = the left padding of the full forward
                cache.states[i] = cache.k.new_zeros(batch_size, self.config.d_model, block.wave.context)
        return cache
