"""Hugging Face ``tokenizers`` backend: byte-level BPE."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import CheckpointError, ConfigError, DataError
from .base import CUT_BETWEEN_PRETOKENS, Tokenizer, check_against_meta, nonempty_texts, read_meta, require_file

DEFAULT_VOCAB_SIZE = 8000
MODEL_FILE = "tokenizer.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
# Trained tokenizers get these at ids 0..3.
TRAIN_SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
# 256 byte symbols + 4 specials: the smallest byte-level vocabulary.
MIN_VOCAB_SIZE = 260
# Names tried, in order, when an external tokenizer.json comes without a
# special_tokens_map.json saying which tokens play which role.
_CANDIDATES = {
    "eos": ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<|eot_id|>"],
    "bos": ["<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]", "<|endoftext|>"],
    "pad": ["<pad>", "<|pad|>", "[PAD]", "<|padding|>"],
    "unk": ["<unk>", "[UNK]", "<|unk|>"],
}
_ROLES = ("eos", "bos", "pad", "unk")  # eos first: it matters most when names are shared


def _read_role_map(directory: Path) -> dict[str, str]:
    """Role -> token text from HF's special_tokens_map.json / tokenizer_config.json."""
    found: dict[str, str] = {}
    for name in (SPECIAL_MAP_FILE, "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue  # a broken side file should not stop the tokenizer loading
        for role in _ROLES:
            value = data.get(f"{role}_token") if isinstance(data, dict) else None
            if isinstance(value, dict):  # AddedToken form: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str) and role not in found:
                found[role] = value
    return found


class HFTokenizer(Tokenizer):
    """Wraps a ``tokenizers.Tokenizer``.

    Special tokens are never matched inside input text (``encode_special_tokens``),
    so a literal "</s>" in the data is encoded as ordinary bytes and only ``add_eos``
    produces ``eos_id``. (A plain ``tokenizers.Tokenizer.from_file`` on the saved file
    does match them, so only text containing such literals encodes differently.)
    If an external tokenizer has no distinct bos/eos/pad token, one is added as a new
    special token at the end of its vocabulary. ``unk_id`` is None when none exists.

    Trained (byte-level, unnormalised) tokenizers round-trip any Unicode text exactly;
    external ones round-trip only as well as their normalizer allows.
    """

    kind = "tokenizers"

    def __init__(self, tok: tokenizers.Tokenizer, roles: dict[str, str] | None = None) -> None:
        self._tok = tok
        tok.encode_special_tokens = True
        roles = roles or {}
        used: set[int] = set()
        self._role_tokens: dict[str, str | None] = {}
        for role in _ROLES:
            names = [roles[role]] if role in roles else []
            names += _CANDIDATES[role]
            token = next((n for n in names if self._free_id(n, used) is not None), None)
            if token is None and role != "unk":
                token = self._add_special(role)
            self._role_tokens[role] = token
            if token is not None:
                used.add(tok.token_to_id(token))
        self.eos_id = tok.token_to_id(self._role_tokens["eos"])
        self.bos_id = tok.token_to_id(self._role_tokens["bos"])
        self.pad_id = tok.token_to_id(self._role_tokens["pad"])
        unk = self._role_tokens["unk"]
        self.unk_id = None if unk is None else tok.token_to_id(unk)
        # Added tokens may leave gaps, so size by the largest id rather than a count.
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self._check_special_ids()
        self._cuts: tuple | None = None  # (cut rule or None, added tokens), found out on first use

    def _free_id(self, token: str, used: set[int]) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None or i in used else i

    def _add_special(self, role: str) -> str:
        name = TRAIN_SPECIALS[role]
        if self._tok.token_to_id(name) is not None:  # taken by another role
            name = f"<|psann_{role}|>"
        self._tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)])
        return name

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int | None = None) -> "HFTokenizer":
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer; "
                f"use at least {MIN_VOCAB_SIZE}, or the 'char' tokenizer"
            )
        stream = nonempty_texts(texts, cls.kind)  # DataError now if there is no text
        tok = tokenizers.Tokenizer(models.BPE(unk_token=TRAIN_SPECIALS["unk"]))
        # No normalizer and no prefix space: bytes map 1:1, so decoding is exact.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,  # an upper bound: merging stops when pairs run out
            min_frequency=2,  # a pair seen once is noise, not a useful merge
            special_tokens=[TRAIN_SPECIALS[r] for r in ("pad", "bos", "eos", "unk")],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(stream, trainer=trainer)
        return cls(tok, dict(TRAIN_SPECIALS))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Load an external ``tokenizer.json``; roles come from the files beside it."""
        path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a generic Exception
            raise DataError(f"'{path}' is not a Hugging Face tokenizer.json file: {exc}") from exc
        return cls(tok, _read_role_map(path.parent))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def special_tokens(self) -> dict[int, str]:
        return {
            i: self._tok.id_to_token(i)
            for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id)
            if i is not None
        }

    def _encode_text(self, text: str) -> list[int]:
        # add_special_tokens=False: an external post-processor must not add BOS/EOS.
        return self._tok.encode(text, add_special_tokens=False).ids

    def _stream_info(self) -> tuple:
        """CUT_BETWEEN_PRETOKENS is exact for byte-level BPE with the GPT-2 regex and no normalizer
        (what `train` makes): pre-tokens never cross such a place. Other pipelines (normalizers,
        Metaspace, prefix spaces) see the whole text."""
        if self._cuts is None:
            spec = json.loads(self._tok.to_str())
            pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
            exact = (spec.get("normalizer") is None and model.get("type") == "BPE" and not model.get("dropout")
                     and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                     and not pre.get("add_prefix_space"))
            added = [t["content"] for t in spec.get("added_tokens") or []]
            self._cuts = (CUT_BETWEEN_PRETOKENS if exact else None, added)
        return self._cuts

    def _stream_cuts(self):
        return self._stream_info()[0]

    def _unsplittable(self) -> list[str]:
        return self._stream_info()[1]  # added tokens are matched in the text before pre-tokenisation

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise DataError("encode_batch() expects a sequence of str")
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self._tok.save(str(directory / MODEL_FILE))
        role_map = {f"{r}_token": t for r, t in self._role_tokens.items() if t is not None}
        text = json.dumps(role_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (directory / SPECIAL_MAP_FILE).write_text(text, encoding="utf-8")
        return {"model_file": MODEL_FILE, "special_tokens": role_map}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        directory = Path(directory)
        meta = read_meta(directory, expected_kind=cls.kind)
        path = require_file(directory, str(meta.get("model_file", MODEL_FILE)))
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"'{path}' is corrupt: {exc}") from exc
        saved = meta.get("special_tokens") or {}
        roles = {k[: -len("_token")]: v for k, v in saved.items() if isinstance(v, str)}
        return check_against_meta(cls(tok, roles), meta, directory)  # type: ignore[return-value]


def hub_file(repo: str, filename: str, *, tokenizer: bool = True) -> Path:
    """`filename` of the Hugging Face repo `repo`, through the local HF cache (huggingface_hub: with
    HF_HUB_OFFLINE=1, or when the hub is out of reach, the cached copy is used). For a tokenizer,
    a special_tokens_map.json beside it in the repo is fetched too, for the tokenizer's roles."""
    try:
        from huggingface_hub import hf_hub_download  # lazy: the hf extra
    except ImportError:
        raise DataError(f"reading {filename} of {repo} needs huggingface_hub: pip install 'psann-lm[hf]'.") from None
    try:
        path = Path(hf_hub_download(repo, filename))
    except Exception as exc:  # network, missing repo or file, an empty cache offline: its message says which
        raise DataError(f"cannot get {filename} of {repo} from the Hugging Face hub or its local cache "
                        f"({type(exc).__name__}: {exc}). Offline, the file must be in the cache (HF_HUB_CACHE); "
                        "or pass a local file instead.") from None
    if tokenizer:
        try:
            hf_hub_download(repo, posixpath.join(posixpath.dirname(filename), SPECIAL_MAP_FILE))
        except Exception:  # many repos have none: the roles then come from tokenizer.json itself
            pass
    return path
