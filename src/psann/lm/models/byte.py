"""Flat byte-level LM (base "byte"): the Transformer's embedding, norm and head over the 256 byte
ids, with blocks of `layer_type` (transformer: attention + SwiGLU; hgrn_bit: HGRN-Bit)."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError
from .hgrn_bit import HGRNBitBlock
from .layers import DecoderBlock, KVCache, make_mlp, matmul_parameters
from .transformer import TransformerLM


def make_byte_block(config: ModelConfig, layer_index: int) -> nn.Module:
    """A block of `config.layer_type` at width config.d_model (shared by the flat and hierarchical models)."""
    if config.layer_type == "hgrn_bit":
        return HGRNBitBlock(config, layer_index)
    return DecoderBlock(config, layer_index, make_mlp(config))


def new_block_cache(config: ModelConfig, n_blocks: int, batch_size: int, max_len: int, device, dtype) -> KVCache:
    """Keys/values for attention blocks; recurrent blocks keep only their state in `states`."""
    if config.layer_type == "transformer":
        return KVCache(n_blocks, batch_size, config.kv_heads, config.head_dim, max_len, device, dtype)
    return KVCache(0, batch_size, 1, 1, max_len, device, dtype)


class ByteLM(TransformerLM):
    tokenizer, vocab_size = "byte", 256

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        super().check_config(config)
        if config.layer_type == "hgrn_bit" and not config.causal:
            raise ConfigError("objective diffusion needs bidirectional layers; hgrn_bit is a causal recurrence. "
                              "Use layer_type transformer.")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.layer_type == "hgrn_bit":
            self.rope = None  # recurrent blocks carry position in their state
            self.pos_embed = None

    def make_block(self, layer_index: int) -> nn.Module:
        return make_byte_block(self.config, layer_index)

    def forward(self, input_ids, **kwargs):
        if self.config.layer_type == "hgrn_bit" and kwargs.get("position_ids") is not None:
            raise ValueError("hgrn_bit layers take no position_ids (position lives in the recurrent state).")
        return super().forward(input_ids, **kwargs)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.embed.weight
        return new_block_cache(self.config, self.config.n_layers, batch_size, max_len, device or p.device, dtype or p.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        if self.config.layer_type == "transformer":
            return super().flops_per_token(seq_len)
        return 6 * matmul_parameters(self)  # recurrent blocks: no attention term
