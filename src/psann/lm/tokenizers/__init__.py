"""Tokenizers: a registry of backends behind one small interface.

``build_tokenizer`` trains or loads one, ``load_tokenizer`` reads a directory written
by ``Tokenizer.save``, and ``tokenizer_fingerprint`` identifies a tokenizer's content.
The sentencepiece and tokenizers backends are imported lazily, so this package works
(with "byte"/"char") even when those libraries are missing.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..config import TOKENIZER_KINDS
from ..errors import CheckpointError, ConfigError, DataError, unknown_choice
from .base import META_FILE, Tokenizer, TokenizerFileNotFoundError, read_meta
from .chat import CONFIG_FILE as CHAT_CONFIG_FILE
from .chat import read_chat_template
from .bpe_train import train_bpe
from .byte import ByteTokenizer
from .char import CharTokenizer

__all__ = [
    "TOKENIZER_KINDS",
    "Tokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "BPETokenizer",
    "HFTokenizer",
    "TokenizerFileNotFoundError",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe",
]

logger = logging.getLogger("psann.lm")

_ALIASES = {"simple": "char"}  # "simple" is the name an older spec used
# kind -> (module, class name); modules are imported only when needed.
_BACKENDS = {
    "byte": (".byte", "ByteTokenizer"),
    "bpe": (".bpe", "BPETokenizer"),
    "char": (".char", "CharTokenizer"),
    "sentencepiece": (".spm", "SentencePieceTokenizer"),
    "tokenizers": (".hf", "HFTokenizer"),
}
_AUTO_ORDER = ("sentencepiece", "tokenizers")  # kind == library name for both


def __getattr__(name: str) -> Any:
    # Lazy access to the backends whose libraries may not be installed.
    for module, cls_name in _BACKENDS.values():
        if cls_name == name:
            return getattr(importlib.import_module(module, __name__), cls_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _backend_class(kind: str) -> type[Tokenizer]:
    module, cls_name = _BACKENDS[kind]
    try:
        return getattr(importlib.import_module(module, __name__), cls_name)
    except ImportError as exc:
        library = {"sentencepiece": "sentencepiece", "bpe": "tiktoken"}.get(kind, "tokenizers")
        raise ConfigError(
            f"tokenizer '{kind}' needs the '{library}' package ({exc}); "
            f"install it with 'pip install {library}' or pick another tokenizer kind"
        ) from exc


def _normalize_kind(kind: str) -> str:
    name = str(kind).strip().lower()
    if name not in TOKENIZER_KINDS:
        raise ConfigError(unknown_choice("tokenizer", str(kind), TOKENIZER_KINDS))
    return _ALIASES.get(name, name)


def _auto_kind() -> str:
    """Pick the first subword library that imports; fall back to char."""
    missing = []
    for kind in _AUTO_ORDER:
        try:
            importlib.import_module(kind)
        except ImportError:
            missing.append(kind)
            continue
        why = f"'{kind}' is installed" + (f" and {', '.join(missing)} is not" if missing else "")
        logger.info("tokenizer 'auto' chose '%s': %s (order: sentencepiece, tokenizers, char)", kind, why)
        return kind
    logger.info("tokenizer 'auto' chose 'char': neither sentencepiece nor tokenizers is installed")
    return "char"


def build_tokenizer(
    kind: str,
    texts: Iterable[str] = (),
    *,
    vocab_size: int | None = None,
    model_path: str | os.PathLike | None = None,
) -> Tokenizer:
    """Load the tokenizer at ``model_path`` if given, otherwise train ``kind`` on ``texts``.

    ``vocab_size`` is a soft upper bound (default 8000 for subword kinds, all seen
    characters for "char"); small corpora yield smaller vocabularies. "byte" ignores
    both ``texts`` and ``vocab_size``.
    """
    kind = _normalize_kind(kind)
    bad_type = isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
    if vocab_size is not None and (bad_type or vocab_size <= 0):
        raise ConfigError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")
    if model_path is not None:
        return _load_model_path(kind, Path(model_path).expanduser())
    if kind == "auto":
        kind = _auto_kind()
    if kind == "byte":
        return ByteTokenizer()
    return _backend_class(kind).train(texts, vocab_size=vocab_size)  # type: ignore[attr-defined]


def _load_model_path(kind: str, path: Path) -> Tokenizer:
    if not path.exists():
        raise TokenizerFileNotFoundError(
            f"tokenizer model_path '{path}' does not exist. Pass a SentencePiece .model file, "
            "a Hugging Face tokenizer.json (or a directory holding one), a directory with GPT-2 "
            "vocab.json + merges.txt, or a directory written "
            "by Tokenizer.save(); or leave model_path unset to train a tokenizer on your texts."
        )
    bpe = _backend_class("bpe") if kind == "bpe" else None
    if path.is_dir():
        if (path / META_FILE).is_file():
            tok = load_tokenizer(path)
        elif bpe is not None and (path / "tokenizer.json").is_file():
            tok = bpe.from_hf(path / "tokenizer.json")  # type: ignore[attr-defined]
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():  # GPT-2 style files
            tok = _backend_class("bpe").from_files(path / "vocab.json", path / "merges.txt")  # type: ignore[attr-defined]
        elif (path / "tokenizer.json").is_file():
            tok = _backend_class("tokenizers").from_file(path / "tokenizer.json")  # type: ignore[attr-defined]
        elif (path / "tokenizer.model").is_file():
            tok = _backend_class("sentencepiece").from_model_file(path / "tokenizer.model")  # type: ignore[attr-defined]
        else:
            raise DataError(
                f"directory '{path}' holds no tokenizer: expected {META_FILE}, tokenizer.json, "
                "tokenizer.model, or vocab.json + merges.txt in it"
            )
        tok.chat_template = read_chat_template(path)  # an external tokenizer's own template, if it has one
    elif path.suffix == ".model":
        tok = _backend_class("sentencepiece").from_model_file(path)  # type: ignore[attr-defined]
    elif path.suffix == ".json":
        tok = bpe.from_hf(path) if bpe is not None else _backend_class("tokenizers").from_file(path)  # type: ignore[attr-defined]
    else:
        raise DataError(
            f"cannot tell what tokenizer '{path}' is: use a SentencePiece '.model' file, "
            "a Hugging Face 'tokenizer.json', or a saved tokenizer directory"
        )
    if kind != "auto" and tok.kind != kind:
        raise ConfigError(
            f"model_path '{path}' holds a '{tok.kind}' tokenizer but tokenizer '{kind}' was "
            f"requested; set the tokenizer to '{tok.kind}' or 'auto'"
        )
    logger.info("loaded '%s' tokenizer from %s (vocab_size=%d)", tok.kind, path, tok.vocab_size)
    return tok


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a directory written by ``Tokenizer.save``, whatever its kind."""
    meta = read_meta(directory)
    kind = meta.get("kind")
    if kind not in _BACKENDS:
        raise CheckpointError(
            f"'{Path(directory) / META_FILE}' names tokenizer kind {kind!r}, which this psann "
            f"does not know (known: {', '.join(sorted(_BACKENDS))}); upgrade psann or re-save it"
        )
    tok = _backend_class(kind).load(directory)
    tok.chat_template = read_chat_template(directory)
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """Short stable hash of everything ``tok.save`` writes.

    Two tokenizers with the same fingerprint map text to the same ids, so data or
    checkpoints made with one can be used with the other.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="psann-tok-") as tmp:
        tok.save(tmp)
        # The chat template changes how conversations are rendered, not how text maps to ids.
        for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.name != CHAT_CONFIG_FILE):
            data = file.read_bytes()
            digest.update(file.relative_to(tmp).as_posix().encode("utf-8") + b"\0")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]
