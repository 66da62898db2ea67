"""`psannlm data build | info | verify`: text sources -> filtered token shards, what a build holds,
and whether its shards are intact."""

from __future__ import annotations

import argparse
import json
import time

from .build import BuildConfig, build_dataset
from .filters import FilterConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build token shards from text (filters, dedup, decontamination); inspect a build")
    dsub = p.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser("build", help="tokenise text sources into .bin shards + index.json")
    b.add_argument("--input", nargs="*", default=[], help="files or globs: text, .jsonl, .parquet, optionally .gz/.zst")
    b.add_argument("--manifest", "--data-manifest", action="append", default=[],
                   help="a file listing input paths, one per line (repeatable)")
    b.add_argument("--tokenizer", required=True, help="a saved tokenizer directory")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--separator", default=None,
                   help="document separator in text files: eot (<|endoftext|>), blank, line, none, or a literal string "
                        "(default: none, one document per file)")
    b.add_argument("--text-key", default="text", help="field holding the text in .jsonl / .parquet")
    b.add_argument("--hf-dataset", help="a Hugging Face dataset (hub name or local directory), streamed")
    b.add_argument("--hf-split", default="train")
    b.add_argument("--hf-config", default=None, help="dataset configuration name")
    b.add_argument("--hf-text-key", default="text")
    b.add_argument("--val-fraction", type=float, default=0.005, help="documents held out for validation")
    b.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    b.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard")
    b.add_argument("--workers", type=int, default=1, help="tokenising processes")
    b.add_argument("--npy", action="store_true", help="also write each shard as .npy")
    b.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted build in --out")
    add_filter_args(b.add_argument_group("filters (each optional; removals are counted in index.json)"))

    i = dsub.add_parser("info", help="print a build's index.json summary")
    i.add_argument("path", help="a built dataset directory")
    v = dsub.add_parser("verify", help="hash and scan every shard now (loading checks each on first read)")
    v.add_argument("path", help="a built dataset directory")


def _info(path: str) -> int:
    from .shards import read_index  # lazy: shards import torch, and the psannlm parser imports this module

    index = read_index(path)
    summary = {k: v for k, v in index.items() if k != "shards"}
    summary["shards"] = {split: len(v) for split, v in index["shards"].items()}
    print(json.dumps(summary, indent=2))
    return 0


def _verify(path: str) -> int:
    from .shards import ShardedTokens  # lazy: as in _info

    start, report = time.perf_counter(), {"path": path}
    for split in ("train", "val"):
        data = ShardedTokens(path, split)
        data.verify_all()
        report[split] = {"shards": len(data.shards), "tokens": data.n_tokens}
    report["ok"], report["seconds"] = True, round(time.perf_counter() - start, 2)
    print(json.dumps(report, indent=2))
    return 0


def add_filter_args(f) -> None:
    """The filter flags of `psannlm data build` (also on `psannlm train --data-manifest`)."""
    f.add_argument("--min-chars", type=int, default=0)
    f.add_argument("--max-chars", type=int, default=None)
    f.add_argument("--ascii-only", action="store_true")
    f.add_argument("--english", action="store_true", help="keep English only (fastText lid, offline)")
    f.add_argument("--english-threshold", type=float, default=0.5)
    f.add_argument("--exact-dedup", action="store_true", help="drop repeats of normalised text")
    f.add_argument("--near-dedup", action="store_true", help="drop near-duplicates (MinHash LSH)")
    f.add_argument("--near-dedup-threshold", type=float, default=0.8, help="estimated Jaccard similarity")
    f.add_argument("--decontaminate", nargs="+", default=[], help="eval files (.jsonl or text) to remove overlap with")
    f.add_argument("--ngram", type=int, default=13, help="decontamination n-gram length in words")


def filters_from_args(args) -> FilterConfig:
    return FilterConfig(min_chars=args.min_chars, max_chars=args.max_chars, ascii_only=args.ascii_only,
                        english=args.english, english_threshold=args.english_threshold,
                        decontaminate=args.decontaminate, ngram=args.ngram, exact_dedup=args.exact_dedup,
                        near_dedup=args.near_dedup, near_dedup_threshold=args.near_dedup_threshold)


def run(args) -> int:
    if args.data_command == "info":
        return _info(args.path)
    if args.data_command == "verify":
        return _verify(args.path)
    filters = filters_from_args(args)
    cfg = BuildConfig(inputs=args.input, manifests=args.manifest, tokenizer=args.tokenizer, out=args.out,
                      separator=args.separator, text_key=args.text_key, hf_dataset=args.hf_dataset,
                      hf_split=args.hf_split, hf_config=args.hf_config, hf_text_key=args.hf_text_key,
                      val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                      workers=args.workers, npy=args.npy, overwrite=args.overwrite, filters=filters)
    index = build_dataset(cfg)
    print(json.dumps({"out": args.out, "tokens": index["tokens"], "documents": index["documents"],
                      "removed": index["removed"]}, indent=2))
    return 0
