"""`psannlm demo` / `make demo`: the whole pipeline on a corpus the project generates itself.

Story corpus (deterministic) -> BPE tokenizer -> small Transformer trained for ~3 minutes on two
CPU cores -> validation loss and samples. Every setting is an ordinary config key, so
`psannlm demo --train.max_steps=20` makes a quick smoke run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

from .api import psannLM, psannLMDataPrep
from .config import RunConfig, apply_override, dump_config
from .data.demo_corpus import DEMO_CORPUS_VERSION, demo_config_values, generate_conversations, write_demo_corpus
from .files import write_atomic
from .infer.chat import ChatSession

DEMO_PROMPTS = ("Once upon a time", "One day, a little", "The dog")


CHAT_REQUESTS = ("Tell me a story about Lily, a little girl.", "Now one about a young fox called Pip, please.")


def chat_demo(lm, run_dir: Path, steps: int, progress: bool = True, seed: int = 0) -> dict:
    """Fine-tune the demo model on generated story requests (loss on the assistant turns only),
    then hold a two-turn conversation with it."""
    path = run_dir / "data" / "demo_chat.jsonl"
    write_atomic(path, "".join(json.dumps(c) + "\n" for c in generate_conversations(4000, seed)))
    dp = psannLMDataPrep.from_sft([path], tokenizer_model_path=str(run_dir / "checkpoints" / "final" / "tokenizer"),
                                  max_length=lm.model_config.max_seq_len, val_split=0.02, seed=seed)
    lm.fit(dp, max_steps=steps, batch_tokens=4096, lr=1e-3, warmup_steps=10, eval_interval_steps=steps,
           eval_batches=20, log_interval_steps=25, checkpoint_dir=str(run_dir / "chat"), progress=progress)
    print("\n=== chat (after fine-tuning on story requests) ===")
    session = ChatSession(lm, temperature=0.7, top_p=0.95, max_new_tokens=lm.model_config.max_seq_len // 2, seed=seed)
    for request in CHAT_REQUESTS:
        print(f"\nuser> {request}\nassistant> {session.send(request)}")
    return {"chat_val_loss": lm.last_run.get("val_loss"), "chat_checkpoint": lm.last_run["final_checkpoint"]}


def run_demo(out: str | None = None, corpus_bytes: int = 3_000_000, overrides: list[str] = (),
             print_config: bool = False, chat_steps: int = 0) -> int:
    run_dir = Path(out) if out else Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    corpus_path = run_dir / "data" / "demo_corpus.txt"
    values = demo_config_values(str(corpus_path), str(run_dir))
    for override in overrides:
        apply_override(values, override)
    config = RunConfig.from_dict(values)
    if print_config:
        print(dump_config(config), end="")
        return 0
    started = time.perf_counter()
    info = write_demo_corpus(corpus_path, target_bytes=corpus_bytes, seed=0)
    print(f"demo: wrote {info['stories']:,} generated stories ({info['bytes'] / 1e6:.1f} MB) to {corpus_path}",
          file=sys.stderr)
    dp = psannLMDataPrep.from_config(config.data)
    lm = psannLM(**config.model.to_dict())
    lm.generate_config = config.generate
    lm.fit(dp, **config.train.to_dict())
    summary = dict(lm.last_run)
    uniform = math.log(dp.vocab_size)
    print("\n=== samples ===")
    for prompt, text in zip(DEMO_PROMPTS, lm.generate_batch(list(DEMO_PROMPTS))):
        print(f"\n> {prompt}{text}")
    print("\n=== result ===")
    if "val_loss" in summary:
        print(f"validation loss {summary['val_loss']:.3f} nats/token (perplexity {summary['val_ppl']:.1f}); "
              f"a uniform guess over {dp.vocab_size} tokens scores {uniform:.3f} (perplexity {dp.vocab_size}).")
    if chat_steps:
        summary.update(chat_demo(lm, run_dir, chat_steps, progress=config.train.progress))
    summary.update({"demo_corpus_version": DEMO_CORPUS_VERSION, "corpus_bytes": info["bytes"],
                    "parameters": lm.num_parameters(), "total_s": round(time.perf_counter() - started, 1)})
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"run directory: {run_dir} (checkpoints/, metrics.jsonl, metrics.csv, loss_curve.png, demo_summary.json)")
    print(f"try: psannlm generate --ckpt {summary['final_checkpoint']} --prompt 'Once upon a time'")
    if chat_steps:
        print(f"     psannlm chat --ckpt {summary['chat_checkpoint']}")
    return 0
