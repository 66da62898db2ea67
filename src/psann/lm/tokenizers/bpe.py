"""Byte-level BPE tokenizer (GPT-2 style) with a tiktoken encoding engine.

The model is a vocabulary (id -> bytes), an ordered merge list and a set of special tokens.
Encoding: special tokens in the text are matched first (never split or merged; when several
overlap at one position the longest wins), the text between them is pre-tokenised with a regex
(GPT-2's by default), and each pre-token is merged by merge rank. tiktoken does the merging;
``encode_reference`` is a small pure-Python implementation of the same algorithm used to check it.
A long text is encoded in chunks (``encode_stream``) cut before a space or at the end of a run of
letters or numbers (``CUT_BETWEEN_PRETOKENS``): no pre-token of the GPT-2 or GPT-4 pattern crosses
such a place, and specials are never cut, so the ids are exactly those of the whole text.

Role tokens: ``<|endoftext|>`` (or ``<|eos|>``, ``</s>``, ...) is EOS, ``<|bos|>``-like tokens are
BOS and ``<|pad|>``-like tokens are PAD. Because pad/bos/eos must be distinct ids, a role with no
token of its own gets a new special token (``<|bos|>``, ``<|eos|>``, ``<|pad|>``) appended at the
end of the id space; e.g. a GPT-2 vocabulary gains ``<|bos|>`` and ``<|pad|>`` at 50257 and 50258.
There is no UNK: every byte is in the vocabulary.

Files: ``save`` writes GPT-2 format ``vocab.json`` / ``merges.txt`` (bytes shown through GPT-2's
printable byte<->unicode table), ``special_tokens.json`` and ``psann_tokenizer.json``.
``from_files`` loads GPT-2-style files (GPT-2's own included) and ``to_hf`` writes a Hugging Face
``tokenizer.json`` that encodes to the same ids.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import regex
import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTok

from ..errors import CheckpointError, DataError
from .base import CUT_BETWEEN_PRETOKENS, Tokenizer, check_against_meta, read_meta, require_file
from .bpe_train import GPT2_PATTERN, GPT4_PATTERN, train_bpe
from .chat import CHAT_TOKENS
from .gpt2_bytes import str_to_token, token_to_str

DEFAULT_VOCAB_SIZE = 8000
# eos, bos, pad, then the chat role tokens: reserved now so that a pretrained model can be
# fine-tuned for chat without growing its vocabulary.
TRAIN_SPECIALS = ("<|endoftext|>", "<|bos|>", "<|pad|>", *CHAT_TOKENS)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIALS_FILE = "special_tokens.json"
HF_FILE = "tokenizer.json"
HF_SPECIAL_MAP_FILE = "special_tokens_map.json"
MERGES_HEADER = "#version: 0.2"

_ROLES = ("eos", "bos", "pad")  # eos first: "<|endoftext|>" is EOS before anything else
_CANDIDATES = {
    "eos": ["<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>"],
    "bos": ["<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"],
    "pad": ["<|pad|>", "<pad>", "<|padding|>", "[PAD]"],
}
_ADDED_NAMES = {"eos": "<|eos|>", "bos": "<|bos|>", "pad": "<|pad|>"}


def _clean_text(text: str) -> str:
    """Replace lone surrogates (not UTF-8 encodable) with U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"'{path}' is not a valid JSON {what}: {exc}") from exc


class BPETokenizer(Tokenizer):
    """Byte-level BPE; round-trips any Unicode text exactly (lone surrogates become U+FFFD)."""

    kind = "bpe"

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
        pattern: str = GPT2_PATTERN,
        *,
        special_ids: dict[str, int] | None = None,
        roles: dict[str, str] | None = None,
    ) -> None:
        """``special_tokens`` None: every vocab entry that is neither a byte nor a merge result
        is special. ``special_ids`` (token -> id) pins special ids exactly (used when loading)."""
        self.pattern = str(pattern)
        self._pattern_re = regex.compile(self.pattern)
        id_to_bytes: dict[int, bytes] = {}
        for i, tok in vocab.items():
            i = int(i)
            if i < 0:
                raise DataError(f"BPE vocabulary ids must be >= 0, got {i}")
            id_to_bytes[i] = bytes(tok)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        needed: list[bytes] = [bytes([b]) for b in range(256)]
        needed += [a + b for a, b in self.merges]
        needed_set = set(needed)

        # --- special tokens -> ids
        specials: dict[str, int] = {}
        next_id = max(id_to_bytes, default=-1) + 1
        if special_ids is not None:
            for name, i in special_ids.items():
                specials[str(name)] = int(i)
                id_to_bytes[int(i)] = str(name).encode("utf-8")
            next_id = max(id_to_bytes, default=-1) + 1
        else:
            if special_tokens is None:
                names = []
                for _, t in sorted(id_to_bytes.items()):
                    if t not in needed_set:
                        try:
                            names.append(t.decode("utf-8"))
                        except UnicodeDecodeError:
                            pass  # not text: an unreachable ordinary token, kept as is
            else:
                names = [str(s) for s in special_tokens]
            by_bytes: dict[bytes, list[int]] = {}
            for i, t in sorted(id_to_bytes.items()):
                by_bytes.setdefault(t, []).append(i)
            for name in dict.fromkeys(names):
                if not name:
                    raise DataError("special tokens must be non-empty strings")
                raw = name.encode("utf-8")
                ids = [i for i in by_bytes.get(raw, []) if i not in specials.values()]
                # An id whose bytes a merge needs stays ordinary unless there is a spare copy.
                if ids and (raw not in needed_set or len(ids) > 1):
                    specials[name] = ids[0] if raw not in needed_set else ids[-1]
                else:
                    specials[name] = next_id
                    id_to_bytes[next_id] = raw
                    next_id += 1

        # --- roles (pad/bos/eos distinct; missing ones are added at the end)
        roles = dict(roles or {})
        role_tokens: dict[str, str] = {}
        used: set[str] = set()
        for role in _ROLES:
            names = ([roles[role]] if role in roles else []) + _CANDIDATES[role]
            token = next((n for n in names if n in specials and n not in used), None)
            if token is None:
                token = _ADDED_NAMES[role]
                if token in specials:  # taken by another role
                    token = f"<|psann_{role}|>"
                specials[token] = next_id
                id_to_bytes[next_id] = token.encode("utf-8")
                next_id += 1
            role_tokens[role] = token
            used.add(token)
        self._role_tokens = role_tokens
        self._specials = specials
        self.eos_id = specials[role_tokens["eos"]]
        self.bos_id = specials[role_tokens["bos"]]
        self.pad_id = specials[role_tokens["pad"]]
        self.unk_id = None
        self._vocab_size = max(id_to_bytes) + 1
        self._id_to_bytes = id_to_bytes
        self._id_bytes_list: list[bytes | None] = [None] * self._vocab_size
        for i, t in id_to_bytes.items():
            self._id_bytes_list[i] = t
        self._special_id_set = set(specials.values())

        # --- mergeable tokens: bytes -> our id (lowest id when bytes repeat)
        bytes_to_id: dict[bytes, int] = {}
        for i, t in sorted(id_to_bytes.items()):
            if i not in self._special_id_set and t not in bytes_to_id:
                bytes_to_id[t] = i
        missing = [t for t in needed if t not in bytes_to_id]
        if missing:
            raise DataError(
                f"BPE vocabulary lacks {len(missing)} token(s) that the byte table or the merges "
                f"need (first: {missing[0]!r}); the vocab and merges do not belong together"
            )
        self._bytes_to_id = bytes_to_id
        self._pair_rank: dict[tuple[bytes, bytes], int] = {}
        for r, pair in enumerate(self.merges):
            self._pair_rank.setdefault(pair, r)
        # tiktoken merges the lowest rank first and only ranks multi-byte tokens against each
        # other. When our ids already grow in merge order (files we train, GPT-2's), the ids are
        # the ranks and tiktoken returns our ids directly; otherwise ranks are contiguous and
        # mapped to ids afterwards.
        merged_ids = [bytes_to_id[t] for t in dict.fromkeys(needed[256:]) if len(t) > 1]
        ids_are_ranks = all(x < y for x, y in zip(merged_ids, merged_ids[1:]))
        ranks: dict[bytes, int] = {}
        for t in needed:
            if t not in ranks:
                ranks[t] = bytes_to_id[t] if ids_are_ranks else len(ranks)
        self._rank_to_id = None if ids_are_ranks else np.array([bytes_to_id[t] for t in ranks], dtype=np.int64)
        # tiktoken finds specials itself, exactly, when none is a prefix of another (its
        # alternation takes the first listed match, not the longest).
        prefix_free = not any(x != y and y.startswith(x) for x in specials for y in specials)
        self._native_specials = frozenset(specials) if ids_are_ranks and prefix_free else None

        self._enc = tiktoken.Encoding(
            name=f"psann_bpe_{id(self)}", pat_str=self.pattern, mergeable_ranks=ranks,
            special_tokens=specials if self._native_specials is not None else {},
        )
        # Longest first, so that overlapping specials match the longest (re tries in order).
        ordered = sorted(specials, key=lambda s: (-len(s), s))
        self._special_re = re.compile("|".join(re.escape(s) for s in ordered))
        self._check_special_ids()

    # ----- constructors -----------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int | None = None) -> "BPETokenizer":
        """Train on in-memory documents (joined by <|endoftext|>) with the from-scratch trainer.

        vocab_size (default 8000) is an upper bound: a small corpus stops when no pair is left."""
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
        with tempfile.TemporaryDirectory(prefix="psann-bpe-") as tmp:
            path = Path(tmp) / "corpus.txt"
            n_docs = 0
            with open(path, "w", encoding="utf-8") as fh:
                for text in texts:
                    if text and text.strip():
                        fh.write(TRAIN_SPECIALS[0] if n_docs else "")
                        fh.write(text)
                        n_docs += 1
            if n_docs == 0:
                raise DataError("no text to train the 'bpe' tokenizer on: every document is empty.")
            vocab, merges = train_bpe(path, vocab_size, TRAIN_SPECIALS, progress=False)
        return cls(vocab, merges, list(TRAIN_SPECIALS))

    @classmethod
    def from_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
        *,
        pattern: str = GPT2_PATTERN,
        roles: dict[str, str] | None = None,
        special_ids: dict[str, int] | None = None,
    ) -> "BPETokenizer":
        """Load GPT-2-style ``vocab.json`` (token -> id) and ``merges.txt``.

        Ids are taken from the vocab file as they are. Special tokens: those named, or when
        None, every entry that is neither a byte nor a merge result (or is not in the byte table).
        """
        vocab_path, merges_path = Path(vocab_json), Path(merges_txt)
        if not merges_path.is_file():
            raise DataError(f"BPE file '{merges_path}' does not exist")
        raw_vocab = _read_json(vocab_path, "BPE vocab file")
        if not isinstance(raw_vocab, dict):
            raise DataError(f"'{vocab_path}' must hold a JSON object token -> id")
        pairs = [(f"{merges_path}:{n}", line.split(" "))
                 for n, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip() and not (n == 1 and line.startswith("#version"))]
        return cls._from_tables(raw_vocab, pairs, str(vocab_path), special_tokens, pattern=pattern, roles=roles,
                                special_ids=special_ids)

    @classmethod
    def from_hf(cls, tokenizer_json: str | os.PathLike) -> "BPETokenizer":
        """Load a Hugging Face byte-level BPE ``tokenizer.json`` (roles from a
        ``special_tokens_map.json`` beside it when present)."""
        path = Path(tokenizer_json)
        data = _read_json(path, "Hugging Face tokenizer file")
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or data.get("normalizer"):
            raise DataError(f"'{path}': only byte-level BPE without a normalizer can be loaded as 'bpe' "
                            f"(model {model.get('type')!r}); load it with tokenizer='tokenizers' instead")
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            pattern = GPT2_PATTERN
        else:
            raise DataError(f"'{path}': unsupported pre-tokenizer {pre.get('type')!r} (need ByteLevel with the GPT-2 "
                            "regex and no prefix space); load it with tokenizer='tokenizers' instead")
        raw_vocab = dict(model.get("vocab") or {})
        added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        raw_vocab.update(added)
        pairs = [(f"{path}: merge {n}", m.split(" ") if isinstance(m, str) else list(m))
                 for n, m in enumerate(model.get("merges") or [], 1)]
        roles = None
        role_file = path.with_name(HF_SPECIAL_MAP_FILE)
        if role_file.is_file():
            role_map = json.loads(role_file.read_text(encoding="utf-8"))
            roles = {k[:-len("_token")]: v if isinstance(v, str) else v.get("content")
                     for k, v in role_map.items() if k in ("bos_token", "eos_token", "pad_token")}
        return cls._from_tables(raw_vocab, pairs, str(path), list(added), pattern=pattern, roles=roles)

    @classmethod
    def _from_tables(cls, raw_vocab: dict, pairs: list[tuple[str, list[str]]], source: str,
                     special_tokens: Sequence[str] | None, *, pattern: str, roles: dict[str, str] | None,
                     special_ids: dict[str, int] | None = None) -> "BPETokenizer":
        """Build from GPT-2-style tables: token string -> id, and merges as string pairs in rank order."""
        vocab_path = source
        merges: list[tuple[bytes, bytes]] = []
        for where, parts in pairs:
            a, b = (str_to_token(p) for p in parts) if len(parts) == 2 else (None, None)
            if a is None or b is None:
                raise DataError(f"{where}: expected two byte-level tokens, got {' '.join(map(str, parts))!r}")
            merges.append((a, b))
        needed = {bytes([b]) for b in range(256)} | {a + b for a, b in merges}
        wanted = None if special_tokens is None else set(special_tokens)
        vocab: dict[int, bytes] = {}
        pinned = dict(special_ids or {})
        pinned_ids = set(pinned.values())
        special_ids = dict(pinned)
        if pinned:
            wanted = set(pinned)
        for key, i in raw_vocab.items():
            if not isinstance(i, int) or isinstance(i, bool):
                raise DataError(f"'{vocab_path}': id of {key!r} must be an integer, got {i!r}")
            token = str_to_token(key)
            if i in pinned_ids:
                continue
            if wanted is not None and key in wanted and not pinned:
                special_ids[key] = i
            elif token is None:
                special_ids[key] = i  # not byte-level text: can only be a special token
            elif wanted is None and token not in needed:
                special_ids[key] = i
            else:
                vocab[i] = token
        for name in wanted or ():
            if name not in special_ids:  # named but absent: append
                special_ids[name] = max([*vocab, *special_ids.values(), -1]) + 1
        return cls(vocab, merges, pattern=pattern, special_ids=special_ids, roles=roles)

    # ----- Tokenizer interface ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Every special token (role tokens included) -> id."""
        return dict(self._specials)

    def special_tokens(self) -> dict[int, str]:
        return {self._specials[t]: t for t in self._role_tokens.values()}

    def _split(self, text: str) -> Iterator[tuple[str, bool]]:
        """(segment, is_special) pieces of ``text``; specials matched longest-first."""
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    def _ranks_to_ids(self, ranks: list[int]) -> list[int]:
        if not ranks or self._rank_to_id is None:
            return ranks
        return self._rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()

    def _encode_text(self, text: str) -> list[int]:
        if self._native_specials is not None:
            return self._enc.encode(text, allowed_special=self._native_specials, disallowed_special=())
        text = _clean_text(text)
        if self._special_re.search(text) is None:
            return self._ranks_to_ids(self._enc.encode_ordinary(text))
        out: list[int] = []
        for seg, special in self._split(text):
            if special:
                out.append(self._specials[seg])
            else:
                out.extend(self._ranks_to_ids(self._enc.encode_ordinary(seg)))
        return out

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
        num_threads: int = 8,
    ) -> list[list[int]]:
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise DataError("encode_batch() expects a sequence of str")
        if self._native_specials is not None:
            encoded = self._enc.encode_batch(texts, num_threads=num_threads, allowed_special=self._native_specials,
                                             disallowed_special=())
            return [self._wrap(ids, add_bos, add_eos) for ids in encoded]
        # Flatten every text's ordinary segments into one tiktoken batch call.
        plans: list[list[tuple[bool, Any]]] = []
        ordinary: list[str] = []
        for text in texts:
            plan: list[tuple[bool, Any]] = []
            for seg, special in self._split(_clean_text(text)):
                if special:
                    plan.append((True, self._specials[seg]))
                else:
                    plan.append((False, len(ordinary)))
                    ordinary.append(seg)
            plans.append(plan)
        encoded = self._enc.encode_ordinary_batch(ordinary, num_threads=num_threads) if ordinary else []
        result = []
        for plan in plans:
            ids: list[int] = []
            for special, value in plan:
                if special:
                    ids.append(value)
                else:
                    ids.extend(self._ranks_to_ids(encoded[value]))
            result.append(self._wrap(ids, add_bos, add_eos))
        return result

    def encode_reference(self, text: str) -> list[int]:
        """Pure-Python encoder (regex pre-tokenise, merge lowest-rank pair repeatedly)."""
        text = _clean_text(text)
        out: list[int] = []
        for seg, special in self._split(text):
            if special:
                out.append(self._specials[seg])
                continue
            for m in self._pattern_re.finditer(seg):
                parts = [bytes([b]) for b in m.group().encode("utf-8")]
                while len(parts) > 1:
                    best, best_rank = -1, None
                    for i in range(len(parts) - 1):
                        r = self._pair_rank.get((parts[i], parts[i + 1]))
                        if r is not None and (best_rank is None or r < best_rank):
                            best, best_rank = i, r
                    if best < 0:
                        break
                    parts[best:best + 2] = [parts[best] + parts[best + 1]]
                out.extend(self._bytes_to_id[p] for p in parts)
        return out

    def _stream_cuts(self):
        # Exact for the patterns we train with (see CUT_BETWEEN_PRETOKENS); another sees the whole text.
        return CUT_BETWEEN_PRETOKENS if self.pattern in (GPT2_PATTERN, GPT4_PATTERN) else None

    def _unsplittable(self) -> list[str]:
        return list(self._specials)

    def encode_iterable(self, texts: Iterable[str], *, buffer_chars: int = 4096) -> Iterator[int]:
        """Lazily encode a stream of text chunks; equals ``encode("".join(texts))``.

        Text is buffered and encoded up to a safe cut (see ``encode_stream``), so memory stays
        about ``buffer_chars`` plus one chunk and the longest pre-token (CJK and JSON cut at
        punctuation; only one huge pre-token, such as letters with no punctuation, is held whole).
        """
        for ids in self.encode_stream(texts, chunk_chars=buffer_chars):
            yield from ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        table = self._id_bytes_list
        parts: list[bytes] = []
        for i in ids:
            tok = table[i]
            if tok is None:  # a gap in the id space
                parts.append("\ufffd".encode("utf-8"))
            elif i in self._special_id_set and skip_special_tokens:
                continue
            else:
                parts.append(tok)
        return b"".join(parts).decode("utf-8", errors="replace")

    # ----- files ------------------------------------------------------------------------
    def _vocab_json(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, t in sorted(self._id_to_bytes.items()):
            if i not in self._special_id_set:
                out.setdefault(token_to_str(t), i)
        for name, i in sorted(self._specials.items(), key=lambda kv: kv[1]):
            out.setdefault(name, i)  # GPT-2 keeps "<|endoftext|>" in vocab.json too
        return out

    def _write_gpt2_files(self, directory: Path) -> None:
        vocab = self._vocab_json()
        (directory / VOCAB_FILE).write_text(
            json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        lines = [MERGES_HEADER] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in self.merges]
        (directory / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self._write_gpt2_files(directory)
        specials = {"special_tokens": dict(sorted(self._specials.items(), key=lambda kv: kv[1])),
                    "roles": dict(self._role_tokens)}
        (directory / SPECIALS_FILE).write_text(
            json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # Ordinary tokens whose bytes repeat or that are unreachable keep their ids only through
        # vocab.json; the meta lists the files and the pre-tokenisation pattern.
        return {"vocab_file": VOCAB_FILE, "merges_file": MERGES_FILE,
                "special_tokens_file": SPECIALS_FILE, "pattern": self.pattern,
                "special_tokens": dict(self._role_tokens)}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BPETokenizer":
        directory = Path(directory)
        meta = read_meta(directory, expected_kind=cls.kind)
        vocab_path = require_file(directory, str(meta.get("vocab_file", VOCAB_FILE)))
        merges_path = require_file(directory, str(meta.get("merges_file", MERGES_FILE)))
        specials_path = require_file(directory, str(meta.get("special_tokens_file", SPECIALS_FILE)))
        try:
            info = json.loads(specials_path.read_text(encoding="utf-8"))
            special_ids = {str(k): int(v) for k, v in info["special_tokens"].items()}
            roles = {str(k): str(v) for k, v in info.get("roles", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{specials_path}' is corrupt ({exc}); re-save the tokenizer") from exc
        try:
            tok = cls.from_files(vocab_path, merges_path, pattern=str(meta.get("pattern", GPT2_PATTERN)),
                                 roles=roles, special_ids=special_ids)
        except DataError as exc:
            raise CheckpointError(f"saved BPE tokenizer in '{directory}' is corrupt: {exc}") from exc
        if tok.special_token_ids != special_ids:
            raise CheckpointError(
                f"'{specials_path}' and '{vocab_path}' disagree on special token ids; re-save the tokenizer")
        return check_against_meta(tok, meta, directory)  # type: ignore[return-value]

    def to_hf(self, directory: str | os.PathLike) -> Path:
        """Write a Hugging Face ``tokenizer.json`` (+ ``special_tokens_map.json``) with equal ids.

        Special tokens become added tokens; Hugging Face matches them in the text just like
        :meth:`encode` does (including longest-first for overlapping ones).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab: dict[str, int] = {}
        for i, t in sorted(self._id_to_bytes.items()):
            if i not in self._special_id_set:
                vocab.setdefault(token_to_str(t), i)
        for name, i in self._specials.items():
            vocab.setdefault(name, i)
        merges = [(token_to_str(a), token_to_str(b)) for a, b in self.merges]
        tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        if self.pattern == GPT2_PATTERN:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(self.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        ordered = sorted(self._specials.items(), key=lambda kv: kv[1])
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in ordered])
        for name, i in ordered:
            if tok.token_to_id(name) != i:
                raise DataError(f"special token {name!r} would get id {tok.token_to_id(name)} "
                                f"instead of {i} in tokenizer.json")
        path = directory / HF_FILE
        tok.save(str(path))
        role_map = {f"{r}_token": t for r, t in self._role_tokens.items()}
        (directory / HF_SPECIAL_MAP_FILE).write_text(
            json.dumps(role_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return path
