"""Reading raw text: files or in-memory strings, UTF-8 with counted replacement, split into documents.

This is the one document reader of the package (`psannLMDataPrep`, `psannlm data build`, the
streaming dataset and `psannlm eval` all use it). A file is read in fixed-size blocks and split
on the separator across block edges, so no line or document has to fit in memory at once: a
document longer than a block comes as a `LongDocument`, whose text is read piece by piece.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..errors import DataError
from ..files import CountingDecoder

log = logging.getLogger("psann.lm")

_TEXT_SUFFIXES = (".txt", ".text", ".md", ".csv", ".tsv", ".json", ".jsonl", ".raw")
BLOCK_CHARS = 1 << 20  # bytes read at a time; a document longer than this many characters is streamed


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it ends in .gz or .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard: pip install 'psann-lm[data]'") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def text_blocks(path: Path, decoder: CountingDecoder, universal_newlines: bool = True,
                block_bytes: int | None = None) -> Iterator[str]:
    """The decoded text of `path`, a block (default BLOCK_CHARS bytes) at a time. Universal newlines
    turn \\r\\n and \\r into \\n (a \\r at the end of a block waits for the next one, which may
    begin with \\n)."""
    block_bytes = block_bytes or BLOCK_CHARS
    held = ""
    with open_binary(path) as fh:
        while True:
            data = fh.read(block_bytes)
            text = held + decoder.decode(data, final=not data)
            held = ""
            if universal_newlines and "\r" in text:
                if data and text.endswith("\r"):
                    text, held = text[:-1], "\r"
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if not data:
                return


def split_pieces(blocks: Iterable[str], separator: str | None,
                 block_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces: the documents between separators (None: the whole stream is
    one). A document shorter than `block_chars` (default BLOCK_CHARS) comes as one piece; a longer
    one in several, each about `block_chars` long."""
    block_chars = block_chars or BLOCK_CHARS
    keep = len(separator) - 1 if separator else 0  # may be the start of a separator cut by the block edge
    rest = ""
    for block in blocks:
        text = rest + block
        if separator:
            *complete, text = text.split(separator)
            for doc in complete:
                yield doc, True
        if len(text) >= block_chars and len(text) > keep:
            cut = len(text) - keep
            yield text[:cut], False
            text = text[cut:]
        rest = text
    yield rest, True


class LongDocument:
    """A document too long to hold at once: iterate over it (once, before reading the next
    document) for its text in pieces, stripped at both ends like `str.strip`. `chars` counts the
    characters read so far."""

    def __init__(self, first: str, pieces: Iterator[tuple[str, bool]]):
        self._source = self._raw(first, pieces)
        self._started = False
        self.chars = 0

    @staticmethod
    def _raw(first: str, pieces: Iterator[tuple[str, bool]]) -> Iterator[str]:
        yield first
        for text, last in pieces:
            yield text
            if last:
                return

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a LongDocument can be read only once")
        self._started = True
        held = ""  # trailing whitespace: part of the text only if more text follows
        for piece in self._source:
            body = piece.rstrip()
            if not body:
                held += piece
                continue
            out, held = held + body, piece[len(body):]
            self.chars += len(out)
            yield out

    def drain(self) -> None:
        """Skip whatever of the document is left unread, so that the next one can be read."""
        self._started = True
        for piece in self._source:
            self.chars += len(piece)

    def text(self) -> str:
        return "".join(self)


def documents(pieces: Iterable[tuple[str, bool]]) -> Iterator[str | LongDocument]:
    """Stripped documents from `split_pieces`: a str ("" for a document of only whitespace), or a
    LongDocument (never empty) for one that came in several pieces."""
    pieces = iter(pieces)
    for text, last in pieces:
        if last:
            yield text.strip()
            continue
        text = text.lstrip()
        while not text and not last:  # leading whitespace may span pieces
            text, last = next(pieces)
            text = text.lstrip()
        if last:
            yield text.rstrip()
            continue
        doc = LongDocument(text, pieces)
        yield doc
        doc.drain()  # the caller may have stopped early: skip to the next document


def _checked_path(item: str | os.PathLike) -> Path:
    path = Path(item)
    if not path.exists():
        raise DataError(f"text file not found: {path}. Check the path, or pass the text itself as a string.")
    if path.is_dir():
        raise DataError(f"expected a text file but {path} is a directory; list the files inside it instead "
                        f"(e.g. {path}/*.txt).")
    return path


def _warn_invalid(path: Path, decoder: CountingDecoder) -> None:
    if decoder.bad:
        log.warning("%s: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD (first at byte %d); "
                    "re-encode the file as UTF-8 to keep those characters.", path, decoder.bad, decoder.first_bad)


def read_text_file(path: str | os.PathLike) -> str:
    """Decode a file as UTF-8; invalid bytes become U+FFFD and are counted in one warning."""
    path = _checked_path(path)
    decoder = CountingDecoder()
    text = "".join(text_blocks(path, decoder, universal_newlines=False))
    _warn_invalid(path, decoder)
    return text


def file_documents(path: str | os.PathLike, separator: str | None) -> Iterator[str]:
    """The non-empty documents of a text file as strings (newlines kept as they are)."""
    path = _checked_path(path)
    decoder = CountingDecoder()
    blocks = text_blocks(path, decoder, universal_newlines=False)
    for doc in documents(split_pieces(blocks, resolve_separator(separator))):
        doc = doc.text() if isinstance(doc, LongDocument) else doc
        if doc:
            yield doc
    _warn_invalid(path, decoder)


def _looks_like_path(item: str) -> bool:
    if not item or "\n" in item or len(item) > 4096:
        return False
    return os.path.exists(item) or (" " not in item and (os.sep in item or item.lower().endswith(_TEXT_SUFFIXES)))


SEPARATOR_ALIASES = {"blank": "\n\n", "line": "\n", "eot": "<|endoftext|>", "none": None}


def resolve_separator(separator: str | None) -> str | None:
    """The one meaning of a document separator, everywhere: 'blank' (a blank line), 'line' (one
    document per line), 'eot' (<|endoftext|>), 'none' or None (one document per file or string),
    or any other literal string."""
    if separator is None:
        return None
    return SEPARATOR_ALIASES.get(separator, separator)


def split_documents(text: str, separator: str | None) -> list[str]:
    separator = resolve_separator(separator)
    parts = [text] if not separator else text.split(separator)
    return [p.strip() for p in parts if p.strip()]


def iter_documents(items: Iterable[str | os.PathLike], separator: str | None = None) -> Iterator[str]:
    """Yield non-empty documents from strings and file paths.

    A `Path`, or a string naming an existing file (or shaped like a file path), is read from disk;
    any other string is text. Both are split on `separator` (None: each is one document).
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
            yield from file_documents(item, separator)
        elif isinstance(item, str):
            yield from split_documents(item, separator)
        else:
            raise DataError(f"texts must be strings or file paths, got {type(item).__name__}.")
