"""H-Net (base "hnet"): a byte-level hierarchy with dynamic chunking (Hwang et al. 2025).

Each chunking stage, outer to inner: encoder blocks -> router (where does a chunk start?) ->
downsample to the chunk starts -> the inner stage (recursively; the innermost is a plain stack of
blocks) -> EMA dechunk back to every position -> plus a zero-initialised residual projection of
the encoder output -> decoder blocks. Widths may grow inwards: a learned (zero-init) pad vector
widens what goes in, and the output is sliced back.

Router: p[t] = (1 - cos(Wq h[t], Wk h[t-1])) / 2, with p = 1 at the first position and at every
BOS of a packed batch; a chunk starts where p > 0.5. Dechunk: zbar[j] = P[j] z[j] + (1 - P[j])
zbar[j-1] over chunks (the HGRN scan), and every position reads the zbar of its chunk. The output
is multiplied by a straight-through 1 carrying c = p (start) or 1 - p (inside) so the router gets
a gradient. The ratio loss N/(N-1) ((N-1) F G + (1-F)(1-G)), F = fraction of starts, G = mean p,
is smallest (1) at F = G = 1/N and steers each stage to N positions per chunk.

Causal throughout: the router looks back one position, a chunk is only read from its start on,
and the inner stage is causal over chunks. Incremental decoding keeps, per stage, the encoder and
decoder caches, the previous encoder output, the current zbar and the inner stage's cache; rows
whose byte opens no chunk write a masked slot into the inner caches (as left padding does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import ConfigError
from ..tokenizers.byte import BOS_ID
from .byte import make_byte_block, new_block_cache
from .layers import KVCache, LanguageModel, RMSNorm, RotaryEmbedding, init_weights, run_blocks, soft_cap
from .scan import linear_scan


def stage_config(config: ModelConfig, width: int, n_layers: int) -> ModelConfig:
    """The flat config of the blocks of one stage (width `width`; n_layers scales the init)."""
    return dataclasses.replace(config, d_model=width, n_layers=max(1, n_layers))


class Stack(nn.Module):
    """A run of causal blocks at one width, with its own rotary table."""

    def __init__(self, config: ModelConfig, n_blocks: int):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(make_byte_block(config, i) for i in range(n_blocks))
        attention = config.layer_type == "transformer" and n_blocks > 0
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta) if attention else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_blocks(self.blocks, x, rope=self.rope, causal=True, cache=cache, attention_mask=attention_mask)

    def new_cache(self, batch_size: int, max_len: int, like: torch.Tensor) -> KVCache:
        return new_block_cache(self.config, len(self.blocks), batch_size, max_len, like.device, like.dtype)


class Router(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)

    def reset_parameters(self) -> None:
        nn.init.eye_(self.q.weight)  # identity: p starts as the plain cosine distance of neighbours
        nn.init.eye_(self.k.weight)

    def forward(self, h: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(self.q(h).float(), self.k(previous).float(), dim=-1)
        return ((1 - cos) / 2).clamp(0.0, 1.0)


def straight_through_one(c: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in forward, gradient of c in backward."""
    return 1.0 + (c - c.detach())


def ratio_loss(boundaries: torch.Tensor, probs: torch.Tensor, target: float) -> torch.Tensor:
    F_ = boundaries.float().mean()  # no gradient: a count
    G = probs.mean()
    return target / (target - 1) * ((target - 1) * F_ * G + (1 - F_) * (1 - G))


def chunk(h: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample h (B, T, D) to the positions where `starts` (B, T) is true, in order, right-padded
    to the longest row. -> (chunks (B, M, D), index (B, M) of each chunk's position)."""
    n_chunks = int(starts.sum(1).max())
    # Chunk starts first, in order (a stable sort of "not a start"), then padding.
    index = torch.argsort((~starts).to(torch.int8), dim=1, stable=True)[:, :n_chunks]
    return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1])), index


def dechunk(z: torch.Tensor, p: torch.Tensor, starts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Upsample chunk outputs z (B, M, D) back to (B, T, D): the EMA zbar[j] = P[j] z[j] +
    (1 - P[j]) zbar[j-1] with P the chunk start's p, read at every position of chunk j."""
    P = p.gather(1, index).clamp(1e-4, 1 - 1e-4)[..., None]
    zbar = linear_scan((1 - P).expand_as(z), P * z.float()).to(z.dtype)
    return zbar.gather(1, (starts.cumsum(1) - 1)[..., None].expand(-1, -1, z.shape[-1]))


@dataclass
class StageCache:
    mask: torch.Tensor                 # (B, steps) 1 where this stage received a position
    blocks: KVCache                    # main stack (innermost) or encoder
    decoder: KVCache | None = None
    inner: "StageCache | None" = None
    previous: torch.Tensor | None = None  # (B, D) last encoder output, the router's h[t-1]
    seen: torch.Tensor | None = None      # (B,) a position has been received
    zbar: torch.Tensor | None = None      # (B, D) fp32 EMA of the current chunk


@dataclass
class HNetCache:
    stage: StageCache
    max_len: int
    length: int = 0


class HNetStage(nn.Module):
    def __init__(self, config: ModelConfig, level: int, total_blocks: int):
        super().__init__()
        widths, blocks = config.widths, config.num_blocks[level]
        self.level, self.width = level, widths[level]
        self.lr_mult_subtree = (config.stage_lr_mult or [1.0] * len(widths))[level]
        cfg = stage_config(config, self.width, total_blocks)
        if level == len(widths) - 1:
            self.main, self.inner = Stack(cfg, blocks[0]), None
            return
        self.encoder = Stack(cfg, blocks[0])
        self.router = Router(self.width)
        self.inner = HNetStage(config, level + 1, total_blocks)
        self.decoder = Stack(cfg, blocks[2])
        self.residual_proj = nn.Linear(self.width, self.width, bias=False)
        extra = widths[level + 1] - self.width
        self.pad = nn.Parameter(torch.zeros(extra)) if extra else None
        self.target = config.compression_targets[level]

    def reset_parameters(self) -> None:
        if self.inner is not None:
            self.router.reset_parameters()
            nn.init.zeros_(self.residual_proj.weight)  # the hierarchy starts as a no-op around the encoder
            self.inner.reset_parameters()

    def _widen(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        return torch.cat([x, self.pad.to(x.dtype).expand(*x.shape[:-1], -1)], dim=-1)

    def _residual(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # kept in fp32, as the paper does
            return self.residual_proj(h.float()).to(h.dtype)

    # -- whole sequences -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, force: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
        """x (B, T, D) -> (B, T, D) and per-stage statistics, outer to inner. `force` (B, T) marks
        positions that must open a chunk; `real` (B, T) the positions that are not batch padding
        (inner stages are right-padded to the longest row's chunk count)."""
        if self.inner is None:
            return self.main(x), []
        h = self.encoder(x)
        p = self.router(h, F.pad(h[:, :-1], (0, 0, 1, 0)))
        start = torch.zeros_like(p, dtype=torch.bool)
        start[:, 0] = True
        if force is not None:
            start |= force
        p = torch.where(start, torch.ones_like(p), p)
        b = p > 0.5
        chunks, index = chunk(h, b)
        keep = real if real is not None else torch.ones_like(b)
        # padding sits at the end of a row, so a row's real chunks are its first (b & keep).sum()
        chunk_real = torch.arange(chunks.shape[1], device=x.device)[None] < (b & keep).sum(1)[:, None]
        z, inner_stats = self.inner(self._widen(chunks), real=chunk_real)
        upsampled = dechunk(z[..., :self.width], p, b, index)
        c = torch.where(b, p, 1 - p)
        y = upsampled * straight_through_one(c)[..., None].to(upsampled.dtype) + self._residual(h)
        stats = {"ratio_loss": ratio_loss(b[keep], p[keep], self.target),
                 "compression": keep.sum() / b[keep].sum().clamp_min(1)}
        return self.decoder(y), [stats, *inner_stats]

    # -- one position at a time -------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, like: torch.Tensor) -> StageCache:
        mask = torch.zeros(batch_size, 0, dtype=torch.long, device=like.device)
        if self.inner is None:
            return StageCache(mask, self.main.new_cache(batch_size, max_len, like))
        state = like.new_zeros(batch_size, self.width)
        return StageCache(mask, self.encoder.new_cache(batch_size, max_len, like),
                          self.decoder.new_cache(batch_size, max_len, like),
                          self.inner.new_cache(batch_size, max_len, like), previous=state,
                          seen=torch.zeros(batch_size, dtype=torch.bool, device=like.device),
                          zbar=state.float())

    def step(self, x: torch.Tensor, valid: torch.Tensor, cache: StageCache,
             force: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 1, D) for the rows where `valid` (B,) is true; other rows write a masked slot."""
        cache.mask = torch.cat([cache.mask, valid[:, None].long()], dim=1)
        if self.inner is None:
            return self.main(x, cache.blocks, cache.mask)
        h = self.encoder(x, cache.blocks, cache.mask)
        p = self.router(h, cache.previous[:, None])[:, 0]
        start = ~cache.seen if force is None else ~cache.seen | force
        p = torch.where(start, torch.ones_like(p), p)
        b = (p > 0.5) & valid
        cache.previous = torch.where(valid[:, None], h[:, 0], cache.previous)
        cache.seen = cache.seen | valid
        z = self.inner.step(self._widen(h), b, cache.inner)[:, 0, :self.width]
        P = p.clamp(1e-4, 1 - 1e-4)[:, None]
        cache.zbar = torch.where(b[:, None], P * z.float() + (1 - P) * cache.zbar, cache.zbar)
        y = cache.zbar[:, None].to(h.dtype) + self._residual(h)
        return self.decoder(y, cache.decoder, cache.mask)

    # -- accounting --------------------------------------------------------------------------------
    def stages(self) -> list["HNetStage"]:
        return [self] + (self.inner.stages() if self.inner is not None else [])

    def own_parameters(self) -> int:
        inner = {id(p) for p in self.inner.parameters()} if self.inner is not None else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in inner)

    def stacks(self) -> list[Stack]:
        return [self.main] if self.inner is None else [self.encoder, self.decoder]

    def attention_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.stacks() if s.config.layer_type == "transformer")


class HNetLM(LanguageModel):
    tokenizer, vocab_size = "byte", 256
    causal_only = "H-Net's chunking is causal"

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        widths, blocks = config.widths, config.num_blocks
        if blocks is None or len(widths) != len(blocks) or len(widths) < 2:
            raise ConfigError("base 'hnet' needs model.d_model as a list of stage widths and model.num_blocks with one "
                              "entry per width, at least two: e.g. d_model: [384, 512], num_blocks: [[3, 0, 3], [6]].")
        for i, stage in enumerate(blocks[:-1]):
            if len(stage) != 3 or stage[1] != 0 or min(stage) < 0:
                raise ConfigError(f"'model.num_blocks[{i}]' must be [encoder, 0, decoder] (the middle is the inner stage), got {stage}.")
        if len(blocks[-1]) != 1 or blocks[-1][0] < 1:
            raise ConfigError(f"'model.num_blocks[-1]' is the innermost stage: [main blocks], got {blocks[-1]}.")
        if any(b < a for a, b in zip(widths, widths[1:])):
            raise ConfigError(f"'model.d_model' stage widths must not shrink towards the inside, got {widths}.")
        if config.changed(["n_layers"]):
            raise ConfigError("base 'hnet' takes its depth from model.num_blocks; remove model.n_layers.")
        for key, n in (("target_compression", len(widths) - 1), ("stage_lr_mult", len(widths))):
            value = getattr(config, key)
            if value is not None and len(value) != n:
                raise ConfigError(f"'model.{key}' needs {n} value(s) for {len(widths)} stages, got {value}.")
        if config.target_compression is not None and min(config.target_compression) <= 1:
            raise ConfigError(f"'model.target_compression' values must be > 1 (bytes per chunk), got {config.target_compression}.")
        if config.layer_type == "transformer" and not config.rope:
            raise ConfigError("base 'hnet' positions its attention blocks with RoPE; remove model.rope=false.")
        if config.d_mlp is not None:
            raise ConfigError("base 'hnet' sizes each stage's MLP from its width; set model.hidden_ratio instead of model.d_mlp.")

    @classmethod
    def block_stacks(cls, config: ModelConfig) -> list[tuple[ModelConfig, float]]:
        """Each stage's blocks at its width, for the share of bytes that reach it."""
        stacks, rate = [], 1.0
        for width, blocks, target in zip(config.widths, config.num_blocks, config.compression_targets + [1.0]):
            stacks.append((stage_config(config, width, sum(blocks)), rate))
            rate *= target
        return stacks

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        total_blocks = sum(sum(stage) for stage in config.num_blocks)
        width = config.widths[0]
        self.lr_mult_subtree = (config.stage_lr_mult or [1.0])[0]  # embedding and head train with stage 0
        self.embed = nn.Embedding(config.vocab_size, width)
        self.stage = HNetStage(config, 0, total_blocks)
        self.norm = RMSNorm(width, config.norm_eps)
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        init_weights(self, stage_config(config, width, total_blocks))
        self.stage.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def blocks(self) -> list[nn.Module]:
        """Every block of every stage, outer to inner: what `parallelize` checkpoints, compiles and
        shards one by one."""
        return [block for stage in self.stage.stages() for stack in stage.stacks() for block in stack.blocks]

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> HNetCache:
        like = self.embed.weight
        like = like.new_empty(0, device=device or like.device, dtype=dtype or like.dtype)
        return HNetCache(self.stage.new_cache(batch_size, max_len, like), max_len)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: HNetCache | None = None,
                last_only: bool = False, return_aux: bool = False):
        """Logits (B, T, V) (or (B, 1, V) with last_only); with return_aux also
        {"loss": weighted ratio loss, "metrics": per-stage ratio loss and compression}.

        With a cache, or a mask with padding, positions run one at a time through the incremental
        path (which handles per-row chunking); otherwise the whole batch is chunked at once.
        """
        if position_ids is not None:
            raise ValueError("base 'hnet' takes no position_ids: positions are counted inside each stage.")
        B, T = input_ids.shape
        stats: list[dict] = []
        if cache is not None or (attention_mask is not None and not bool(attention_mask.all())):
            cache = cache if cache is not None else self.new_cache(B, T)
            if cache.length + T > cache.max_len:
                raise RuntimeError(f"H-Net cache overflow: {cache.length + T} positions > capacity {cache.max_len}.")
            valid = (attention_mask[:, cache.length:cache.length + T].bool() if attention_mask is not None
                     else torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
            outs = []
            for t in range(T):
                ids = input_ids[:, t]
                outs.append(self.stage.step(self.embed(ids)[:, None], valid[:, t], cache.stage, force=ids == BOS_ID))
                cache.length += 1
            x = torch.cat(outs, dim=1)
        else:
            x, stats = self.stage(self.embed(input_ids), force=input_ids == BOS_ID)
        if last_only:
            x = x[:, -1:]
        logits = soft_cap(self.lm_head(self.norm(x)), self.config.logit_softcap)
        if not return_aux:
            return logits
        loss = sum((s["ratio_loss"] for s in stats), torch.zeros((), device=logits.device))
        metrics = {}
        for i, s in enumerate(stats):
            metrics[f"stage{i}_ratio_loss"] = s["ratio_loss"].detach()
            metrics[f"stage{i}_compression"] = s["compression"].detach()
        return logits, {"loss": self.config.ratio_loss_weight * loss, "metrics": metrics}

    def flops_per_token(self, seq_len: int) -> int:
        """6 x parameters each byte passes through, stage by stage: a stage at cumulative target
        compression R runs once per R bytes; attention adds 12 x blocks x width x (seq_len / R)."""
        total, rate = 6 * self.lm_head.weight.numel(), 1.0
        for stage in self.stage.stages():
            attention = 12 * stage.attention_blocks() * stage.width * seq_len / rate
            total += (6 * stage.own_parameters() + attention) / rate
            rate *= getattr(stage, "target", 1.0)
        return int(total)
