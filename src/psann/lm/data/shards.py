"""Reading built token shards: a global token stream over the shard files, training windows,
a resumable loader (random or sequential, optionally BOS-aligned, split across ranks), and the
classic `get_batch`.

Memmaps are opened per batch and dropped at once: a long-lived memmap keeps every page it has
touched in the process's RSS, so streaming a billion tokens through one would grow memory by the
size of the data.

A dataset verifies itself. On open: index.json must be whole and well-formed, every shard must
have the size the index gives it, and the largest token id the build recorded must lie inside
the vocabulary. The first time a process reads a shard, the shard is hashed and scanned once
(sha256 and max id in one pass, about 1 s per GB; docs/results/huge_document.md): a shard
whose bytes changed since the build, or that holds an id outside the vocabulary, stops with a
DataError naming it. Checking lazily, shard by shard, keeps opening a huge dataset instant and
spreads the cost over the first steps. A dataset built before the index recorded hashes is
scanned for its largest id the same way and its hashes are skipped (logged at debug level).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, DataError
from ..files import read_json
from .build import FORMAT, INDEX_FILE, SHARD_HASH, scan_shard
from .loader import windows_to_batch

log = logging.getLogger("psann.lm")
LOADER_MODES = ("random", "sequential")
_DTYPES = ("uint16", "uint32")


def _rebuild(directory: Path) -> str:
    return (f"rebuild the dataset: psannlm data build --input ... --tokenizer ... --out {directory} --overwrite "
            "(or restore the directory from a copy).")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_problem(shard) -> str | None:
    if not isinstance(shard, dict):
        return f"a shard entry is {type(shard).__name__}, not an object"
    for key in ("file", "docs_file"):
        name = shard.get(key)
        if not isinstance(name, str) or not name or Path(name).name != name:
            return f"shard {shard.get('file')!r}: {key!r} must be a file name in the dataset directory, got {name!r}"
    for key, least in (("tokens", 0), ("documents", 0), ("max_id", -1)):
        if (key == "tokens" or key in shard) and not (_is_int(shard.get(key)) and shard[key] >= least):
            return f"shard {shard['file']!r}: {key!r} must be a whole number, got {shard.get(key)!r}"
    if SHARD_HASH in shard and not isinstance(shard[SHARD_HASH], str):
        return f"shard {shard['file']!r}: {SHARD_HASH!r} must be a string"
    return None


def _index_problem(index) -> str | None:
    """What is wrong with a parsed index.json, or None."""
    if not isinstance(index, dict):
        return f"it holds a JSON {type(index).__name__}, not an object"
    if index.get("format") != FORMAT:
        return f"'format' is {index.get('format')!r}, not {FORMAT!r}: it is not a psann token-shard index"
    if index.get("dtype") not in _DTYPES:
        return f"'dtype' must be one of {', '.join(_DTYPES)}, got {index.get('dtype')!r}"
    for key in ("vocab_size", "bos_id"):
        if not _is_int(index.get(key)) or index[key] < 0:
            return f"{key!r} must be a whole number, got {index.get(key)!r}"
    if not isinstance(index.get("tokenizer_fingerprint"), str):
        return "'tokenizer_fingerprint' is missing"
    shards = index.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(v, list) for v in shards.values()):
        return "'shards' must map each split to a list of shards"
    for entries in shards.values():
        for shard in entries:
            problem = _shard_problem(shard)
            if problem:
                return problem
    return None


def read_index(directory: str | Path) -> dict:
    """The checked index.json of a built dataset; a missing, truncated or malformed one is a
    DataError naming the file and the fix."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{directory} is not a built dataset (no {INDEX_FILE}); make one with "
                        f"`psannlm data build --input ... --tokenizer DIR --out {directory}`.")
    try:
        index = read_json(path, DataError, "dataset index")
    except DataError as exc:
        raise DataError(f"{exc} To fix it, {_rebuild(directory)}") from None
    problem = _index_problem(index)
    if problem:
        raise DataError(f"{path} is damaged: {problem}. To fix it, {_rebuild(directory)}")
    return index


class ShardedTokens:
    """One split ('train' or 'val') of a built dataset directory as a single token stream."""

    def __init__(self, directory: str | Path, split: str = "train", expected_fingerprint: str | None = None):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        if expected_fingerprint and self.index["tokenizer_fingerprint"] != expected_fingerprint:
            raise DataError(f"{self.directory} was tokenised with another tokenizer (fingerprint "
                            f"{self.index['tokenizer_fingerprint']}, yours {expected_fingerprint}); use the tokenizer "
                            f"saved in {self.directory / 'tokenizer'} or rebuild the shards.")
        self.split = split
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.shards = self.index["shards"].get(split, [])
        sizes = [s["tokens"] for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        for shard in self.shards:
            path = self.directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise DataError(f"shard {path} is missing or has the wrong size; {_rebuild(self.directory)}")
            if shard.get("max_id", -1) >= self.vocab_size:
                self._out_of_vocab(path, shard["max_id"])
        self._verified: set[int] = set()
        self._doc_starts: np.ndarray | None = None

    def _out_of_vocab(self, path: Path, max_id: int) -> None:
        raise DataError(f"shard {path} holds token id {max_id}: the ids exceed the vocabulary of "
                        f"{self.vocab_size} of the dataset's tokenizer (a damaged or mixed-up dataset); "
                        f"{_rebuild(self.directory)}")

    def verify(self, i: int) -> None:
        """Hash and scan shard i once per process (see the module docstring)."""
        if i in self._verified:
            return
        shard = self.shards[i]
        path = self.directory / shard["file"]
        try:
            digest, max_id = scan_shard(path, self.dtype)
        except OSError as exc:
            raise DataError(f"cannot read shard {path} ({exc}); {_rebuild(self.directory)}") from None
        if SHARD_HASH not in shard:
            log.debug("data: %s has no %s in %s (built by an older psann); only its token ids are checked.",
                      path, SHARD_HASH, INDEX_FILE)
        elif digest != shard[SHARD_HASH]:
            raise DataError(f"shard {path} is corrupt: its contents changed since the build ({SHARD_HASH} "
                            f"{digest[:16]}..., {INDEX_FILE} says {shard[SHARD_HASH][:16]}...); {_rebuild(self.directory)}")
        if max_id >= self.vocab_size:
            self._out_of_vocab(path, max_id)
        self._verified.add(i)

    def verify_all(self) -> None:
        for i in range(len(self.shards)):
            self.verify(i)

    @property
    def bos_id(self) -> int:
        return int(self.index["bos_id"])

    def read(self, start: int, stop: int, _maps: dict | None = None) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.n_tokens}")
        maps = {} if _maps is None else _maps
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            if i not in maps:
                self.verify(i)
                maps[i] = np.memmap(self.directory / self.shards[i]["file"], dtype=self.dtype, mode="r")
            parts.append(np.array(maps[i][max(start, lo) - lo:min(stop, hi) - lo], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def read_rows(self, starts, span: int) -> np.ndarray:
        """Rows tokens[s:s+span] for each start, opening each shard once for the whole batch."""
        maps: dict = {}  # dropped on return, with the pages it touched
        return np.stack([self.read(int(s), int(s) + span, maps) for s in starts])

    def doc_starts(self) -> np.ndarray:
        """Global start of every document (each begins with BOS)."""
        if self._doc_starts is None:
            parts = [self._load_starts(i) + self.offsets[i] for i in range(len(self.shards))]
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_starts

    def _load_starts(self, i: int) -> np.ndarray:
        shard = self.shards[i]
        path = self.directory / shard["docs_file"]
        try:
            starts = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path} is missing or corrupt ({exc}); {_rebuild(self.directory)}") from None
        fits = starts.ndim == 1 and starts.dtype.kind in "iu" and starts.shape[0] == shard.get("documents", len(starts))
        if not fits or (len(starts) and (starts.min() < 0 or starts.max() >= shard["tokens"])):
            raise DataError(f"{path} does not match shard {shard['file']} ({starts.shape[0]} document starts); "
                            f"{_rebuild(self.directory)}")
        return starts.astype(np.int64)


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
        maps: dict = {}
        rows = [self.data.read(s, min(s + L + 1, self.data.n_tokens), maps) for s in (int(i) * L for i in indices)]
        return windows_to_batch(rows, L, pad_id=0)


RANDOM_BLOCK = 4096  # random window starts are drawn in seeded blocks of this many windows


class ShardLoader:
    """Endless training batches (x, y) of `batch_size` windows from one rank's share.

    All ranks read one global stream of windows; each call consumes a global batch of
    batch_size x world_size windows and returns this rank's slice, so the windows of a step do
    not depend on how they are split across ranks or micro-batches.
    random: window j of the stream starts at a uniformly drawn token (or document start, with
    `bos_aligned`), drawn in seeded blocks, so any position is reached without replay.
    sequential: packed windows in order, epoch after epoch (with `bos_aligned`, windows start at
    document starts; a document longer than the window is cut, a shorter one runs into the next).
    State: the number of windows consumed; resuming works under another world size too.
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
        self.consumed = 0
        self._block, self._block_starts = -1, None

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_windows

    def _random_starts(self, ordinals: np.ndarray) -> np.ndarray:
        out = np.empty(len(ordinals), np.int64)
        blocks, offsets = np.divmod(ordinals, RANDOM_BLOCK)
        for block in np.unique(blocks):
            if block != self._block:
                rng = np.random.default_rng([self.seed, int(block)])
                if self.bos_aligned:
                    self._block_starts = self.starts[rng.integers(0, self.n_windows, size=RANDOM_BLOCK)]
                else:
                    self._block_starts = rng.integers(0, self.data.n_tokens - self.max_length, size=RANDOM_BLOCK)
                self._block = int(block)
            out[blocks == block] = self._block_starts[offsets[blocks == block]]
        return out

    def _window_starts(self) -> np.ndarray:
        ordinals = self.consumed + self.rank * self.batch_size + np.arange(self.batch_size)
        if self.mode == "random":
            return self._random_starts(ordinals)
        k = ordinals % self.n_windows
        return self.starts[k] if self.bos_aligned else k * self.max_length

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(self.data.read_rows(self._window_starts(), self.max_length + 1))
        self.consumed += self.batch_size * self.world
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": "shards", "mode": self.mode, "bos_aligned": self.bos_aligned, "seed": self.seed,
                "n_tokens": self.data.n_tokens, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "bos_aligned", "seed", "n_tokens"):
            mine = self.data.n_tokens if key == "n_tokens" else getattr(self, key)
            if state.get(key) != mine:
                raise CheckpointError(f"the checkpoint's data loader used {key}={state.get(key)!r}, this run "
                                      f"{mine!r}; resume with the same data settings.")
        self.consumed = int(state["consumed"])


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
