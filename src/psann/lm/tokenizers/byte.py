"""Byte-level tokenizer: 256 ids, one per byte of the UTF-8 text.

pad/bos/eos are the bytes 0xFD/0xFE/0xFF, which never occur in UTF-8 (0xF5-0xFF are invalid
lead bytes), so they cannot collide with text: encoding a str always yields valid UTF-8 bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import Tokenizer, check_against_meta, read_meta

PAD_ID, BOS_ID, EOS_ID = 0xFD, 0xFE, 0xFF
_SPECIALS = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}


class ByteTokenizer(Tokenizer):
    """Needs no training and can encode any text; sequences are long (one id per byte)."""

    kind = "byte"

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.unk_id = None  # every byte is representable

    @property
    def vocab_size(self) -> int:
        return 256

    def special_tokens(self) -> dict[int, str]:
        return dict(_SPECIALS)

    def _encode_text(self, text: str) -> list[int]:
        # "surrogatepass" keeps lone surrogates encodable (as 0xED sequences); they decode back as U+FFFD.
        return list(text.encode("utf-8", errors="surrogatepass"))

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {}  # nothing to store beyond the meta file

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ByteTokenizer":
        meta = read_meta(directory, expected_kind=cls.kind)
        return check_against_meta(cls(), meta, Path(directory))  # type: ignore[return-value]
