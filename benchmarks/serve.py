"""Does psannlm serve's continuous batching pay: 8 concurrent streaming clients against 1, on the demo-sized model?

A `psannlm serve` process (its own process, as deployed) over a checkpoint of the demo's shape
(transformer, d_model 256, 4 layers, 4 heads, a 2,048-token BPE, context 128; random weights:
speed does not depend on them). Each client streams chat-free completions through the official
openai client, one after another: `--requests` each, greedy, `--max-tokens` new tokens (a
request that meets EOS sooner counts the tokens it got). Per round: 1 client, then `--clients`
clients at once. Throughput = completion tokens (the server's usage counts) / wall time; time to
first token = request start to its first streamed text. Medians over rounds; prints one JSON
object with the ratios against the single client of the same run.

    python benchmarks/serve.py                      # ~2 min on 2 cores
    python benchmarks/serve.py --rounds 1 --requests 1 --max-tokens 16   # a smoke test
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from _common import cpu_name, to_json

from psann.lm.config import ModelConfig, RunConfig
from psann.lm.data.demo_corpus import generate_stories
from psann.lm.models import build_model
from psann.lm.tokenizers import build_tokenizer
from psann.lm.train.checkpoint import save_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="requests per client per round, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    return p.parse_args(argv)


def demo_checkpoint(directory: Path, stories: list[str]) -> str:
    tok = build_tokenizer("bpe", stories, vocab_size=2048)
    config = ModelConfig(base="transformer", d_model=256, n_layers=4, n_heads=4, vocab_size=tok.vocab_size,
                         max_seq_len=128)
    torch.manual_seed(0)
    save_checkpoint(directory, build_model(config), tok, RunConfig(model=config))
    return str(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(client, prompt: str, max_tokens: int) -> tuple[int, float | None]:
    """(completion tokens, seconds to the first streamed text)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first


def load(url: str, clients: int, prompts: list[str], args) -> dict:
    """`clients` threads, each sending args.requests streaming requests in turn."""
    results: list[tuple[int, float | None]] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        for r in range(args.requests):
            out = one_request(client, prompts[(k * args.requests + r) % len(prompts)], args.max_tokens)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(n for n, _ in results)
    ttft = [t for _, t in results if t is not None]
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttft)}


def main(argv=None) -> None:
    args = parse_args(argv)
    stories = generate_stories(400, seed=1)
    prompts = [" ".join(s.split()[:8]) for s in stories[:64]]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = demo_checkpoint(Path(tmp) / "demo", stories)
        port = free_port()
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        server = subprocess.Popen([sys.executable, "-m", "psann", "serve", "--ckpt", ckpt, "--port", str(port),
                                   "--model-name", "demo", "--slots", str(args.slots), "--device", "cpu"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
                    time.sleep(0.2)
            one_request(client, prompts[0], 8)  # warm-up
            rounds = []
            for _ in range(args.rounds):
                single = load(url, 1, prompts, args)
                many = load(url, args.clients, prompts, args)
                rounds.append({"single": single, "concurrent": many})
        finally:
            server.terminate()
            server.wait(timeout=30)

    def median(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    single_tps, many_tps = median("single", "tok_per_s"), median("concurrent", "tok_per_s")
    single_ttft, many_ttft = median("single", "ttft_p50_s"), median("concurrent", "ttft_p50_s")
    print(to_json({
        "question": "psannlm serve: 8 concurrent streaming clients vs 1 (continuous batching)",
        "peer": "the same server with one client, in the same run",
        "model": "transformer d_model 256, 4 layers, 4 heads, vocab 2048, context 128 (the demo's shape)",
        "cpu": cpu_name(), "torch_threads": args.threads or torch.get_num_threads(), "slots": args.slots,
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "single": {"tok_per_s": single_tps, "ttft_p50_s": single_ttft},
        "concurrent": {"tok_per_s": many_tps, "ttft_p50_s": many_ttft},
        "throughput_ratio": many_tps / single_tps, "ttft_ratio": many_ttft / single_ttft,
        "goal": "throughput_ratio >= 3 and ttft_ratio <= 2",
        "rounds_detail": rounds,
    }))


if __name__ == "__main__":
    main()
