"""The tokenizer interface shared by every backend, plus save/load helpers."""

from __future__ import annotations

import abc
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence, Union
from unicodedata import ucd_3_2_0

import regex

from ..errors import CheckpointError, DataError
from .chat import END_OF_TURN, _compile, check_messages, default_chat_template, render, split_specials, write_tokenizer_config

META_FILE = "psann_tokenizer.json"
FORMAT_VERSION = 1
# Shown in place of ids outside [0, vocab_size), e.g. from a model whose output
# layer was padded past the tokenizer's vocabulary. Decoding must never crash.
OUT_OF_RANGE_TEXT = "\ufffd"

STREAM_CHARS = 1 << 18  # characters encoded per call when a long text is encoded piece by piece
# Where a long text may be cut so that its parts, encoded apart, give the ids of the whole (a cut
# falls after each match, which is one character):
CUT_ANYWHERE = re.compile(r"[^\ud800-\udbff]")  # byte, char: anywhere but inside a surrogate pair
# Subword backends: before a space that follows a character other than whitespace or U+2581. No
# pre-token of the GPT-2 / GPT-4 patterns and no SentencePiece piece joins such a character to the
# space after it (each backend checks this holds for its model before it uses the rule).
CUT_BEFORE_SPACE = re.compile(r"[^\s\u2581](?= )")


class _BetweenPretokens:
    r"""Byte-level BPE with the GPT-2 / GPT-4 patterns, for text without spaces (CJK, minified JSON):
    before a space as above, or after a letter followed by a non-letter, or after a number followed
    by a non-number. Exact because every pre-token that holds a letter (\p{L}+, or 's, 'll, ...)
    ends where its run of letters ends, and every one that holds a number (\p{N}+, \p{N}{1,3})
    where its run of numbers ends, so the cut is a pre-token boundary of the whole text; and the
    patterns read the character after it only to ask for one more letter (or number), which fails
    there just as it fails at the end of the left part, so each part splits as in the whole (the
    patterns look nothing up behind). Both characters must be in Unicode 3.2, so that the encoder's
    tables (tiktoken's and Hugging Face's lag the `regex` module's) class them alike, and neither a
    surrogate, which the encoders may join into one character. A single pre-token (letters with no
    punctuation) has no such place and is held whole."""

    rule = regex.compile(r"[^\s\u2581](?= )|\p{L}(?=[^\p{L}\ud800-\udfff])|\p{N}(?=[^\p{N}\ud800-\udfff])")

    def finditer(self, text: str, pos: int = 0) -> Iterator[Any]:
        for m in self.rule.finditer(text, pos):
            p = m.end()
            if text[p] == " " or "Cn" not in (ucd_3_2_0.category(text[p - 1]), ucd_3_2_0.category(text[p])):
                yield m

    def search(self, text: str, pos: int = 0) -> Any:
        return next(self.finditer(text, pos), None)


CUT_BETWEEN_PRETOKENS = _BetweenPretokens()
Cuts = Union[re.Pattern, _BetweenPretokens]  # what `_next_cut` needs: search(text, pos) -> match or None


class TokenizerFileNotFoundError(DataError, FileNotFoundError):
    """A tokenizer model file or directory given by the user does not exist."""


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses fill in the ``_encode_text``/``_decode_ids`` hooks.

    ``pad_id``, ``bos_id``, ``eos_id`` and ``unk_id`` (may be None) are distinct and all
    below ``vocab_size``. ``encode`` never adds BOS/EOS unless asked to.
    """

    kind: ClassVar[str]
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int | None = None

    # ----- hooks for backends -------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Total number of ids, special tokens included."""

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Encode plain text with no special tokens added."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Decode in-range ids that are not pad/bos/eos/unk."""

    @abc.abstractmethod
    def special_tokens(self) -> dict[int, str]:
        """Map each of pad/bos/eos/unk id to its token text."""

    def _stream_cuts(self) -> Cuts | None:
        """Where `encode_stream` may cut a text (see CUT_ANYWHERE), or None when this tokenizer's
        model must see the whole text."""
        return CUT_ANYWHERE

    def _unsplittable(self) -> Sequence[str]:
        """Strings encoded as one token wherever they occur in the text: no cut falls inside one."""
        return ()

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write backend files into ``directory``; return extra fields for the meta file."""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a directory written by :meth:`save` (backends override this)."""
        if cls is not Tokenizer:
            raise NotImplementedError(f"{cls.__name__} does not implement load()")
        from . import load_tokenizer  # lazy: the registry lives in the package, which imports this module

        return load_tokenizer(directory)

    # ----- public API ------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise DataError(f"encode() expects a str, got {type(text).__name__}")
        return self._wrap(self._encode_text(text), add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def encode_stream(self, pieces: str | Iterable[str], *, add_bos: bool = False, add_eos: bool = False,
                      chunk_chars: int = STREAM_CHARS) -> Iterator[list[int]]:
        """The ids of the text `"".join(pieces)`, a list per chunk of about `chunk_chars` characters:
        chained, exactly `encode(text, add_bos=..., add_eos=...)`, while only a chunk of text and
        its ids are held at a time. Chunks end only where the tokenizer would cut anyway
        (`_stream_cuts`); a tokenizer that cannot be cut exactly encodes the joined text at once."""
        if isinstance(pieces, str):
            pieces = [pieces]
        if add_bos:
            yield [self.bos_id]
        cuts = self._stream_cuts()
        if cuts is None:
            yield self._encode_text("".join(_text_pieces(pieces)))
        else:
            for chunk in cut_text(pieces, cuts, self._unsplittable(), chunk_chars):
                yield self._encode_text(chunk)
        if add_eos:
            yield [self.eos_id]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`, special tokens included (decode(encode(text)) == text, as tiktoken and HF
        tokenizers give); generation passes skip_special_tokens=True to leave them out."""
        specials = self.special_tokens()
        size = self.vocab_size
        parts: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if 0 <= i < size and i not in specials:
                run.append(i)
                continue
            # Flush ordinary ids before emitting a special or invalid id.
            if run:
                parts.append(self._decode_ids(run, skip_special_tokens))
                run = []
            if not 0 <= i < size:
                parts.append(OUT_OF_RANGE_TEXT)
            elif not skip_special_tokens:
                parts.append(specials[i])
        if run:
            parts.append(self._decode_ids(run, skip_special_tokens))
        return "".join(parts)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Every special token's text -> id (backends with more than pad/bos/eos/unk override this)."""
        return {text: i for i, text in self.special_tokens().items()}

    # ----- chat -------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        """The Jinja chat template (saved in tokenizer_config.json); a default fits the vocabulary."""
        return getattr(self, "_chat_template", None) or default_chat_template(self.special_token_ids)

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None:
            _compile(template)  # fail now, not at the first conversation
        self._chat_template = template

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """Render a conversation ``[{"role", "content"}, ...]`` (no BOS); ids, or the text if not ``tokenize``."""
        names = self.special_tokens()
        variables = {f"{role}_token": names.get(getattr(self, f"{role}_id")) for role in ("bos", "eos", "pad", "unk")}
        text = render(self.chat_template, check_messages(messages), add_generation_prompt=add_generation_prompt,
                      variables=variables)
        return self.encode_rendered(text) if tokenize else text

    def encode_rendered(self, text: str) -> list[int]:
        """Encode text that may hold special-token strings (a rendered chat template) as their ids."""
        ids: list[int] = []
        for piece in split_specials(text, self.special_token_ids):
            ids.extend([piece] if isinstance(piece, int) else self._encode_text(piece))
        return ids

    @property
    def chat_stop_ids(self) -> set[int]:
        """Ids that end an assistant turn: EOS, and the end-of-turn token where the vocabulary has one."""
        end = self.special_token_ids.get(END_OF_TURN)
        return {self.eos_id} | ({end} if end is not None else set())

    def special_ids(self) -> set[int]:
        ids = {self.pad_id, self.bos_id, self.eos_id, self.unk_id}
        ids.discard(None)
        return ids  # type: ignore[return-value]

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        extra = self._save_files(path)
        roles = {r: t for r in ("bos", "eos", "pad", "unk")
                 if (t := self.special_tokens().get(getattr(self, f"{r}_id"))) is not None}
        write_tokenizer_config(path, self.chat_template, roles)
        meta = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            **extra,
        }
        # sort_keys keeps the file byte-stable, which the fingerprint relies on.
        text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
        (path / META_FILE).write_text(text, encoding="utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # ----- helpers for subclasses ------------------------------------------------
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def _check_special_ids(self) -> None:
        """Fail early if a backend produced colliding or out-of-range special ids."""
        ids = [i for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id) if i is not None]
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.vocab_size for i in ids):
            raise DataError(
                f"{self.kind} tokenizer has invalid special ids (pad={self.pad_id}, "
                f"bos={self.bos_id}, eos={self.eos_id}, unk={self.unk_id}, "
                f"vocab_size={self.vocab_size}); they must be distinct and < vocab_size"
            )


def _text_pieces(pieces: Iterable[str]) -> Iterator[str]:
    for piece in pieces:
        if not isinstance(piece, str):
            raise DataError(f"text pieces must be str, got {type(piece).__name__}")
        yield piece


def _next_cut(text: str, lo: int, hi: int, cuts: Cuts, unsplittable: Sequence[str]) -> int:
    """The first place in [lo, hi] where `cuts` allows a cut and no unsplittable string spans it; -1: none."""
    m = cuts.search(text, max(0, lo - 1))
    while m is not None and m.end() <= hi:
        p = m.end()
        if not any(text.find(s, max(0, p - len(s) + 1), p + len(s) - 1) >= 0 for s in unsplittable):
            return p
        m = cuts.search(text, m.start() + 1)
    return -1


def cut_text(pieces: Iterable[str], cuts: Cuts, unsplittable: Sequence[str] = (),
             chunk_chars: int = STREAM_CHARS) -> Iterator[str]:
    """The text of `pieces` again, in chunks of at least `chunk_chars` characters (the last may be
    shorter) that end only after a match of `cuts` and never inside one of `unsplittable`. A stretch
    with no such place is held until one comes (or the text ends)."""
    chunk_chars = max(1, int(chunk_chars))
    long_ones = [s for s in unsplittable if len(s) > 1]
    guard = max([1, *map(len, long_ones)])  # characters past a cut that must be seen to judge it
    pending: list[str] = []
    size, want = 0, chunk_chars
    for piece in _text_pieces(pieces):
        pending.append(piece)
        size += len(piece)
        if size < want:
            continue
        text, pos, stuck = "".join(pending), 0, False
        while len(text) - pos >= chunk_chars:
            cut = _next_cut(text, pos + chunk_chars, len(text) - guard, cuts, long_ones)
            if cut < 0:
                stuck = True
                break
            yield text[pos:cut]
            pos = cut
        rest = text[pos:] if pos else text
        pending, size = [rest], len(rest)
        want = 2 * size if stuck else chunk_chars  # stuck: search again once twice the text is here
    tail = "".join(pending)
    if tail:
        yield tail


def nonempty_texts(texts: Iterable[str], kind: str) -> Iterator[str]:
    """Yield the non-empty texts; raise DataError up front if there are none.

    The first non-empty text is looked up eagerly so that an empty corpus fails
    here, with a clear message, instead of deep inside a trainer library.
    """
    if isinstance(texts, str):  # a single string would otherwise be read char by char
        texts = [texts]

    def checked() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"tokenizer training texts must be str, got {type(text).__name__}")
            if text:
                yield text

    stream = checked()
    first = next(stream, None)
    if first is None:
        raise DataError(
            f"cannot train a '{kind}' tokenizer: no text was given (or every text was empty). "
            "Check the training data path, or use kind 'byte', which needs no training."
        )
    return itertools.chain([first], stream)


def read_meta(directory: str | os.PathLike, expected_kind: str | None = None) -> dict[str, Any]:
    """Read and validate ``psann_tokenizer.json`` in a saved tokenizer directory."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(
            f"tokenizer directory '{path}' does not exist; pass a directory written by Tokenizer.save()"
        )
    if not meta_path.is_file():
        raise CheckpointError(
            f"'{meta_path}' is missing, so '{path}' is not a saved psann tokenizer; "
            "re-save the tokenizer with Tokenizer.save() or pass its model file as model_path"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{meta_path}' is not valid JSON ({exc}); re-save the tokenizer") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{meta_path}' must hold a JSON object; re-save the tokenizer")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"'{meta_path}' has format_version {version!r}, but this psann reads only "
            f"{FORMAT_VERSION}; re-save the tokenizer with this version of psann"
        )
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointError(
            f"'{meta_path}' holds a {meta.get('kind')!r} tokenizer, not {expected_kind!r}; "
            "use load_tokenizer() to load whatever kind it is"
        )
    return meta


def require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(
            f"saved tokenizer directory '{directory}' is missing '{name}'; "
            "copy the whole directory written by Tokenizer.save()"
        )
    return path


def check_against_meta(tok: Tokenizer, meta: dict[str, Any], directory: Path) -> Tokenizer:
    """Catch backend files that were swapped or edited after saving."""
    for key in ("vocab_size", "pad_id", "bos_id", "eos_id", "unk_id"):
        if key in meta and meta[key] != getattr(tok, key):
            raise CheckpointError(
                f"tokenizer in '{directory}' has {key}={getattr(tok, key)} but {META_FILE} says "
                f"{meta[key]}; the files do not belong together, re-save the tokenizer"
            )
    return tok
