"""Llama-style decoder: token embedding, pre-norm blocks (RMSNorm, RoPE attention via SDPA, SwiGLU or ReLU^2), tied head; the recipe options (QK-norm, soft-capped logits,
zero-init residual projections) are model.* keys."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import ConfigError
from .layers import (DecoderBlock, KVCache, LanguageModel, RMSNorm, RotaryEmbedding, init_weights, make_mlp,
                     mask_positions, run_blocks, soft_cap)


class TransformerLM(LanguageModel):
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        if isinstance(config.d_model, list):
            raise ConfigError(f"'model.d_model' is a list ({config.d_model}): one width per stage is for base 'hnet'; "
                              f"base '{config.base}' takes one integer.")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        if config.rope:
            self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
            self.pos_embed = None
        else:
            self.rope = None
            self.pos_embed = nn.Embedding(config.max_seq_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(config.n_layers))
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def make_block(self, layer_index: int) -> nn.Module:
        """Block `layer_index`; families override this or just `make_mlp`."""
        return DecoderBlock(self.config, layer_index, self.make_mlp(layer_index))

    def make_mlp(self, layer_index: int) -> nn.Module:
        """The MLP of block `layer_index`; other families override this (e.g. a sine MLP)."""
        return make_mlp(self.config)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config.n_layers, batch_size, self.config.kv_heads, self.config.head_dim, max_len,
                       device or p.device, dtype or p.dtype)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with last_only.

        attention_mask: (B, past + T), 1 for real tokens and 0 for (left) padding, covering the
        cached positions too. position_ids default to running positions, or to the count of real
        tokens before each position when a mask is given (so left padding does not shift them).
        visible: (T, T) boolean, the keys each query may see in place of the model's own pattern
        (train.attention_anneal_steps uses it while a diffusion model's attention opens up).
        """
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None and attention_mask is not None:
            position_ids = mask_positions(attention_mask, past, T)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device)
            if past + T > self.config.max_seq_len and int(position_ids.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} is past max_seq_len {self.config.max_seq_len} "
                                 "of a model with learned positions; shorten the input.")
            x = x + self.pos_embed(position_ids)
        x = run_blocks(self.blocks, self.drop(x), rope=self.rope, causal=self.config.causal, cache=cache,
                       attention_mask=attention_mask, position_ids=position_ids, token_ids=input_ids,
                       visible=visible)
        if self.config.shift_logits:  # position i read from i - 1, as the causal head it may start from
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # before the head: d_model wide, not vocabulary wide
        if last_only:
            x = x[:, -1:]
        return soft_cap(self.lm_head(self.norm(x)), self.config.logit_softcap)
