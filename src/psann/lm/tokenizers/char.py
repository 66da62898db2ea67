"""Character-level tokenizer: one id per character seen in training."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import CheckpointError, ConfigError, DataError
from .base import Tokenizer, check_against_meta, nonempty_texts, read_meta

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3


class CharTokenizer(Tokenizer):
    """Ids 0..3 are pad/bos/eos/unk, then the training characters in sorted order.

    Characters not seen in training encode to ``unk_id`` (and so do not round-trip).
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise DataError("CharTokenizer needs a list of distinct single characters")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self._chars = chars
        offset = len(SPECIAL_TOKENS)
        self._index = {c: i + offset for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int | None = None) -> "CharTokenizer":
        """Collect characters; with ``vocab_size``, keep only the most frequent ones."""
        counts: Counter[str] = Counter()
        for text in nonempty_texts(texts, cls.kind):
            counts.update(text)
        chars = sorted(counts)
        if vocab_size is not None:
            room = vocab_size - len(SPECIAL_TOKENS)
            if room < 1:
                raise ConfigError(
                    f"vocab_size {vocab_size} is too small for a char tokenizer; "
                    f"it needs at least {len(SPECIAL_TOKENS) + 1}"
                )
            if len(chars) > room:
                # Most frequent first, ties broken by the character so the result is stable.
                ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
                chars = sorted(c for c, _ in ranked[:room])
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self._chars)

    @property
    def chars(self) -> list[str]:
        return list(self._chars)

    def special_tokens(self) -> dict[int, str]:
        return dict(enumerate(SPECIAL_TOKENS))

    def _encode_text(self, text: str) -> list[int]:
        index, unk = self._index, self.unk_id
        return [index.get(c, unk) for c in text]  # type: ignore[misc]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        offset, chars = len(SPECIAL_TOKENS), self._chars
        return "".join(chars[i - offset] for i in ids)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        # The vocabulary is small enough to live in the meta file itself.
        return {"chars": self._chars}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CharTokenizer":
        meta = read_meta(directory, expected_kind=cls.kind)
        chars = meta.get("chars")
        if not isinstance(chars, list):
            raise CheckpointError(
                f"char tokenizer meta in '{directory}' has no 'chars' list; re-save the tokenizer"
            )
        try:
            tok = cls(chars)
        except DataError as exc:
            raise CheckpointError(f"char tokenizer in '{directory}' is corrupt: {exc}") from exc
        return check_against_meta(tok, meta, Path(directory))  # type: ignore[return-value]
