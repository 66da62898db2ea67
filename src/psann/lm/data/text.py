"""Reading raw text: files or in-memory strings, UTF-8 with counted replacement, split into documents."""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError

log = logging.getLogger("psann.lm")

_TEXT_SUFFIXES = (".txt", ".text", ".md", ".csv", ".tsv", ".json", ".jsonl", ".raw")


class CountingDecoder:
    """Incremental UTF-8 decoding that replaces invalid bytes with U+FFFD and counts them."""

    def __init__(self):
        self.bad = 0
        self.errors = f"psann_count_{id(self)}"  # a codec error handler of our own, usable by TextIOWrapper too

        def handler(exc: UnicodeDecodeError):
            self.bad += 1
            return "\ufffd", exc.end

        codecs.register_error(self.errors, handler)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=self.errors)

    def decode(self, data: bytes, final: bool = False) -> str:
        return self._decoder.decode(data, final)


def read_text_file(path: str | os.PathLike) -> str:
    """Decode a file as UTF-8; invalid bytes become U+FFFD and are counted in one warning."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"text file not found: {path}. Check the path, or pass the text itself as a string.")
    if path.is_dir():
        raise DataError(f"expected a text file but {path} is a directory; list the files inside it instead "
                        f"(e.g. {path}/*.txt).")
    raw = path.read_bytes()
    decoder = CountingDecoder()
    text = decoder.decode(raw, final=True)
    if decoder.bad:
        log.warning("%s: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD (first at byte %d); "
                    "re-encode the file as UTF-8 to keep those characters.", path, decoder.bad, _first_bad_byte(raw))
    return text


def _first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1


def _looks_like_path(item: str) -> bool:
    if not item or "\n" in item or len(item) > 4096:
        return False
    return os.path.exists(item) or (" " not in item and (os.sep in item or item.lower().endswith(_TEXT_SUFFIXES)))


def split_documents(text: str, separator: str | None) -> list[str]:
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
            yield from split_documents(read_text_file(item), separator)
        elif isinstance(item, str):
            yield from split_documents(item, separator)
        else:
            raise DataError(f"texts must be strings or file paths, got {type(item).__name__}.")

