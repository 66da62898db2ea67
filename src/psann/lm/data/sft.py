"""Supervised fine-tuning data: prompt/response pairs as fixed windows whose loss covers the response.

A JSONL file holds one `{"prompt": ..., "response": ...}` object per line. Each pair becomes
[BOS prompt response EOS], cut to max_length + 1 tokens from the right, then padded. Causal
models: prompt targets and padding are IGNORE_INDEX. Diffusion models (`eos_padding`): the
window is padded with EOS and those EOS count as response tokens (the model learns where an
answer ends); the objective never masks the prompt (see `response_positions`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .loader import IGNORE_INDEX


def read_sft_jsonl(paths: list[str | os.PathLike]) -> list[tuple[str, str]]:
    pairs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"SFT file not found: {path}. Give JSONL files with one {{\"prompt\", \"response\"}} per line.")
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}).") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
                raise DataError(f"{path}:{number}: each line must be an object with string fields \"prompt\" and "
                                f"\"response\", got {line[:80]!r}.")
            pairs.append((row["prompt"], row["response"]))
    if not pairs:
        raise DataError(f"no prompt/response pairs in {', '.join(map(str, paths))}.")
    return pairs


class SFTWindows:
    """The window interface of TokenWindows (len, batch, max_length) over prompt/response pairs."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, eos_id: int,
                 eos_padding: bool):
        self.max_length, self.pad_id, self.eos_id, self.eos_padding = max_length, pad_id, eos_id, eos_padding
        self.rows: list[tuple[np.ndarray, int]] = []
        for prompt, response in pairs:
            if len(prompt) >= max_length:  # no room for a response target
                continue
            ids = np.asarray(prompt + response, dtype=np.int64)[:max_length + 1]
            self.rows.append((ids, len(prompt)))
        self.skipped = len(pairs) - len(self.rows)
        if not self.rows:
            raise DataError(f"every prompt is at least max_length ({max_length}) tokens; raise data.max_length.")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_target_tokens(self) -> int:
        return sum(len(ids) - prompt for ids, prompt in self.rows)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.max_length
        fill = self.eos_id if self.eos_padding else self.pad_id
        x = torch.full((len(indices), L), fill, dtype=torch.long)
        y = torch.full((len(indices), L), self.eos_id if self.eos_padding else IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(indices):
            ids, prompt = self.rows[int(i)]
            w = torch.from_numpy(ids)
            x[row, :len(w) - 1] = w[:-1]
            y[row, :len(w) - 1] = w[1:]
            y[row, :prompt - 1] = IGNORE_INDEX  # targets that are still prompt tokens
        return x, y


def response_positions(y: torch.Tensor) -> torch.Tensor:
    """(B, L) True where the input x[t] is a response token: its own target slot, y[t-1], is
    scored. The first position (BOS) never is."""
    positions = torch.zeros_like(y, dtype=torch.bool)
    positions[:, 1:] = y[:, :-1] != IGNORE_INDEX
    return positions
