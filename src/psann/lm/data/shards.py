"""Reading token shards (the format tokens.py writes, for every source): one split as a global
token stream over the shard files (with the target flags of SFT data), the training windows over
it, the loader that draws batches from them (its whole state one integer), and the classic
`get_batch`.

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
from .tokens import FORMAT, INDEX_FILE, SHARD_HASH, scan_shard

log = logging.getLogger("psann.lm")
_DTYPES = ("uint16", "uint32")


def _rebuild(directory: Path) -> str:
    return (f"rebuild the dataset: psannlm data build --input ... --tokenizer ... --out {directory} --overwrite "
            "(or restore the directory from a copy).")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_problem(shard) -> str | None:
    if not isinstance(shard, dict):
        return f"a shard entry is {type(shard).__name__}, not an object"
    for key in ("file", "docs_file", "mask_file"):
        if key == "mask_file" and key not in shard:
            continue
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
            if "mask_file" in shard:  # one byte per token
                mask = self.directory / shard["mask_file"]
                if not mask.is_file() or mask.stat().st_size != shard["tokens"]:
                    raise DataError(f"target mask {mask} is missing or has the wrong size; {_rebuild(self.directory)}")
            if shard.get("max_id", -1) >= self.vocab_size:
                self._out_of_vocab(path, shard["max_id"])
        self._verified: set[int] = set()
        self._doc_starts: np.ndarray | None = None
        self.temporary = None  # a TemporaryDirectory holding the dataset, kept alive by its readers

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

    def _memmap(self, i: int, mask: bool) -> np.memmap:
        """Shard i's ids (or target flags), verified first; callers drop it soon (module docstring)."""
        self.verify(i)
        name, dtype = (self.shards[i]["mask_file"], np.uint8) if mask else (self.shards[i]["file"], self.dtype)
        return np.memmap(self.directory / name, dtype=dtype, mode="r")

    def read(self, start: int, stop: int, *, mask: bool = False) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64 (with `mask`, their target flags as bool),
        across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.n_tokens}")
        parts = []
        for i in range(int(np.searchsorted(self.offsets, start, side="right")) - 1, len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            parts.append(np.array(self._memmap(i, mask)[max(start, lo) - lo:min(stop, hi) - lo],
                                  dtype=bool if mask else np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, bool if mask else np.int64)

    def take(self, positions: np.ndarray, *, mask: bool = False) -> np.ndarray:
        """Tokens (int64; with `mask`, target flags) at global stream positions, an array of any
        shape: a batch of windows is one gather per shard it touches."""
        flat = np.asarray(positions, dtype=np.int64).reshape(-1)
        if flat.size and not (0 <= flat.min() and flat.max() < self.n_tokens):
            raise IndexError(f"token positions outside 0..{self.n_tokens}")
        out = np.empty(flat.shape, bool if mask else np.int64)
        if len(self.shards) == 1:  # a data cache: one shard per split
            out[:] = self._memmap(0, mask)[flat]
        elif flat.size:
            shard = np.searchsorted(self.offsets, flat, side="right") - 1
            for i in range(int(shard.min()), int(shard.max()) + 1):
                here = shard == i
                if here.any():
                    out[here] = self._memmap(i, mask)[flat[here] - self.offsets[i]]
        return out.reshape(np.shape(positions))

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


IGNORE_INDEX = -100
LAYOUTS = ("packed", "documents", "examples")
LOADER_MODES = ("shuffle", "random", "sequential")


class Windows:
    """Windows of up to max_length + 1 tokens: x = w[:-1], y = w[1:] (labels shifted exactly once).

    packed: consecutive windows over the whole stream overlapping by one token, so every token
    after the first is a target exactly once. documents: the same within each document.
    examples (SFT): one window per document, its first max_length + 1 tokens, whose targets are
    the tokens the dataset flags (the answers); a document with no flagged target in its window
    is skipped (counted in `skipped`). A short window's inputs are padded with `pad_id` and its
    targets with `pad_target` (IGNORE_INDEX: never in the loss; diffusion SFT pads answers with EOS).
    """

    def __init__(self, data: ShardedTokens, max_length: int, layout: str = "packed", *, pad_id: int = 0,
                 pad_target: int = IGNORE_INDEX):
        if layout not in LAYOUTS:
            raise DataError(f"unknown window layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
        self.data, self.max_length, self.layout = data, max_length, layout
        self.pad_id, self.pad_target = pad_id, pad_target
        self.masked, self.skipped = layout == "examples", 0
        n, L = data.n_tokens, max_length
        if layout == "packed":
            lows, highs = np.zeros(1, np.int64), np.full(1, n, np.int64)
        else:
            lows = data.doc_starts()
            highs = np.append(lows[1:], n).astype(np.int64)
        if layout == "examples":
            highs = np.minimum(highs, lows + L + 1)
            flagged = np.concatenate([[0], np.cumsum(data.read(0, n, mask=True), dtype=np.int64)])
            targets = flagged[highs] - flagged[lows + 1]  # flagged tokens after each window's first
            keep = targets > 0
            self.skipped = int((~keep).sum())
            self.starts, self.ends, self._targets = lows[keep], highs[keep], int(targets[keep].sum())
            if not len(self.starts):
                raise DataError(f"no example has an answer token within max_length ({max_length}) tokens; "
                                "raise data.max_length.")
            return
        counts = np.where(highs - lows >= 2, -(-(highs - lows - 1) // L), 0)  # ceil((len - 1) / L) windows
        self.starts = np.repeat(lows, counts) + L * (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        self.ends = np.minimum(self.starts + L + 1, np.repeat(highs, counts))
        self._targets = int((self.ends - self.starts - 1).sum())

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def n_target_tokens(self) -> int:
        return self._targets

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.starts[indices], self.ends[indices]
        positions = np.minimum(starts[:, None] + np.arange(self.max_length + 1), ends[:, None] - 1)
        tokens = self.data.take(positions)
        real = (starts[:, None] + np.arange(1, self.max_length + 1)) < ends[:, None]  # x[j], y[j] inside the window
        targets = tokens[:, 1:]
        if self.masked:
            targets = np.where(self.data.take(positions[:, 1:], mask=True), targets, IGNORE_INDEX)
        if real.all():  # full windows (nearly all of a packed stream): nothing to pad
            return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(np.ascontiguousarray(targets))
        return torch.from_numpy(np.where(real, tokens[:, :-1], self.pad_id)), torch.from_numpy(np.where(real, targets, self.pad_target))


RANDOM_BLOCK = 4096  # random window starts are drawn in seeded blocks of this many windows


class Loader:
    """Endless training batches (x, y) of `batch_size` windows from one rank's share.

    All ranks read one global stream of windows; each call consumes a global batch of
    batch_size x world_size windows and returns this rank's slice, so the windows of a step do
    not depend on how they are split across ranks or micro-batches.
    shuffle: the windows in a fresh seeded permutation per epoch (batches may span epochs).
    random: window j starts at a uniformly drawn token (or document start, with `bos_aligned`),
    drawn in seeded blocks, so any position is reached without replay.
    sequential: packed windows in order, epoch after epoch (with `bos_aligned`, windows start at
    document starts; a document longer than the window is cut, a shorter one runs into the next).
    random and sequential read full windows straight from the token stream.
    State: the number of windows consumed; resuming costs no replay and works under another
    world size or micro-batch size.
    """

    def __init__(self, windows: Windows, batch_size: int, *, seed: int = 0, mode: str = "shuffle",
                 bos_aligned: bool = False, rank: int = 0, world_size: int = 1):
        if mode not in LOADER_MODES:
            raise DataError(f"unknown loader mode {mode!r}; choose one of {', '.join(LOADER_MODES)}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        if bos_aligned and mode == "shuffle":
            raise DataError("bos_aligned works with the random and sequential modes, not shuffle.")
        self.windows, self.data, self.max_length = windows, windows.data, windows.max_length
        self.batch_size, self.seed, self.mode, self.bos_aligned = batch_size, seed, mode, bos_aligned
        self.rank, self.world = rank, world_size
        self.consumed = 0
        self._cached_key, self._cached = None, None  # the last permutation or block of random starts
        span, data = self.max_length + 1, self.data
        self.starts = None
        if mode == "shuffle":
            self.n_windows = len(windows)
            if not self.n_windows:
                raise DataError("the training data makes no window (it needs at least 2 tokens).")
        elif data.n_tokens < span:
            raise DataError(f"{data.directory} ({data.split}) holds {data.n_tokens} tokens, fewer than one window "
                            f"of {span}; lower max_length or add data.")
        elif bos_aligned:
            starts = data.doc_starts()
            self.starts = starts[starts <= data.n_tokens - span]
            self.n_windows = int(self.starts.shape[0])
        else:
            self.n_windows = (data.n_tokens - 1) // self.max_length  # full packed windows

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_windows

    def _memo(self, key, make):
        if key != self._cached_key:
            self._cached_key, self._cached = key, make()
        return self._cached

    def _permutation(self, epoch: int) -> np.ndarray:
        return self._memo(epoch, lambda: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))

    def _random_block(self, block: int) -> np.ndarray:
        def draw():
            rng = np.random.default_rng([self.seed, block])
            if self.bos_aligned:
                return self.starts[rng.integers(0, self.n_windows, size=RANDOM_BLOCK)]
            return rng.integers(0, self.data.n_tokens - self.max_length, size=RANDOM_BLOCK)
        return self._memo(block, draw)

    def _ordinals(self) -> np.ndarray:
        """Positions in the global stream of this rank's windows of the next batch."""
        return self.consumed + self.rank * self.batch_size + np.arange(self.batch_size)

    def _window_starts(self) -> np.ndarray:
        """First token of each window of the next batch (random and sequential modes)."""
        ordinals = self._ordinals()
        if self.mode == "sequential":
            k = ordinals % self.n_windows
            return self.starts[k] if self.bos_aligned else k * self.max_length
        starts = np.empty(len(ordinals), np.int64)
        blocks, offsets = np.divmod(ordinals, RANDOM_BLOCK)
        for block in np.unique(blocks):
            starts[blocks == block] = self._random_block(int(block))[offsets[blocks == block]]
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "shuffle":
            epochs, offsets = np.divmod(self._ordinals(), self.n_windows)
            self.consumed += self.batch_size * self.world
            picked = np.concatenate([self._permutation(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])
            return self.windows.batch(picked)
        starts = self._window_starts()
        self.consumed += self.batch_size * self.world
        batch = torch.from_numpy(self.data.take(starts[:, None] + np.arange(self.max_length + 1)))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "bos_aligned": self.bos_aligned, "n_windows": self.n_windows,
                "n_tokens": self.data.n_tokens, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume; refuses a state written for other data or settings. Also reads the states of
        the two loaders that came before this one (a shuffle state has no mode, a shard state no
        n_windows)."""
        mode = state.get("mode", "shuffle")
        keys = ("mode", "seed", "bos_aligned", "n_windows" if mode == "shuffle" else "n_tokens")
        theirs = {"bos_aligned": False, **state, "mode": mode}
        mine = self.state_dict()
        for key in keys:
            if theirs.get(key) != mine[key]:
                raise CheckpointError(
                    f"cannot resume the data loader: the checkpoint's loader had {key}={theirs.get(key)!r}, this run "
                    f"{mine[key]!r}. Resume with the same data, tokenizer, max_length, seed and sampling (data.sampling="
                    f"{theirs['mode']}), or start "
                    "a new run with train.init_from.")
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
