"""Pieces shared by every decoder family: norm, rotary embedding, attention with a KV cache, SwiGLU,
and LanguageModel, the base class through which a family says what is its own.

Layouts follow Hugging Face Llama (rotate-half RoPE, q/k/v and gate/up fused here but split on
export) so weights move between the two without permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the mean-square.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, indexed by absolute position ids."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor | None, start: int, length: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin shaped to broadcast over (B, heads, T, head_dim): for explicit position_ids
        (B, T), or for the running positions start .. start + length - 1 (a slice, no gather)."""
        needed = start + length if position_ids is None else int(position_ids.max()) + 1
        if needed > self.cos.shape[0]:  # positions past the table (long generation): grow it
            self._build(max(needed, 2 * self.cos.shape[0]))
        if position_ids is None:
            return self.cos[start:start + length].to(dtype), self.sin[start:start + length].to(dtype)
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for every layer, plus which key slots hold real tokens.

    `length` counts the positions already written; a forward with a cache writes the new
    positions at [length, length + T) in every layer, then the model calls `advance(T)`.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        # Per-layer state of layers that mix along time (a wave convolution's last inputs, a recurrence's h).
        self.states: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.max_len}.")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def build_attention_mask(key_valid: torch.Tensor | None, q_len: int, past: int, causal: bool,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, past + q_len) mask, True = may attend; None when SDPA needs none
    (no padding and either non-causal, a single query, or a plain causal prefill via is_causal).

    A padded query row would otherwise have no visible key (NaN in softmax), so every query may
    always see its own position; such rows are padding and are never read.
    """
    if key_valid is None and (not causal or q_len == 1 or past == 0):
        return None
    total = past + q_len
    q_pos = torch.arange(past, total, device=device)
    k_pos = torch.arange(total, device=device)
    if causal:
        allowed = k_pos[None, :] <= q_pos[:, None]
    else:
        allowed = torch.ones(q_len, total, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :total].bool()
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    return allowed


@dataclass
class BlockInputs:
    """What every block receives besides the hidden states; built once per forward by the model."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin for the current positions
    attn_mask: torch.Tensor | None                  # boolean (B, 1, T, past + T), or None
    is_causal: bool                                 # let SDPA apply the causal mask itself
    cache: "KVCache | None"
    token_mask: torch.Tensor | None = None          # (B, T), 0 at padding; for layers that mix along time
    token_ids: torch.Tensor | None = None           # (B, T) input ids, for value embeddings


def mask_positions(attention_mask: torch.Tensor, past: int, length: int) -> torch.Tensor:
    """Position ids that count only real tokens (left padding does not shift them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + length]


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *, rope: RotaryEmbedding | None, causal: bool,
               cache: KVCache | None, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
               visible: torch.Tensor | None = None) -> torch.Tensor:
    """Run a stack of blocks over x (B, T, D): one BlockInputs for all of them, then advance the cache.

    attention_mask (B, past + T) marks real tokens (1) and padding or skipped slots (0), cached
    positions included; position ids then count real tokens only. visible (T, T), True where a
    query may attend to a key, replaces the causal or full pattern (no cache).
    """
    T = x.shape[1]
    past = cache.length if cache is not None else 0
    if position_ids is None and attention_mask is not None:
        position_ids = mask_positions(attention_mask, past, T)
    if visible is None:
        attn_mask = build_attention_mask(attention_mask, T, past, causal, x.device)
    else:
        if cache is not None or visible.shape != (T, T):
            raise ValueError(f"visible must be ({T}, {T}) for {T} positions without a cache, got {tuple(visible.shape)}")
        attn_mask = visible.to(x.device)[None, None]
        if attention_mask is not None:  # padding stays hidden; each query keeps its own position
            attn_mask = (attn_mask & attention_mask[:, None, None, :T].bool()) | torch.eye(T, dtype=torch.bool, device=x.device)
    inputs = BlockInputs(
        rope=rope(position_ids, past, T, x.dtype) if rope is not None else None,
        attn_mask=attn_mask,
        is_causal=causal and past == 0 and T > 1, cache=cache,
        token_mask=attention_mask[:, past:past + T] if attention_mask is not None else None, token_ids=token_ids)
    for block in blocks:
        x = block(x, inputs)
    if cache is not None:
        cache.advance(T)
    return x


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.uses_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.uses_qk_norm else None
        self.value_embed = (nn.Embedding(config.vocab_size, self.n_kv_heads * self.head_dim)
                            if config.value_embeddings else None)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        B, T, _ = x.shape
        # One matmul per weight slice (not a split of the fused output): contiguous q/k/v and no
        # concatenation of their gradients in backward.
        w_q, w_k, w_v = self.qkv.weight.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                               self.n_kv_heads * self.head_dim], dim=0)
        q, k, v = F.linear(x, w_q), F.linear(x, w_k), F.linear(x, w_v)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.value_embed is not None:
            v = v + self.value_embed(inputs.token_ids)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.rope is not None:
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        if inputs.cache is not None:
            k, v = inputs.cache.update(self.layer_index, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=inputs.attn_mask, is_causal=inputs.is_causal and inputs.attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two matmuls on the weight's row halves: splitting one fused output would leave strided
        # views that make silu and its backward ~2x slower (measured on CPU).
        w_gate, w_up = self.gate_up.weight.split(self.hidden, dim=0)
        return self.down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))


class ReLU2MLP(nn.Module):
    """relu(x W_up)^2 W_down: ungated, so one input matmul instead of SwiGLU's two."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def make_mlp(config: ModelConfig) -> nn.Module:
    """The attention blocks' MLP that model.mlp names, at width config.d_model."""
    if config.mlp == "relu2":
        return ReLU2MLP(config.d_model, config.mlp_hidden)
    return SwiGLU(config.d_model, config.mlp_hidden)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (model.logit_softcap): smooth, keeps logits within +-cap."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). The MLP is the family's choice
    (None: no MLP branch)."""

    def __init__(self, config: ModelConfig, layer_index: int, mlp: nn.Module | None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps) if mlp is not None else None
        self.mlp = mlp
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), inputs))
        if self.mlp is None:
            return x
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# Linears that write into the residual stream (their init is scaled down with depth).
RESIDUAL_OUTPUTS = ("attn.out", "mlp.down", "mlp.fc2", "wave.out", "mixer.out")


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """Normal(0, init_std) for linears/embeddings; output projections of residual branches scaled
    by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream's variance does not grow with depth, or
    zero (model.zero_init_residual: every block starts as the identity)."""
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            residual = name.endswith(RESIDUAL_OUTPUTS)
            if residual and config.zero_init_residual:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if residual else config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=config.init_std)


def matmul_parameters(model: nn.Module) -> int:
    """Parameters used in matrix multiplies (tied weights once; embedding lookups excluded unless
    the embedding doubles as the output head)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups or p is head)  # parameters(): each once


class LanguageModel(nn.Module):
    """Base class of every family: what it declares here is all the rest of the package knows of it."""

    tokenizer: ClassVar[str | None] = None    # the tokenizer kind it reads (e.g. "byte"); None: any
    vocab_size: ClassVar[int | None] = None   # the vocabulary that tokenizer fixes
    causal_only: ClassVar[str] = ""           # why it cannot attend both ways (objective diffusion); "": it can
    sine_params: ClassVar[bool] = False       # takes model.sine_params (the PSANN sine activation)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """The family's own checks of `config`; a ConfigError names the key and the fix."""

    @classmethod
    def block_stacks(cls, config: ModelConfig) -> list[tuple[ModelConfig, float]]:
        """(flat config, compression R) of each run of blocks, which sees one position per R tokens."""
        return [(config, 1.0)]

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token as in PaLM (Chowdhery et al. 2022, app. B): 6 matmul_parameters +
        attention's QK^T and AV over a full window. Recomputation under activation checkpointing is
        not counted: MFU measures useful model FLOPs."""
        return 6 * matmul_parameters(self) + 12 * self.config.n_layers * self.config.d_model * seq_len
