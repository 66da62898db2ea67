"""SentencePiece backend (named spm.py so it does not shadow the library)."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece

from ..errors import CheckpointError, ConfigError, DataError
from .base import CUT_BEFORE_SPACE, Tokenizer, check_against_meta, nonempty_texts, read_meta, require_file

DEFAULT_VOCAB_SIZE = 8000
MODEL_FILE = "tokenizer.model"
# 4 specials + "\n" + 256 byte-fallback pieces + at least one real piece.
MIN_VOCAB_SIZE = 262
# SentencePiece silently drops training sentences longer than max_sentence_length
# bytes, so long lines are cut into chunks safely below it.
_MAX_SENTENCE_BYTES = 4192
_CHUNK_BYTES = 4000


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Split documents into lines, and over-long lines into chunks, for the trainer."""
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            if len(line.encode("utf-8", errors="replace")) <= _CHUNK_BYTES:
                yield line
                continue
            # Characters are at most 4 bytes, so this many always fit in one chunk.
            step = _CHUNK_BYTES // 4
            for start in range(0, len(line), step):
                yield line[start : start + step]


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece model.

    Trained models use pad=0, bos=1 (``<s>``), eos=2 (``</s>``), unk=3, then ``"\\n"``
    and the 256 byte-fallback pieces. A loaded external model keeps its own ids; any
    of pad/bos/eos it lacks gets a fresh id after its last piece (such ids only ever
    appear as specials and decode to nothing).

    Round trips: ordinary text (any Unicode, runs of spaces, tabs, newlines, leading
    spaces) survives ``decode(encode(s))``. The exception: the character U+2581 "▁",
    which SentencePiece uses internally for spaces, decodes as a plain space.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        self._proto = bytes(model_proto)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as exc:  # the library raises RuntimeError/OSError variants
            raise DataError(f"not a valid SentencePiece model: {exc}") from exc
        self._pieces = self._sp.get_piece_size()
        self._extra: list[str] = []  # names of specials appended after the model's pieces
        self.unk_id = self._sp.unk_id()
        used = {self.unk_id}
        self.bos_id = self._own_or_new(self._sp.bos_id(), "<s>", used)
        self.eos_id = self._own_or_new(self._sp.eos_id(), "</s>", used)
        self.pad_id = self._own_or_new(self._sp.pad_id(), "<pad>", used)
        self._check_special_ids()
        self._cuts_exact: bool | None = None  # found out on first use

    def _own_or_new(self, own: int, name: str, used: set[int]) -> int:
        if own < 0 or own in used:
            own = self._pieces + len(self._extra)
            self._extra.append(name)
        used.add(own)
        return own

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int | None = None) -> "SentencePieceTokenizer":
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size {vocab_size} is too small for sentencepiece with byte fallback; "
                f"use at least {MIN_VOCAB_SIZE}, or the 'byte' or 'char' tokenizer"
            )
        # nonempty_texts raises DataError here, before the trainer starts, on no text.
        sentences = _training_sentences(nonempty_texts(texts, cls.kind))
        first = next(sentences, None)
        if first is None:
            raise DataError("cannot train a 'sentencepiece' tokenizer: the texts hold only newlines")
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], sentences),
                model_writer=model,
                # Unigram: SentencePiece's default and the model its soft vocab limit
                # (hard_vocab_limit=False) is built for, so tiny corpora simply get a
                # smaller vocabulary instead of an error.
                model_type="unigram",
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                # Byte fallback: characters outside the vocab become <0xNN> pieces,
                # so nothing maps to unk and every string round-trips.
                byte_fallback=True,
                character_coverage=0.9995,
                # No normalisation at all, so decode(encode(s)) == s.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                # A dummy prefix puts a space before every encoded string, so ids of
                # separately encoded pieces would not concatenate to the joined text.
                add_dummy_prefix=False,
                # Training sees single lines, so "\n" is added as its own piece.
                user_defined_symbols=["\n"],
                allow_whitespace_only_pieces=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
                # A fixed thread count fixes how work is split, keeping results identical
                # across machines with different core counts.
                num_threads=16,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise ConfigError(
                f"sentencepiece training failed with vocab_size={vocab_size}: {exc}. "
                "If it says the vocabulary is too small, increase vocab_size."
            ) from exc
        return cls(model.getvalue())

    @classmethod
    def from_model_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load an external ``.model`` file (e.g. one trained with spm_train)."""
        path = Path(path)
        try:
            return cls(path.read_bytes())
        except DataError as exc:
            raise DataError(f"'{path}' is not a SentencePiece .model file: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self._pieces + len(self._extra)

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        return self._sp

    def special_tokens(self) -> dict[int, str]:
        names = {}
        for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id):
            names[i] = self._sp.id_to_piece(i) if i < self._pieces else self._extra[i - self._pieces]
        return names

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _stream_cuts(self):
        if self._cuts_exact is None:
            self._cuts_exact = self._cuts_before_space_exact()
        return CUT_BEFORE_SPACE if self._cuts_exact else None

    def _cuts_before_space_exact(self) -> bool:
        """Whether text cut before a space encodes, part by part, to the ids of the whole: true when
        the model keeps the text as it is (no normalisation, dummy prefix or whitespace removal,
        as in the models we train) and no piece joins a character to a space after it; then no
        piece spans the cut and the best segmentation of the whole is that of the parts."""
        sp = self._sp
        probe = "  a  \ufb01 \uff21 b "  # NFKC would turn the ligature and the full-width A into "fi", "A"
        if sp.decode(sp.encode(probe)) != probe:
            return False
        if any(sp.encode(a + b) != sp.encode(a) + sp.encode(b) for a, b in (("a", " b"), ("x.", " y"))):
            return False  # e.g. a dummy prefix before every encoded text
        for i in range(self._pieces):
            if not (sp.IsByte(i) or sp.IsControl(i) or sp.IsUnknown(i)) and "\u2581" in sp.id_to_piece(i).lstrip("\u2581"):
                return False
        return True

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise DataError("encode_batch() expects a sequence of str")
        return [self._wrap(ids, add_bos, add_eos) for ids in self._sp.encode(texts)]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Appended ids are always specials, so everything here is a real piece.
        return self._sp.decode(ids)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        (directory / MODEL_FILE).write_bytes(self._proto)
        return {"model_file": MODEL_FILE}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SentencePieceTokenizer":
        meta = read_meta(directory, expected_kind=cls.kind)
        path = require_file(Path(directory), str(meta.get("model_file", MODEL_FILE)))
        try:
            tok = cls(path.read_bytes())
        except DataError as exc:
            raise CheckpointError(f"'{path}' is corrupt: {exc}") from exc
        return check_against_meta(tok, meta, Path(directory))  # type: ignore[return-value]
