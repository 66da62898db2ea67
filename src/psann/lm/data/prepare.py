"""Training data ready for the trainer: a tokenizer (trained or loaded) and train/validation
windows. Every source ends in the token-shard format `psannlm data build` writes: texts and
files, and SFT conversations, are built into the data cache (`data.cache_dir`, inside the run
directory for a configured run, else a temporary directory); a built dataset is read in place."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..tokenizers import build_tokenizer, load_tokenizer, tokenizer_fingerprint
from .sft import encode_example, example_text, read_sft_jsonl
from .shards import Loader, ShardedTokens, Windows
from .text import iter_documents
from .tokens import split_documents_for_validation, token_array_tokenizer, token_dtype, write_documents

log = logging.getLogger("psann.lm")
SMALL_DATA_WINDOWS = 8


class PreparedData:
    """A tokenizer and the windows it produced; `config` says how they were made (saved with the run)."""

    def __init__(self, config: DataConfig, tokenizer, train_windows: Windows, val_windows: Windows | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.train_windows, self.val_windows = train_windows, val_windows

    @property
    def sampling(self) -> str:
        if self.config.sampling != "auto":
            return self.config.sampling
        # random starts need a full window of packed stream; one window per document, or a corpus
        # shorter than a window (padded), is shuffled
        windows = self.train_windows
        return "random" if windows.layout == "packed" and windows.data.n_tokens > windows.max_length else "shuffle"

    def make_loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Loader:
        """The training loader (state_dict/load_state_dict resume exactly)."""
        return Loader(self.train_windows, batch_size, seed=seed, mode=self.sampling, bos_aligned=self.config.bos_aligned,
                      rank=rank, world_size=world_size)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.max_length


def _cache(config: DataConfig) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """Where texts or SFT examples are built: data.cache_dir, else a temporary directory (with
    the handle that removes it once no reader of its shards is left)."""
    if config.cache_dir:
        return Path(config.cache_dir), None
    temporary = tempfile.TemporaryDirectory(prefix="psann-data-")
    return Path(temporary.name), temporary


def _open_splits(directory: Path, config: DataConfig, tok, layout: str = "packed", *, pad_target: int | None = None,
                 temporary: tempfile.TemporaryDirectory | None = None) -> tuple[Windows | None, Windows | None]:
    """The train and val windows of the dataset at `directory` (None for a split of under 2 tokens)."""
    pads = {"pad_id": tok.pad_id} if pad_target is None else {"pad_id": pad_target, "pad_target": pad_target}
    windows = []
    for split in ("train", "val"):
        data = ShardedTokens(directory, split, expected_fingerprint=tokenizer_fingerprint(tok) if split == "train" else None)
        data.temporary = temporary  # the directory lives as long as its readers
        windows.append(Windows(data, config.max_length, layout, **pads) if data.n_tokens >= 2 else None)
    return windows[0], windows[1]


def text_windows(docs: Sequence[str], tokenizer, max_length: int) -> Windows:
    """Packed windows over documents (for evaluation): a tiny build in a temporary directory."""
    cache, temporary = _cache(DataConfig())
    write_documents(cache, tokenizer, {"train": docs})
    return _open_splits(cache, DataConfig(max_length=max_length), tokenizer, temporary=temporary)[0]


def token_windows(ids: np.ndarray, tokenizer, max_length: int) -> Windows:
    """Packed windows over an array of token ids (for evaluation), the same way."""
    cache, temporary = _cache(DataConfig())
    write_documents(cache, tokenizer, {"train": [ids]}, encoded=True)
    return _open_splits(cache, DataConfig(max_length=max_length), tokenizer, temporary=temporary)[0]


def prepare_texts(texts: str | os.PathLike | Iterable[str | os.PathLike], config: DataConfig,
                  val_texts: Iterable[str | os.PathLike] | None = None) -> PreparedData:
    """Documents (strings or file paths) -> tokenizer trained on the training documents (or
    loaded) -> windows. The split is by document (seeded); file corpora are tokenised into
    memmaps under `config.cache_dir`."""
    items = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    if not items:
        raise DataError("psannLMDataPrep got no texts: pass a list of strings or file paths.")
    files = [str(i) for i in items if isinstance(i, os.PathLike) or (isinstance(i, str) and os.path.isfile(i))]
    if files:  # recorded so that a saved checkpoint can say what it was trained on
        config = dataclasses.replace(config, train_files=files)
    docs = list(iter_documents(items, config.doc_separator))
    if val_texts is not None:
        train_docs, val_docs = docs, list(iter_documents(val_texts, config.doc_separator))
    else:
        train_docs, val_docs = split_documents_for_validation(docs, config.val_split, config.seed)
        del docs  # one copy fewer of a huge document while it is encoded
    if not train_docs:
        raise DataError("no training text: every document is empty. Pass non-empty strings or files.")
    tok = build_tokenizer(config.tokenizer, train_docs, vocab_size=config.tokenizer_vocab_size,
                          model_path=config.tokenizer_model_path)
    cache, temporary = _cache(config)
    write_documents(cache, tok, {"train": train_docs, "val": val_docs}, sources=files)
    train, val = _open_splits(cache, config, tok, "packed" if config.pack_sequences else "documents",
                              temporary=temporary)
    if train is None or len(train) == 0:
        raise DataError("the training text is too short to make one window (it needs at least 2 tokens).")
    if len(train) < SMALL_DATA_WINDOWS:
        log.warning("data: very small corpus: %d training window(s), %d target tokens; the model will memorise "
                    "rather than learn. Add text for a meaningful run.", len(train), train.n_target_tokens)
    log.info("data: %d train docs -> %s tokens, %d windows of %d; %d validation docs; tokenizer %s (vocab %d)",
             len(train_docs), f"{train.data.n_tokens:,}", len(train), config.max_length, len(val_docs), tok.kind,
             tok.vocab_size)
    return PreparedData(config, tok, train, val)


def prepare_built(config: DataConfig) -> PreparedData:
    """A dataset made by `psannlm data build` at `config.path` (its shards, split and saved tokenizer)."""
    path = config.path
    tok = load_tokenizer(Path(path) / "tokenizer")
    train, val = _open_splits(Path(path), config, tok)
    prepared = PreparedData(config, tok, train, val)
    if train is None:
        raise DataError(f"{path}: the training shards hold fewer than 2 tokens.")
    log.info("data: %s (%s train tokens in %d shard(s), %s val tokens); sampling %s%s", path,
             f"{train.data.n_tokens:,}", len(train.data.shards), f"{val.data.n_tokens if val else 0:,}",
             prepared.sampling, ", BOS-aligned" if config.bos_aligned else "")
    return prepared


def prepare_sft(paths: Sequence[str | os.PathLike], config: DataConfig, eos_padded_answers: bool = False) -> PreparedData:
    """JSONL prompt/response pairs or chat conversations (see sft.py): the loss covers the answers;
    `eos_padded_answers` (diffusion) pads them with EOS instead of ignoring the padding."""
    examples = read_sft_jsonl(list(paths))
    order = np.random.default_rng(config.seed).permutation(len(examples))
    n_val = int(round(config.val_split * len(examples))) if len(examples) > 1 else 0
    val_examples, train_examples = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
    config = dataclasses.replace(config, sft_files=[str(p) for p in paths])
    tok = build_tokenizer(config.tokenizer, [example_text(e) for e in train_examples],
                          vocab_size=config.tokenizer_vocab_size, model_path=config.tokenizer_model_path)

    cache, temporary = _cache(config)
    write_documents(cache, tok, {"train": [encode_example(tok, e) for e in train_examples],
                                 "val": [encode_example(tok, e) for e in val_examples]},
                    masked=True, sources=config.sft_files)
    train, val = _open_splits(cache, config, tok, "examples", pad_target=tok.eos_id if eos_padded_answers else None,
                              temporary=temporary)
    if train.skipped:
        log.warning("data: %d SFT example(s) dropped: no answer token fits in max_length=%d tokens.",
                    train.skipped, config.max_length)
    log.info("data: %d SFT examples for training, %d for validation (%s answer tokens); tokenizer %s (vocab %d)",
             len(train), len(val_examples), f"{train.n_target_tokens:,}", tok.kind, tok.vocab_size)
    return PreparedData(config, tok, train, val)


def read_token_array(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """A 1-D array of token ids, memory-mapped, every id checked to lie in the vocabulary: a .npy
    file, or raw ids (.dat, .bin) in the dtype the vocabulary takes (uint16 when it fits)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    try:
        if path.suffix != ".npy":
            if path.stat().st_size % dtype.itemsize:
                raise ValueError(f"its {path.stat().st_size} bytes are not whole {dtype.name} ids")
            ids = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        else:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable token array ({exc}).") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{path} holds a {ids.ndim}-D {ids.dtype} array; a token array is 1-D integer ids.")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DataError(f"{path} holds token id {int(ids.max()) if ids.max() >= vocab_size else int(ids.min())}, "
                        f"outside the tokenizer's {vocab_size} ids: it was encoded with another tokenizer; name that "
                        "one with data.tokenizer_model_path (--tokenizer).")
    return ids


def prepare_token_files(config: DataConfig) -> PreparedData:
    """Arrays of token ids, each trained on as one packed stream (as nanoGPT and CS336 do), with the
    tokenizer they were encoded with."""
    for path in [*config.train_token_files, *config.val_token_files]:
        if not Path(path).is_file():
            raise DataError(f"token array {path} not found; write one with `psannlm tokenizer encode --input TEXT "
                            f"--vocab VOCAB.json --merges MERGES.txt --output {path}`.")
    first = config.train_token_files[0]
    source = config.tokenizer_model_path or token_array_tokenizer(first)
    if not Path(source).exists():
        raise DataError(f"no tokenizer for {first}: {source} does not exist. Pass the tokenizer the ids came from "
                        "(--tokenizer DIR, or data.tokenizer_model_path: a tokenizer directory, or one holding "
                        "vocab.json + merges.txt).")
    tok = build_tokenizer(config.tokenizer, model_path=source)
    cache, temporary = _cache(config)
    splits = {"train": [read_token_array(p, tok.vocab_size) for p in config.train_token_files],
              "val": [read_token_array(p, tok.vocab_size) for p in config.val_token_files]}
    write_documents(cache, tok, splits, encoded=True, sources=[*config.train_token_files, *config.val_token_files])
    train, val = _open_splits(cache, config, tok, temporary=temporary)
    if train is None:
        raise DataError(f"{', '.join(config.train_token_files)}: fewer than 2 tokens to train on.")
    log.info("data: %s train / %s val tokens from %d + %d token array(s); tokenizer %s (vocab %d)",
             f"{train.data.n_tokens:,}", f"{val.data.n_tokens if val else 0:,}", len(config.train_token_files),
             len(config.val_token_files), tok.kind, tok.vocab_size)
    return PreparedData(config, tok, train, val)


def prepare_data(config: DataConfig, texts: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
                 val_texts: Iterable[str | os.PathLike] | None = None, eos_padded_answers: bool = False) -> PreparedData:
    """The data `texts` give (strings or file paths), else the data the config names: SFT files,
    a built dataset, or text files."""
    if texts is not None:
        return prepare_texts(texts, config, val_texts)
    if config.sft_files:
        return prepare_sft(config.sft_files, config, eos_padded_answers)
    if config.path:
        return prepare_built(config)
    if config.train_token_files:
        return prepare_token_files(config)
    if not config.train_files:
        raise ConfigError("'data.train_files' is empty: list at least one text file to train on.")
    return prepare_texts(config.train_files, config, config.val_files or None)
