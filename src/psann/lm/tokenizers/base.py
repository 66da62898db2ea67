"""The tokenizer interface shared by every backend, plus save/load helpers."""

from __future__ import annotations

import abc
import itertools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

from ..errors import CheckpointError, DataError

META_FILE = "psann_tokenizer.json"
FORMAT_VERSION = 1
# Shown in place of ids outside [0, vocab_size), e.g. from a model whose output
# layer was padded past the tokenizer's vocabulary. Decoding must never crash.
OUT_OF_RANGE_TEXT = "\ufffd"


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

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write backend files into ``directory``; return extra fields for the meta file."""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a directory written by :meth:`save` (backends override this)."""
        if cls is not Tokenizer:
            raise NotImplementedError(f"{cls.__name__} does not implement load()")
        from . import load_tokenizer  # the registry lives in the package

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

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
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
        from .chat import default_chat_template

        return getattr(self, "_chat_template", None) or default_chat_template(self.special_token_ids)

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        from .chat import _compile

        if template is not None:
            _compile(template)  # fail now, not at the first conversation
        self._chat_template = template

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """Render a conversation ``[{"role", "content"}, ...]`` (no BOS); ids, or the text if not ``tokenize``."""
        from .chat import check_messages, render

        names = self.special_tokens()
        variables = {f"{role}_token": names.get(getattr(self, f"{role}_id")) for role in ("bos", "eos", "pad", "unk")}
        text = render(self.chat_template, check_messages(messages), add_generation_prompt=add_generation_prompt,
                      variables=variables)
        return self.encode_rendered(text) if tokenize else text

    def encode_rendered(self, text: str) -> list[int]:
        """Encode text that may hold special-token strings (a rendered chat template) as their ids."""
        from .chat import split_specials

        ids: list[int] = []
        for piece in split_specials(text, self.special_token_ids):
            ids.extend([piece] if isinstance(piece, int) else self._encode_text(piece))
        return ids

    @property
    def chat_stop_ids(self) -> set[int]:
        """Ids that end an assistant turn: EOS, and the end-of-turn token where the vocabulary has one."""
        from .chat import END_OF_TURN

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
        from .chat import write_tokenizer_config

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
