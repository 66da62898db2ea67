"""Build a token dataset: sources -> filters -> tokenizer (worker processes) -> token shards
(the format is written by tokens.py).

Output directory:
    index.json              dtype, vocab size, tokenizer fingerprint, shards, sources, filters, counts;
                            per shard its tokens, documents, largest token id and sha256
    tokenizer/              the tokenizer the shards were made with
    train_00000.bin ...     raw token ids (uint16 when the vocabulary fits, else uint32): BOS doc EOS ...
    train_00000.docs.npy    int64 start of every document in the shard
    val_00000.bin ...       the held-out documents (chosen per document by a seeded hash)

Deterministic for a given input (results come back in document order whatever the worker count).
One build at a time per output directory (an OS lock on ``out/.lock``). Interrupted builds
resume: each finished shard is renamed into place and recorded in build_state.json; a rerun keeps
those, discards the temporary files of the dead build and goes on from the next document
(replaying the features of the documents already seen when dedup needs its memory). A disk that
fills up, or a directory that cannot be written, stops the build with an error naming the path;
the finished shards stay.

A document longer than a read block (a LongDocument: e.g. a file that is one huge line) is
tokenised in the main process chunk by chunk and written as it goes, so memory does not grow with
its length, unless a filter needs its whole text (ASCII, English, dedup, decontamination): then
it is read into memory like any other document.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError, StorageError
from ..files import DirectoryLock, raise_os_error, read_json, write_atomic
from ..tokenizers import load_tokenizer, tokenizer_fingerprint
from ..workers import process_context
from .filters import FILTER_ORDER, DedupState, FeatureExtractor, FilterConfig, eval_ngrams
from .sources import SourceStats, iter_documents_from, resolve_inputs
from .text import LongDocument, resolve_separator
from .tokens import INDEX_FILE, ShardWriter, encode_documents, index_head, token_dtype

log = logging.getLogger("psann.lm")
STATE_FILE = "build_state.json"
_TASK_CHARS = 1 << 22  # characters of text per worker task at most (about), besides batch_docs


class DatasetStorageError(StorageError, DataError):
    """Disk full or no permission during a build: a StorageError, and a DataError like every build error."""


@dataclass
class BuildConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    manifests: list[str] = field(default_factory=list)
    separator: str | None = None          # see text.resolve_separator
    text_key: str = "text"
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    hf_text_key: str = "text"
    val_fraction: float = 0.005
    seed: int = 0
    shard_tokens: int = 1 << 26           # tokens per shard (64M: 128 MB as uint16)
    workers: int = 1
    batch_docs: int = 256                 # documents per worker task
    npy: bool = False                     # also write train_00000.npy etc.
    overwrite: bool = False
    progress: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)


def _is_val(seed: int, ordinal: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


# --- worker side ------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, filters: FilterConfig, contamination: frozenset[str]) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_dir)
    _WORKER["features"] = FeatureExtractor(filters, contamination)


def _process(task: tuple[bool, list[tuple[int, str]]]) -> list[tuple]:
    """(ordinal, removed_by, exact hash, signature, token ids or None, characters) per document.
    Replayed documents (already in finished shards) only need their dedup features."""
    replay, docs = task
    features, tok = _WORKER["features"], _WORKER["tokenizer"]
    out = []
    keep_texts = []
    for ordinal, text in docs:
        removed, exact, signature = features(text)
        out.append([ordinal, removed, exact, signature, None, len(text)])
        if removed is None and not replay:
            keep_texts.append((len(out) - 1, text))
    if keep_texts:
        encoded = encode_documents([t for _, t in keep_texts], tok, token_dtype(tok.vocab_size))
        for (row, _), arrays in zip(keep_texts, encoded):
            parts = list(arrays)  # one array, or the chunks of a long document
            out[row][4] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return [tuple(r) for r in out]


# --- main side --------------------------------------------------------------------------------
def _settings_key(cfg: BuildConfig, files: list[Path], fingerprint: str) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "progress", "overwrite", "out", "batch_docs")}
    settings["files"] = [(str(f), f.stat().st_size) for f in files]
    settings["fingerprint"] = fingerprint
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_out(cfg: BuildConfig, key: str) -> dict | None:
    """Ready the (locked) output directory; returns the saved state of an interrupted build with
    the same settings (to resume), None for a fresh build."""
    out = Path(cfg.out)
    if (out / INDEX_FILE).exists() and not cfg.overwrite:
        raise DataError(f"{out} already holds a finished dataset ({INDEX_FILE}); pass --overwrite to rebuild, "
                        f"or choose another --out.")
    for tmp in [*out.glob("*.tmp"), *out.glob(".*.tmp-*")]:  # a dead build's (we hold the lock)
        tmp.unlink(missing_ok=True)
    state_path = out / STATE_FILE
    if state_path.exists() and not cfg.overwrite:
        try:
            state = read_json(state_path, DataError, "build state")
        except DataError as exc:
            raise DataError(f"{exc} Pass --overwrite to start the build again.") from None
        if not isinstance(state, dict) or state.get("settings_key") != key:
            raise DataError(f"{out} holds an interrupted build with other settings or inputs; rerun it with the "
                            f"same command, pass --overwrite to start again, or choose another --out.")
        return state
    if cfg.overwrite:
        for old in [*out.glob("*.bin"), *out.glob("*.npy"), state_path, out / INDEX_FILE]:  # .npy covers .docs.npy
            old.unlink(missing_ok=True)
    return None


def _needs_text(filters: FilterConfig) -> bool:
    """Whether a filter reads a document's whole text (the length filters only count characters)."""
    return bool(filters.ascii_only or filters.english or filters.decontaminate or filters.exact_dedup
                or filters.near_dedup)


def _work(docs: Iterator, batch_docs: int, done: int, stream_long: bool) -> Iterator[tuple[str, tuple]]:
    """("batch", (replay, [(ordinal, text), ...])) for the workers and ("long", (ordinal, LongDocument))
    for the main process, in document order. A batch holds at most `batch_docs` documents and
    about _TASK_CHARS characters, so the text in flight stays bounded."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for ordinal, (_, doc) in enumerate(docs):
        if isinstance(doc, LongDocument):
            if stream_long:
                if batch:
                    yield "batch", (batch[-1][0] < done, batch)
                    batch, chars = [], 0
                yield "long", (ordinal, doc)
                continue
            doc = doc.text()
        batch.append((ordinal, doc))
        chars += len(doc)
        if len(batch) == batch_docs or chars >= _TASK_CHARS:
            yield "batch", (batch[-1][0] < done, batch)
            batch, chars = [], 0
    if batch:
        yield "batch", (batch[-1][0] < done, batch)


class _Ready:
    """A result computed at once (one worker), with the interface of a pool's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Shards:
    """The main side of a build: writes results in document order, closes shards, saves state."""

    def __init__(self, cfg: BuildConfig, out: Path, key: str, tokenizer, state: dict | None, bar):
        self.cfg, self.out, self.key, self.tokenizer, self.bar = cfg, out, key, tokenizer, bar
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.removed = {name: 0 for name in FILTER_ORDER}
        self.shards: dict[str, list[dict]] = {"train": [], "val": []}
        self.done = 0  # documents whose fate is final and whose tokens sit in finished shards
        if state is not None:
            self.shards, self.removed, self.done = state["shards"], state["removed"], state["documents_done"]
            log.info("resuming %s: %d finished shard(s), %d documents done", out,
                     sum(map(len, self.shards.values())), self.done)
        self.dedup = DedupState(cfg.filters)
        self.writers = {s: self._writer(s) for s in ("train", "val")}

    def _writer(self, split: str) -> ShardWriter:
        return ShardWriter(self.out, split, len(self.shards[split]), self.dtype, self.cfg.npy)

    def _split_of(self, ordinal: int) -> ShardWriter:
        return self.writers["val" if _is_val(self.cfg.seed, ordinal, self.cfg.val_fraction) else "train"]

    def run(self, items: Iterator, submit, max_pending: int) -> None:
        pending: deque = deque()  # batches in flight, oldest first: bounded, so reading never runs far ahead
        for kind, payload in items:
            if kind == "long":
                while pending:
                    self.write_batch(pending.popleft().get())
                self.write_long(*payload)
                continue
            pending.append(submit(payload))
            while len(pending) > max_pending:
                self.write_batch(pending.popleft().get())
        while pending:
            self.write_batch(pending.popleft().get())
        for split, writer in self.writers.items():
            if writer.tokens:
                self.shards[split].append(writer.close())
            else:
                writer.discard()

    def write_batch(self, results: list[tuple]) -> None:
        for ordinal, reason, exact, signature, ids, n_chars in results:
            self.bar.update(n_chars)
            if reason is None:
                reason = self.dedup.check(ordinal, exact, signature)
            if ordinal < self.done:
                continue  # replayed: already counted and written
            if reason is not None:
                self.removed[reason] += 1
            else:
                self._split_of(ordinal).add(ids)
            self._maybe_checkpoint(ordinal)

    def write_long(self, ordinal: int, doc: LongDocument) -> None:
        """Tokenise and write a long document as it is read; the length filters may undo it."""
        if ordinal < self.done:
            doc.drain()
        else:
            limits, reason = self.cfg.filters, None
            writer = self._split_of(ordinal)
            writer.begin()
            for ids in next(encode_documents([doc], self.tokenizer, self.dtype)):
                writer.write(ids)
                if limits.max_chars is not None and doc.chars > limits.max_chars:
                    reason = "max_chars"
                    break
            if reason is None and doc.chars < limits.min_chars:
                reason = "min_chars"
            if reason is not None:
                writer.undo()
                self.removed[reason] += 1
                doc.drain()
            self._maybe_checkpoint(ordinal)
        self.bar.update(doc.chars)

    def _maybe_checkpoint(self, ordinal: int) -> None:
        if self.writers["train"].tokens >= self.cfg.shard_tokens:
            for split, writer in self.writers.items():
                if writer.tokens:
                    self.shards[split].append(writer.close())
                    self.writers[split] = self._writer(split)
            write_atomic(self.out / STATE_FILE, json.dumps({"settings_key": self.key, "documents_done": ordinal + 1,
                                                            "shards": self.shards, "removed": self.removed}, indent=2))

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def _storage_error(exc: OSError, out: Path) -> OSError:
    """A disk-full or permission error as a DatasetStorageError naming the path; other errors as they are."""
    if not isinstance(exc, StorageError):
        try:
            raise_os_error(exc, exc.filename or out, "writing")
        except StorageError as storage:
            exc = storage
        except OSError:
            return exc  # not a storage failure
    error = DatasetStorageError(f"{exc} The finished shards are kept: rerun the same command to resume.")
    error.errno = exc.errno
    return error


def build_dataset(cfg: BuildConfig) -> dict:
    """Run the build; returns the index (also written to ``out/index.json``)."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie in [0, 1), got {cfg.val_fraction}.")
    if cfg.shard_tokens < 1 or cfg.workers < 1:
        raise DataError("--shard-tokens and --workers must be at least 1.")
    files = resolve_inputs(cfg.inputs, cfg.manifests) if (cfg.inputs or cfg.manifests or not cfg.hf_dataset) else []
    tokenizer = load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out)
    with DirectoryLock(out, "data build"):
        try:
            return _build(cfg, files, tokenizer, out)
        except OSError as exc:
            raise _storage_error(exc, out) from None


def _build(cfg: BuildConfig, files: list[Path], tokenizer, out: Path) -> dict:
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _settings_key(cfg, files, fingerprint)
    state = _prepare_out(cfg, key)
    tokenizer.save(out / "tokenizer")
    contamination = eval_ngrams(cfg.filters.decontaminate, cfg.filters.ngram) if cfg.filters.decontaminate else frozenset()
    stats = SourceStats()
    total_bytes = sum(f.stat().st_size for f in files) or None
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="data build", disable=not cfg.progress)
    built = _Shards(cfg, out, key, tokenizer, state, bar)
    docs = iter_documents_from(files, separator=resolve_separator(cfg.separator), text_key=cfg.text_key,
                               hf_dataset=cfg.hf_dataset, hf_split=cfg.hf_split, hf_config=cfg.hf_config,
                               hf_text_key=cfg.hf_text_key, stats=stats, long_documents=True)
    items = _work(docs, cfg.batch_docs, built.done, stream_long=not _needs_text(cfg.filters))
    init_args = (str(out / "tokenizer"), cfg.filters, contamination)
    pool = None
    try:
        if cfg.workers > 1:
            pool = process_context().Pool(cfg.workers, _init_worker, init_args)
            built.run(items, lambda task: pool.apply_async(_process, (task,)), 2 * cfg.workers)
        else:
            _init_worker(*init_args)
            built.run(items, lambda task: _Ready(_process(task)), 0)
    except BaseException:
        built.discard()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return _write_index(cfg, out, files, tokenizer, fingerprint, stats, built)


def _write_index(cfg: BuildConfig, out: Path, files: list[Path], tokenizer, fingerprint: str, stats: SourceStats,
                 built: _Shards) -> dict:
    shards, removed = built.shards, built.removed
    kept = {s: sum(x["documents"] for x in shards[s]) for s in shards}
    applied = cfg.filters.applied()
    if kept["train"] == 0:
        raise DataError(f"no training documents survived: {stats.documents} read, removed {removed}; "
                        f"relax the filters or check the inputs.")
    index = {
        **index_head(tokenizer, built.dtype, fingerprint, shards),
        "documents": {"read": stats.documents, "empty_skipped": stats.empty_documents,
                      "kept": kept, "invalid_utf8_replaced": stats.invalid_utf8},
        "sources": [str(f) for f in files] + ([f"hf:{cfg.hf_dataset}:{cfg.hf_split}"] if cfg.hf_dataset else []),
        "separator": cfg.separator, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "filters": applied, "removed": {k: v for k, v in removed.items() if k in applied},
    }
    write_atomic(out / INDEX_FILE, json.dumps(index, indent=2))
    (out / STATE_FILE).unlink(missing_ok=True)
    if stats.invalid_utf8:
        log.warning("data: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD.", stats.invalid_utf8)
    if stats.empty_documents:
        log.info("data: %d empty document(s) skipped.", stats.empty_documents)
    log.info("data: %s train / %s val tokens in %d + %d shard(s) at %s; removed %s", f"{index['tokens']['train']:,}",
             f"{index['tokens']['val']:,}", len(shards["train"]), len(shards["val"]), out, index["removed"])
    return index
