"""Build a token dataset: sources -> filters -> tokenizer (worker processes) -> token shards.

Output directory:
    index.json              dtype, vocab size, tokenizer fingerprint, shards, sources, filters, counts
    tokenizer/              the tokenizer the shards were made with
    train_00000.bin ...     raw token ids (uint16 when the vocabulary fits, else uint32): BOS doc EOS ...
    train_00000.docs.npy    int64 start of every document in the shard
    val_00000.bin ...       the held-out documents (chosen per document by a seeded hash)

Deterministic for a given input (results come back in document order whatever the worker count).
Interrupted builds resume: each finished shard is renamed into place and recorded in
build_state.json; a rerun keeps those, discards partial ``*.tmp`` files and goes on from the next
document (replaying the features of the documents already seen when dedup needs its memory).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import write_atomic
from ..tokenizers import load_tokenizer, tokenizer_fingerprint
from ..workers import process_context
from .filters import FILTER_ORDER, DedupState, FeatureExtractor, FilterConfig, eval_ngrams
from .sources import SourceStats, iter_documents_from, resolve_inputs, resolve_separator
from .tokens import token_dtype

log = logging.getLogger("psann.lm")
INDEX_FILE, STATE_FILE, FORMAT = "index.json", "build_state.json", "psann-token-shards"
FORMAT_VERSION = 1


@dataclass
class BuildConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    manifests: list[str] = field(default_factory=list)
    separator: str | None = None          # see sources.resolve_separator
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


def _atomic_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2))


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
        encoded = tok.encode_batch([t for _, t in keep_texts], add_bos=True, add_eos=True)
        dtype = token_dtype(tok.vocab_size)
        for (row, _), ids in zip(keep_texts, encoded):
            out[row][4] = np.asarray(ids, dtype=dtype)
    return [tuple(r) for r in out]


# --- main side --------------------------------------------------------------------------------
class ShardWriter:
    """Appends documents to ``{split}_{n:05d}.bin.tmp``; `close` renames it into place."""

    def __init__(self, out: Path, split: str, index: int, dtype: np.dtype, npy: bool):
        self.out, self.split, self.index, self.dtype, self.npy = out, split, index, dtype, npy
        self.name = f"{split}_{index:05d}"
        self.tmp = out / f"{self.name}.bin.tmp"
        self.fh = open(self.tmp, "wb")
        self.tokens, self.doc_starts = 0, []

    def add(self, ids: np.ndarray) -> None:
        self.doc_starts.append(self.tokens)
        self.fh.write(ids.tobytes())
        self.tokens += int(ids.shape[0])

    def close(self) -> dict:
        self.fh.close()
        docs_tmp = self.out / f"{self.name}.docs.npy.tmp"
        with open(docs_tmp, "wb") as fh:
            np.save(fh, np.asarray(self.doc_starts, dtype=np.int64))
        if self.npy:
            npy_tmp = self.out / f"{self.name}.npy.tmp"
            with open(npy_tmp, "wb") as fh:
                np.save(fh, np.memmap(self.tmp, dtype=self.dtype, mode="r") if self.tokens else np.zeros(0, self.dtype))
            os.replace(npy_tmp, self.out / f"{self.name}.npy")
        os.replace(docs_tmp, self.out / f"{self.name}.docs.npy")
        os.replace(self.tmp, self.out / f"{self.name}.bin")
        return {"file": f"{self.name}.bin", "docs_file": f"{self.name}.docs.npy", "tokens": self.tokens,
                "documents": len(self.doc_starts)}

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _settings_key(cfg: BuildConfig, files: list[Path], fingerprint: str) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "progress", "overwrite", "out", "batch_docs")}
    settings["files"] = [(str(f), f.stat().st_size) for f in files]
    settings["fingerprint"] = fingerprint
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_out(cfg: BuildConfig, key: str) -> dict | None:
    """Make the output directory; returns the saved state of an interrupted build with the same
    settings (to resume), None for a fresh build."""
    out = Path(cfg.out)
    if (out / INDEX_FILE).exists() and not cfg.overwrite:
        raise DataError(f"{out} already holds a finished dataset ({INDEX_FILE}); pass --overwrite to rebuild, "
                        f"or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    state_path = out / STATE_FILE
    if state_path.exists() and not cfg.overwrite:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("settings_key") != key:
            raise DataError(f"{out} holds an interrupted build with other settings or inputs; rerun it with the "
                            f"same command, pass --overwrite to start again, or choose another --out.")
        return state
    if cfg.overwrite:
        for old in [*out.glob("*.bin"), *out.glob("*.npy"), state_path, out / INDEX_FILE]:  # .npy covers .docs.npy
            old.unlink(missing_ok=True)
    return None


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield chunk


def build_dataset(cfg: BuildConfig) -> dict:
    """Run the build; returns the index (also written to ``out/index.json``)."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie in [0, 1), got {cfg.val_fraction}.")
    if cfg.shard_tokens < 1 or cfg.workers < 1:
        raise DataError("--shard-tokens and --workers must be at least 1.")
    files = resolve_inputs(cfg.inputs, cfg.manifests) if (cfg.inputs or cfg.manifests or not cfg.hf_dataset) else []
    tokenizer = load_tokenizer(cfg.tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _settings_key(cfg, files, fingerprint)
    state = _prepare_out(cfg, key)
    out = Path(cfg.out)
    tokenizer.save(out / "tokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    contamination = eval_ngrams(cfg.filters.decontaminate, cfg.filters.ngram) if cfg.filters.decontaminate else frozenset()

    stats = SourceStats()
    removed = {name: 0 for name in FILTER_ORDER}
    shards: dict[str, list[dict]] = {"train": [], "val": []}
    done = 0  # documents whose fate is final and whose tokens sit in finished shards
    if state is not None:
        shards, removed, done = state["shards"], state["removed"], state["documents_done"]
        log.info("resuming %s: %d finished shard(s), %d documents done", out, sum(map(len, shards.values())), done)
    dedup = DedupState(cfg.filters)
    writers = {s: ShardWriter(out, s, len(shards[s]), dtype, cfg.npy) for s in ("train", "val")}
    docs = iter_documents_from(files, separator=resolve_separator(cfg.separator), text_key=cfg.text_key,
                               hf_dataset=cfg.hf_dataset, hf_split=cfg.hf_split, hf_config=cfg.hf_config,
                               hf_text_key=cfg.hf_text_key, stats=stats)
    tasks = ((chunk[-1][0] < done, [(i, text) for i, (_, text) in chunk])
             for chunk in _batched(enumerate(docs), cfg.batch_docs))
    total_bytes = sum(f.stat().st_size for f in files) or None
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="data build", disable=not cfg.progress)
    init_args = (str(out / "tokenizer"), cfg.filters, contamination)
    pool = None
    if cfg.workers > 1:
        pool = process_context().Pool(cfg.workers, _init_worker, init_args)
        results = pool.imap(_process, tasks)
    else:
        _init_worker(*init_args)
        results = map(_process, tasks)

    def checkpoint(ordinal_done: int) -> None:
        for split, writer in writers.items():
            if writer.tokens:
                shards[split].append(writer.close())
                writers[split] = ShardWriter(out, split, len(shards[split]), dtype, cfg.npy)
        _atomic_json(out / STATE_FILE, {"settings_key": key, "documents_done": ordinal_done,
                                        "shards": shards, "removed": removed})

    try:
        for batch in results:
            for ordinal, reason, exact, signature, ids, n_chars in batch:
                bar.update(n_chars)
                if reason is None:
                    reason = dedup.check(ordinal, exact, signature)
                if ordinal < done:
                    continue  # replayed: already counted and written
                if reason is not None:
                    removed[reason] += 1
                else:
                    writers["val" if _is_val(cfg.seed, ordinal, cfg.val_fraction) else "train"].add(ids)
                if writers["train"].tokens >= cfg.shard_tokens:
                    checkpoint(ordinal + 1)
        for split, writer in writers.items():
            if writer.tokens:
                shards[split].append(writer.close())
            else:
                writer.discard()
    except BaseException as exc:
        for writer in writers.values():
            writer.discard()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DataError(f"disk full while writing to {out}; the finished shards are kept. Free some space and "
                            f"rerun the same command to resume.") from None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()

    kept = {s: sum(x["documents"] for x in shards[s]) for s in shards}
    applied = cfg.filters.applied()
    if kept["train"] == 0:
        raise DataError(f"no training documents survived: {stats.documents} read, removed {removed}; "
                        f"relax the filters or check the inputs.")
    index = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "tokenizer": "tokenizer", "tokenizer_fingerprint": fingerprint, "tokenizer_kind": tokenizer.kind,
        "shards": shards,
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in shards},
        "documents": {"read": stats.documents, "empty_skipped": stats.empty_documents,
                      "kept": kept, "invalid_utf8_replaced": stats.invalid_utf8},
        "sources": [str(f) for f in files] + ([f"hf:{cfg.hf_dataset}:{cfg.hf_split}"] if cfg.hf_dataset else []),
        "separator": cfg.separator, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "filters": applied, "removed": {k: v for k, v in removed.items() if k in applied},
    }
    _atomic_json(out / INDEX_FILE, index)
    (out / STATE_FILE).unlink(missing_ok=True)
    if stats.invalid_utf8:
        log.warning("data: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD.", stats.invalid_utf8)
    if stats.empty_documents:
        log.info("data: %d empty document(s) skipped.", stats.empty_documents)
    log.info("data: %s train / %s val tokens in %d + %d shard(s) at %s; removed %s", f"{index['tokens']['train']:,}",
             f"{index['tokens']['val']:,}", len(shards["train"]), len(shards["val"]), out, index["removed"])
    return index
