"""Reading built token shards: a global token stream over the shard files, training windows,
a resumable loader (random or sequential, optionally BOS-aligned, split across ranks), and the
classic `get_batch`.

Memmaps are opened per read and dropped at once: a long-lived memmap keeps every page it has
touched in the process's RSS, so streaming a billion tokens through one would grow memory by the
size of the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, DataError
from .build import FORMAT, INDEX_FILE
from .loader import windows_to_batch

LOADER_MODES = ("random", "sequential")


class ShardedTokens:
    """One split ('train' or 'val') of a built dataset directory as a single token stream."""

    def __init__(self, directory: str | Path, split: str = "train", expected_fingerprint: str | None = None):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise DataError(f"{self.directory} is not a built dataset (no {INDEX_FILE}); make one with "
                            f"`psannlm data build --input ... --tokenizer DIR --out {self.directory}`.")
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index_path} is not a psann token-shard index.")
        if expected_fingerprint and self.index["tokenizer_fingerprint"] != expected_fingerprint:
            raise DataError(f"{self.directory} was tokenised with another tokenizer (fingerprint "
                            f"{self.index['tokenizer_fingerprint']}, yours {expected_fingerprint}); use the tokenizer "
                            f"saved in {self.directory / 'tokenizer'} or rebuild the shards.")
        self.split = split
        self.dtype = np.dtype(self.index["dtype"])
        self.shards = self.index["shards"].get(split, [])
        sizes = [s["tokens"] for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        for shard in self.shards:
            path = self.directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise DataError(f"shard {path} is missing or has the wrong size; rebuild the dataset.")
        self._doc_starts: np.ndarray | None = None

    @property
    def bos_id(self) -> int:
        return int(self.index["bos_id"])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.n_tokens}")
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            mm = np.memmap(self.directory / self.shards[i]["file"], dtype=self.dtype, mode="r")
            parts.append(np.array(mm[max(start, lo) - lo:min(stop, hi) - lo], dtype=np.int64))
            del mm
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def doc_starts(self) -> np.ndarray:
        """Global start of every document (each begins with BOS)."""
        if self._doc_starts is None:
            parts = [np.load(self.directory / s["docs_file"]) + self.offsets[i] for i, s in enumerate(self.shards)]
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_starts


class ShardWindows:
    """Packed windows of max_length + 1 tokens overlapping by one (the `TokenWindows` interface),
    used for evaluation and to size epochs."""

    def __init__(self, data: ShardedTokens, max_length: int):
        self.data, self.max_length = data, max_length
        self._n = max(0, -(-(data.n_tokens - 1) // max_length)) if data.n_tokens >= 2 else 0

    def __len__(self) -> int:
        return self._n

    @property
    def n_target_tokens(self) -> int:
        return max(0, self.data.n_tokens - 1)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.max_length
        starts = [int(i) * L for i in indices]
        return windows_to_batch([self.data.read(s, min(s + L + 1, self.data.n_tokens)) for s in starts], L, pad_id=0)


class ShardLoader:
    """Endless training batches (x, y) of `batch_size` windows from one rank's share.

    random: window starts drawn uniformly (seeded by the batch number, so resuming needs no
    replay); the batch of all ranks is drawn together and each rank takes its own slice.
    sequential: packed windows in order; rank r takes windows r, r + world, ... . With
    `bos_aligned`, windows start at document starts instead (a document longer than the window
    is cut; a shorter one continues into the next). State: the number of batches drawn.
    """

    def __init__(self, data: ShardedTokens, max_length: int, batch_size: int, *, seed: int = 0,
                 mode: str = "random", bos_aligned: bool = False, rank: int = 0, world_size: int = 1):
        if mode not in LOADER_MODES:
            raise DataError(f"unknown loader mode {mode!r}; choose one of {', '.join(LOADER_MODES)}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        self.data, self.max_length, self.batch_size = data, max_length, batch_size
        self.seed, self.mode, self.bos_aligned, self.rank, self.world = seed, mode, bos_aligned, rank, world_size
        span = max_length + 1
        if data.n_tokens < span:
            raise DataError(f"{data.directory} ({data.split}) holds {data.n_tokens} tokens, fewer than one window "
                            f"of {span}; lower max_length or add data.")
        if bos_aligned:
            starts = data.doc_starts()
            self.starts = starts[starts <= data.n_tokens - span]
            self.n_windows = int(self.starts.shape[0])
        else:
            self.starts = None
            self.n_windows = (data.n_tokens - 1) // max_length  # full packed windows
        if self.n_windows < world_size:
            raise DataError(f"only {self.n_windows} window(s) for {world_size} ranks; add data or lower max_length.")
        self.batches = 0

    @property
    def epoch(self) -> float:
        return self.batches * self.batch_size * self.world / self.n_windows

    def _window_starts(self) -> np.ndarray:
        B, W = self.batch_size, self.world
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.batches])
            if self.bos_aligned:
                picks = self.starts[rng.integers(0, self.n_windows, size=B * W)]
            else:
                picks = rng.integers(0, self.data.n_tokens - self.max_length, size=B * W)
            return picks[self.rank * B:(self.rank + 1) * B]
        per_rank = self.n_windows // W  # equal shares, so ranks stay in step; the remainder is dropped
        k = (self.batches * B + np.arange(B)) % per_rank * W + self.rank
        return self.starts[k] if self.bos_aligned else k * self.max_length

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.max_length + 1
        rows = [self.data.read(int(s), int(s) + span) for s in self._window_starts()]
        self.batches += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": "shards", "mode": self.mode, "bos_aligned": self.bos_aligned, "seed": self.seed,
                "world_size": self.world, "batch_size": self.batch_size, "n_tokens": self.n_tokens,
                "batches": self.batches}

    @property
    def n_tokens(self) -> int:
        return self.data.n_tokens

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "bos_aligned", "seed", "world_size", "batch_size", "n_tokens"):
            if state.get(key) != getattr(self, {"world_size": "world"}.get(key, key)):
                raise CheckpointError(f"the checkpoint's data loader used {key}={state.get(key)!r}, this run "
                                      f"{getattr(self, {'world_size': 'world'}.get(key, key))!r}; resume with the "
                                      f"same data settings.")
        self.batches = int(state["batches"])


def get_batch(tokens: np.ndarray, batch_size: int, context_length: int,
              device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random windows over all valid starts: x = tokens[i:i+T], y = tokens[i+1:i+T+1],
    as LongTensors on `device` (an unknown device raises)."""
    device = torch.device(device)
    n = int(tokens.shape[0])
    if n < context_length + 1:
        raise DataError(f"need at least {context_length + 1} tokens for context_length {context_length}, got {n}.")
    starts = np.random.randint(0, n - context_length, size=batch_size)
    x = np.stack([np.asarray(tokens[s:s + context_length], dtype=np.int64) for s in starts])
    y = np.stack([np.asarray(tokens[s + 1:s + 1 + context_length], dtype=np.int64) for s in starts])
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
