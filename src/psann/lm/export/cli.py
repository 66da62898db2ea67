"""`psannlm export hf --ckpt DIR --out HF_DIR` and `psannlm import hf HF_DIR --out DIR`.

The transformer family is HF Llama (the same network; models/hf_interop.py moves the weights);
the other families have no transformers equivalent and are refused with the reason. Both write a
temporary directory first and rename it into place, so a failed run leaves nothing half-written
and an existing output is replaced only by a complete one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..files import temp_name

NO_LLAMA = {
    "respsann": "its MLPs are sine networks, which Llama's SwiGLU cannot hold",
    "waveresnet": "its blocks mix along time with wave convolutions",
    "byte": "it reads raw bytes, which no transformers tokenizer class gives",
    "hnet": "it chunks bytes dynamically between stages",
    "hgrn_bit": "its blocks are recurrences with ternary weights",
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another format (hf: Hugging Face transformers)")
    formats = p.add_subparsers(dest="export_format", required=True)
    hf = formats.add_parser("hf", help="a directory AutoModelForCausalLM, AutoTokenizer and pipeline() load")
    hf.add_argument("--ckpt", required=True, help="checkpoint directory (transformer family)")
    hf.add_argument("--out", required=True, help="output directory (replaced only once complete)")
    p = sub.add_parser("import", help="read a checkpoint from another format (hf: a Hugging Face Llama directory)")
    formats = p.add_subparsers(dest="import_format", required=True)
    hf = formats.add_parser("hf", help="a Llama directory with a tokenizer.json -> a psann checkpoint")
    hf.add_argument("path", help="the Hugging Face model directory (config.json, weights, tokenizer.json)")
    hf.add_argument("--out", required=True, help="the psann checkpoint directory to write")


def _published(out: str, write) -> Path:
    """`write(tmp)` fills a temporary sibling of `out`, which then replaces `out` as a checkpoint
    save does (the old one aside, the new one in, then durable)."""
    from ..train.checkpoint import publish  # lazy: torch, only when a conversion runs

    out_path = Path(out).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out_path)
    try:
        write(tmp)
        publish(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def run_export(args) -> int:
    from ..train.checkpoint import load_checkpoint, read_checkpoint_config  # lazy: torch

    config = read_checkpoint_config(args.ckpt)
    base = config.model.base
    if base != "transformer":
        raise ConfigError(f"psannlm export hf converts the transformer family to HF Llama; {args.ckpt} is a {base} "
                          f"model and {NO_LLAMA.get(base, 'it has no Llama equivalent')}.")
    if config.model.objective != "causal":
        raise ConfigError(f"{args.ckpt} is a {config.model.objective} model; HF Llama is a causal LM (its "
                          "generate() cannot run masked-diffusion sampling).")
    from ..models.hf_interop import export_hf  # lazy: transformers, the hf extra

    model, tokenizer, _ = load_checkpoint(args.ckpt)
    out = _published(args.out, lambda tmp: export_hf(model.eval(), tokenizer, tmp))
    print(json.dumps({"exported": str(out), "from": str(args.ckpt), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def run_import(args) -> int:
    from ..config import RunConfig  # lazy: with the two below, only this command needs them
    from ..models.hf_interop import import_hf  # lazy: torch and transformers, the hf extra
    from ..train.checkpoint import save_checkpoint  # lazy: torch

    model, tokenizer = import_hf(args.path)
    config = RunConfig(model=model.config)
    out = Path(args.out).expanduser()
    save_checkpoint(out, model, tokenizer, config)  # writes a temporary directory and renames it itself
    print(json.dumps({"imported": str(out), "from": str(args.path), "base": config.model.base,
                      "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size}))
    return 0
