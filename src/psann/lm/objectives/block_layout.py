"""The layout of a window for block diffusion (block_diffusion.py): a clean causal stream, then one
segment per block (an anchor and the block's noised tokens), with the positions each reads, the
token each output predicts and who may see whom."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..data.shards import IGNORE_INDEX
from .base import ModelInput

CLEAN, ANCHOR, NOISED = 0, 1, 2


@dataclass(frozen=True)
class BlockLayout:
    """Where each of the T positions of a laid-out window reads from, and what it may see."""

    source: torch.Tensor      # (T,) the window index whose token (and position) it takes
    kind: torch.Tensor        # (T,) CLEAN, ANCHOR or NOISED
    predicts: torch.Tensor    # (T,) the window index its output predicts, -1 for none
    block_of: torch.Tensor    # (L,) the block of each window index
    first_anchor: torch.Tensor  # (T,) True at the first block's anchor, which reads the mask token
    visible: torch.Tensor     # (T, T) True where a query (row) may see a key (column)


@functools.lru_cache(maxsize=16)
def block_layout(length: int, block: int) -> BlockLayout:
    """The layout of a window of `length` tokens in blocks of `block` (the last may be shorter)."""
    starts = list(range(0, length, block))
    clean = starts[-1]  # the last block is read by nothing after it
    source, kind, predicts, block_ids = list(range(clean)), [CLEAN] * clean, [-1] * clean, [-1] * clean
    for b, start in enumerate(starts):
        end = min(length, start + block)
        source += [max(start - 1, 0), *range(start, end)]
        kind += [ANCHOR] + [NOISED] * (end - start)
        predicts += [*range(start, end), -1]
        block_ids += [b] * (end - start + 1)
    source, kind, block_ids = torch.tensor(source), torch.tensor(kind), torch.tensor(block_ids)
    T = len(source)
    query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    clean_q, clean_k = (kind == CLEAN)[:, None], (kind == CLEAN)[None, :]
    block_start = torch.tensor(starts)[block_ids.clamp(min=0)]
    visible = ((clean_q & clean_k & (key <= query))
               | (~clean_q & clean_k & (source[None, :] < block_start[:, None]))
               | (~clean_q & ~clean_k & (block_ids[:, None] == block_ids[None, :])))
    first_anchor = torch.arange(T) == clean
    return BlockLayout(source, kind, torch.tensor(predicts), torch.arange(length) // block, first_anchor, visible)


def laid_out(x: torch.Tensor, masked: torch.Tensor, layout: BlockLayout, mask_id: int) -> ModelInput:
    """The model input of windows x (B, L) whose `masked` tokens are hidden (padding is seen as
    it is, as the whole-window objective sees it)."""
    ids = x[:, layout.source]
    hide = ((layout.kind == NOISED) & masked[:, layout.source].to(ids.device)) | layout.first_anchor.to(ids.device)
    ids = torch.where(hide, torch.full_like(ids, mask_id), ids)
    return ModelInput(ids, {"position_ids": layout.source[None], "visible": layout.visible})


def block_targets(x: torch.Tensor, masked: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, T): the token each output predicts where it is masked, IGNORE_INDEX elsewhere;
    the block index of each output's target, (T,))."""
    index = layout.predicts.clamp(min=0)
    scored = (layout.predicts >= 0) & masked[:, index]
    targets = torch.where(scored, x[:, index], torch.full_like(x[:, index], IGNORE_INDEX))
    return targets, layout.block_of[index]
