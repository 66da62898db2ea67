"""`psannlm tokenizer train | encode | stats`: the from-scratch BPE from the command line.

The command takes no config file; --print-config prints its resolved options as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.text import read_text_file
from ..data.tokens import token_array_tokenizer, token_dtype
from ..errors import DataError, at_least
from ..files import CountingDecoder
from . import load_tokenizer
from .bpe import BPETokenizer
from .bpe_train import GPT2_PATTERN, GPT4_PATTERN, train_bpe
from .chat import CHAT_TOKENS

log = logging.getLogger("psann.lm")

READ_CHARS = 1 << 20  # characters handed to encode_iterable at a time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE, encode a corpus to .npy, report bytes/token")
    # metavar: a missing sub-command is reported as {train,encode,stats}, not as the dest name
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train,encode,stats}")

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="text files (UTF-8; bad bytes are replaced and counted)")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="total ids, special tokens included: specials (with the chat tokens and BOS/PAD) + 256 "
                        "bytes + merges; a corpus too small for that many merges gives fewer, with a message")
    t.add_argument("--special-token", action="append", default=None,
                   help="special token (repeatable; default <|endoftext|>)")
    t.add_argument("--no-chat-tokens", dest="chat_tokens", action="store_false",
                   help="do not reserve the chat role tokens <|system|> <|user|> <|assistant|> <|end|>")
    t.add_argument("--pattern", choices=("gpt2", "gpt4"), default="gpt2", help="pre-tokenisation regex")
    t.add_argument("--num-workers", type=at_least(1), default=None, help="pre-tokenisation processes (default: all cores)")
    t.add_argument("--out", required=True, help="directory for vocab.json, merges.txt, tokenizer.json, ...")

    e = tsub.add_parser("encode", help="encode a text file to a .npy of token ids (uint16 when the vocab fits); "
                        "the tokenizer is saved beside it (X.tokenizer/ for X.npy), for training on the array")
    _tokenizer_args(e)
    e.add_argument("--input", required=True)
    e.add_argument("--out", "--output", dest="out", required=True, help="output .npy path")

    s = tsub.add_parser("stats", help="bytes/token and encoding throughput on sampled documents (of one corpus, "
                        "or two with --owt-*)")
    _tokenizer_args(s)
    s.add_argument("--input", required=True)
    s.add_argument("--docs", "--n", dest="docs", type=at_least(1), default=10, help="documents to sample")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--separator", default="<|endoftext|>",
                   help="document separator (falls back to blank lines when absent)")
    s.add_argument("--owt-text", help="a second corpus (OpenWebText in the CS336 layout) measured the same way")
    s.add_argument("--owt-vocab", help="vocab.json of the second corpus's tokenizer")
    s.add_argument("--owt-merges", help="merges.txt of the second corpus's tokenizer")


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="a saved tokenizer directory (or give --vocab and --merges)")
    p.add_argument("--vocab", help="a GPT-2-style vocab.json (with --merges; no tokenizer directory needed)")
    p.add_argument("--merges", help="the merges.txt that goes with --vocab")


def load_named_tokenizer(tokenizer: str | None, vocab: str | None, merges: str | None,
                         flags: str = "--tokenizer, or --vocab and --merges"):
    """A saved tokenizer directory, or a GPT-2 vocab.json + merges.txt pair: exactly one of the two
    forms, else an error naming `flags`."""
    if tokenizer and not (vocab or merges):
        return load_tokenizer(tokenizer)
    if vocab and merges and not tokenizer:
        return BPETokenizer.from_files(vocab, merges)
    raise DataError(f"name the tokenizer: {flags} (one of the two forms).")


def run(args) -> int:
    if args.print_config:
        options = {k: v for k, v in vars(args).items() if k != "print_config"}
        if args.tokenizer_command == "train":
            options["special_tokens"] = special_tokens(args)  # every one, as counted in --vocab-size
        print(json.dumps(options, indent=2))
        return 0
    return {"train": _train, "encode": _encode, "stats": _stats}[args.tokenizer_command](args)


def special_tokens(args) -> list[str]:
    """The special tokens the trained vocabulary holds: those asked for, the chat role tokens, and the
    BOS/EOS/PAD tokens BPETokenizer adds for roles none of them fills. Training with all of them is
    what makes --vocab-size the exact total."""
    asked = list(dict.fromkeys((args.special_token or ["<|endoftext|>"]) + list(CHAT_TOKENS if args.chat_tokens else ())))
    probe = BPETokenizer({i: bytes([i]) for i in range(256)}, [], asked)
    return sorted(probe.special_token_ids, key=probe.special_token_ids.get)


def _train(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"--out {args.out} is a file; give a directory for the tokenizer files.")
    specials = special_tokens(args)
    pattern = GPT4_PATTERN if args.pattern == "gpt4" else GPT2_PATTERN
    start = time.perf_counter()
    vocab, merges = train_bpe(args.input, args.vocab_size, specials, pattern=pattern, num_workers=args.num_workers,
                              size_key="--vocab-size")
    seconds = time.perf_counter() - start
    tok = BPETokenizer(vocab, merges, specials, pattern)
    tok.save(args.out)
    tok.to_hf(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "merges": len(merges),
                      "special_tokens": specials, "train_s": round(seconds, 2)}, indent=2))
    return 0


def _check_input(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"--input {path} not found (or not a file); give a text file.")


def _read_chunks(path: Path, bar: tqdm):
    """The file's text in chunks; invalid UTF-8 is replaced and counted in one warning, as in training."""
    decoder = CountingDecoder()
    with open(path, encoding="utf-8", errors=decoder.errors) as fh:
        while True:
            text = fh.read(READ_CHARS)
            if not text:
                break
            bar.update(len(text.encode("utf-8")))
            yield text
    if decoder.bad:
        log.warning("%s: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD.", path, decoder.bad)


def _encode(args) -> int:
    tok = load_named_tokenizer(args.tokenizer, args.vocab, args.merges)
    path, out = Path(args.input), Path(args.out)
    _check_input(path)
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give the path of the .npy file to write.")
    dtype = token_dtype(tok.vocab_size)
    raw = out.with_name(out.name + ".ids.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="encode")
    start, count = time.perf_counter(), 0
    with open(raw, "wb") as sink:
        if hasattr(tok, "encode_iterable"):  # streaming, exactly equal to encoding the whole text
            buffer: list[int] = []
            for token in tok.encode_iterable(_read_chunks(path, bar)):
                buffer.append(token)
                if len(buffer) >= 1 << 20:
                    sink.write(np.asarray(buffer, dtype=dtype).tobytes())
                    count += len(buffer)
                    buffer.clear()
            sink.write(np.asarray(buffer, dtype=dtype).tobytes())
            count += len(buffer)
        else:
            ids = tok.encode("".join(_read_chunks(path, bar)))
            sink.write(np.asarray(ids, dtype=dtype).tobytes())
            count = len(ids)
    bar.close()
    if out.suffix != ".npy":  # a raw memmap (.dat, .bin): the ids as written
        os.replace(raw, out)
    else:
        _to_npy(raw, out, dtype, count)
    tok.save(token_array_tokenizer(out))  # `--train_data X.npy` (data.train_token_files) finds it there
    seconds = time.perf_counter() - start
    print(json.dumps({"out": str(out), "tokenizer": str(token_array_tokenizer(out)), "tokens": count, "dtype": dtype.name,
                      "bytes_per_token": round(path.stat().st_size / max(1, count), 3),
                      "mb_per_s": round(path.stat().st_size / 1e6 / seconds, 2)}, indent=2))
    return 0


def _to_npy(raw: Path, out: Path, dtype: np.dtype, count: int) -> None:
    tmp_npy = out.with_name(out.name + ".tmp.npy")
    ids = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(count,))
    ids[:] = np.fromfile(raw, dtype=dtype)
    ids.flush()
    del ids
    os.replace(tmp_npy, out)
    raw.unlink()


def _stats(args) -> int:
    corpora = [(args.input, load_named_tokenizer(args.tokenizer, args.vocab, args.merges))]
    if args.owt_text or args.owt_vocab or args.owt_merges:
        if not (args.owt_text and args.owt_vocab and args.owt_merges):
            raise DataError("the second corpus needs all three of --owt-text, --owt-vocab and --owt-merges.")
        corpora.append((args.owt_text, load_named_tokenizer(None, args.owt_vocab, args.owt_merges, "--owt-vocab and --owt-merges")))
    results = [_bytes_per_token(Path(path), tok, args) for path, tok in corpora]
    print(json.dumps(results[0] if len(results) == 1 else {"corpora": results}, indent=2))
    print("; ".join(f"{Path(r['input']).name} ({r['vocab_size']:,} ids): {r['bytes_per_token']:.3f} bytes/token"
                    for r in results) + f" ({args.docs} sampled docs, seed {args.seed})", file=sys.stderr)
    return 0


def _bytes_per_token(path: Path, tok, args) -> dict:
    _check_input(path)
    text = read_text_file(path)
    docs = [d for d in (text.split(args.separator) if args.separator in text else text.split("\n\n")) if d.strip()]
    if not docs:
        raise DataError(f"--input {path} has no text to measure (the file is empty or only whitespace).")
    sample = random.Random(args.seed).sample(docs, min(args.docs, len(docs)))
    start = time.perf_counter()
    n_tokens = sum(len(tok.encode(d)) for d in sample)
    seconds = time.perf_counter() - start
    n_bytes = sum(len(d.encode("utf-8")) for d in sample)
    return {"input": str(path), "vocab_size": tok.vocab_size, "docs": len(sample), "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(1, n_tokens), 3), "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 2)}
