"""Text generation for every objective: prompts (token ids) -> the objective's sampler -> text
cut at EOS, at stop ids and at stop strings."""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from ..config import GenerateConfig
from ..objectives import Objective


def generate_text(model: nn.Module, tokenizer, objective: Objective, encoded: list[list[int]], gen: GenerateConfig, *,
                  stop_ids: set[int] = frozenset(), on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Text generated after each token-id prompt. A row ends at EOS, at any of `stop_ids` (not
    included) or at a `gen.stop` string (cut); `on_text(row, text_so_far)` streams the text of a
    row as it grows (a sampler that fills all positions at once reports each row when done)."""
    streamed, growing = set(), [IncrementalText(tokenizer) for _ in encoded]

    def should_stop(row: int, new_ids: list[int]) -> bool:
        if new_ids[-1] in stop_ids:
            return True
        text = growing[row].text(new_ids)
        if on_text is not None:
            streamed.add(row)
            on_text(row, text)
        return any(s in text for s in gen.stop)

    watch = bool(gen.stop or stop_ids or on_text)
    new = objective.sample(model, encoded, gen, tokenizer=tokenizer, should_stop=should_stop if watch else None)
    texts = [cut_at_stop(tokenizer.decode(cut_at_ids(ids, stop_ids), skip_special_tokens=True), gen.stop) for ids in new]
    for row, text in enumerate(texts if on_text else ()):
        if row not in streamed:
            on_text(row, text)
    return texts


def cut_at_ids(ids: list[int], stop_ids: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


class IncrementalText:
    """The text of a growing list of ids, equal to tokenizer.decode(ids, skip_special_tokens=True)
    at every call but decoding only the tail, so streaming n tokens costs O(n), not O(n^2). Text up
    to token `read` is settled (it ended on a whole character); each call decodes from `prefix`,
    the settled token window before that, so rules that look at neighbouring tokens (a leading
    space dropped at the start, a character split across byte tokens) act as in a whole decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.settled, self.prefix, self.read = tokenizer, "", 0, 0
        self.before = ""  # the decode of ids[prefix:read], which changes only when text settles

    def text(self, ids: Sequence[int]) -> str:
        window = self.tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(ids) < self.read or not window.startswith(self.before):  # not the list it was given, or a decoder that rewrites
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        tail = window[len(self.before):]
        if tail and not tail.endswith("\ufffd"):  # a whole character last: settle it
            self.settled += tail
            self.prefix, self.read = self.read, len(ids)
            self.before = self.tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
            return self.settled
        return self.settled + tail
