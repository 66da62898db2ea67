"""`psannlm serve --ckpt DIR`: the OpenAI-compatible API and the chat page on 127.0.0.1:8000."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) and a "
                       "web chat page over a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. runs/NAME/checkpoints/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PSANN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API routes (default: $PSANN_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients ask for (default: the checkpoint's run name)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get HTTP 429")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def model_name_of(ckpt: str) -> str:
    path = Path(ckpt).resolve()
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def run(args) -> int:
    if args.slots < 1 or args.max_queue < 0 or not 0 <= args.port < 65536:
        raise ConfigError("--slots must be >= 1, --max-queue >= 0 and --port in 0..65535.")
    try:
        import uvicorn  # lazy: the serve extra
    except ImportError:
        raise ConfigError("psannlm serve needs the 'serve' extra: pip install 'psann-lm[serve]'") from None
    from .. import psannLM  # lazy: torch, after the options are checked
    from .app import create_app  # lazy: the serve extra (fastapi)

    lm = psannLM.load(args.ckpt, device=args.device)
    app = create_app(lm, model_name=args.model_name or model_name_of(args.ckpt), api_key=args.api_key,
                     slots=args.slots, max_queue=args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
