"""Fixed-length training windows over a TokenCorpus, and a seeded loader whose state resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import CheckpointError
from .tokens import TokenCorpus

IGNORE_INDEX = -100


class TokenWindows:
    """Windows of max_length + 1 tokens: x = w[:-1], y = w[1:] (labels shifted exactly once).

    Packed: consecutive windows over the whole stream overlapping by one token, so every token
    after the first is a target exactly once. Unpacked: the same, within each document. A short
    tail window is padded; padded targets are IGNORE_INDEX so they never count in the loss.
    """

    def __init__(self, corpus: TokenCorpus, max_length: int, pack: bool, pad_id: int):
        self.corpus, self.max_length, self.pad_id = corpus, max_length, pad_id
        L = max_length
        if pack:
            segments = [(0, corpus.n_tokens)]
        else:
            segments = zip(corpus.doc_starts[:-1].tolist(), corpus.doc_starts[1:].tolist())
        starts, ends = [], []
        for seg_start, seg_end in segments:
            n = math.ceil((seg_end - seg_start - 1) / L) if seg_end - seg_start >= 2 else 0
            s = seg_start + L * np.arange(n, dtype=np.int64)
            starts.append(s)
            ends.append(np.minimum(s + L + 1, seg_end))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def n_target_tokens(self) -> int:
        return int((self.ends - self.starts - 1).sum())

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch([self.corpus.tokens[self.starts[i]:self.ends[i]] for i in indices],
                                self.max_length, self.pad_id)


def windows_to_batch(windows: list[np.ndarray], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of up to max_length + 1 tokens -> (x, y): y is x shifted by one; a short window's
    padded targets are IGNORE_INDEX."""
    x = torch.full((len(windows), max_length), pad_id, dtype=torch.long)
    y = torch.full((len(windows), max_length), IGNORE_INDEX, dtype=torch.long)
    for row, window in enumerate(windows):
        w = torch.from_numpy(np.asarray(window, dtype=np.int64))
        x[row, :len(w) - 1] = w[:-1]
        y[row, :len(w) - 1] = w[1:]
    return x, y


class WindowLoader:
    """Endless batches of windows: a fresh seeded permutation per epoch, batches may span epochs.

    Data parallel: every call consumes one global batch of batch_size x world_size windows from
    the shared stream and returns this rank's slice, so the data a step sees does not depend on
    how it is split. The whole state is one integer (windows consumed globally): resuming costs
    one permutation, never a replay, and works under another world size or micro-batch size.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if len(windows) == 0:
            raise ValueError("WindowLoader needs at least one window")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
        self.rank, self.world = rank, world_size
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.windows)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.windows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.windows)
        ordinals = self.consumed + self.rank * self.batch_size + np.arange(self.batch_size)
        self.consumed += self.batch_size * self.world
        epochs, offsets = np.divmod(ordinals, n)
        picked = np.concatenate([self._order(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])
        return self.windows.batch(picked)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "n_windows": len(self.windows), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != len(self.windows) or state["seed"] != self.seed:
            raise CheckpointError(
                f"cannot resume the data loader: the checkpoint was written for {state['n_windows']} windows "
                f"(seed {state['seed']}), this data has {len(self.windows)} (seed {self.seed}). Resume with the same "
                "data, tokenizer, max_length and seed, or start a new run with train.init_from.")
        self.consumed = int(state["consumed"])
