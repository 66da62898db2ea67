"""Is our Transformer training step at least as fast as transformers.LlamaForCausalLM with the same dimensions?

Both models are built in this process with identical weights (psann.lm.models.hf_interop.to_hf_llama),
both in train mode, fp32 on CPU. One step = forward, mean cross-entropy over all tokens (computed the
same way for both, outside the model), backward, AdamW step. Rounds alternate which model goes first;
warmup steps are excluded. Prints one JSON object.

    python benchmarks/train_throughput.py                 # ~10.7M params, batch 8 x 256 tokens
    python benchmarks/train_throughput.py --preset tiny   # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from _common import apply_preset, cpu_name, preset_parser, to_json

PRESETS = {
    "default": dict(d_model=288, n_layers=6, n_heads=6, n_kv_heads=None, vocab=8192, seq=256, batch=8,
                    rounds=20, steps=1, warmup=2),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, seq=64, batch=4,
                 rounds=5, steps=5, warmup=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = preset_parser(__doc__.split("\n")[0], PRESETS)
    args = apply_preset(p.parse_args(argv), PRESETS)
    return args


def train_step(model, optimizer, inputs, targets, forward) -> float:
    logits = forward(model, inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def forward_ours(model, inputs):
    return model(inputs)


def forward_hf(model, inputs):
    # use_cache=False: no KV cache is built while training (what HF training code does).
    return model(input_ids=inputs, use_cache=False).logits


def run_steps(model, optimizer, batches, forward, n: int, start: int) -> tuple[float, list[float]]:
    losses = []
    t0 = time.perf_counter()
    for i in range(n):
        inputs, targets = batches[(start + i) % len(batches)]
        losses.append(train_step(model, optimizer, inputs, targets, forward))
    return time.perf_counter() - t0, losses


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    import transformers

    from psann.lm.config import ModelConfig
    from psann.lm.models import build_model, count_parameters
    from psann.lm.models.hf_interop import to_hf_llama

    torch.manual_seed(args.seed)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab, max_seq_len=args.seq, tie_embeddings=args.tied, dropout=0.0)
    ours = build_model(cfg).train()
    hf = to_hf_llama(ours, attn_implementation="sdpa").train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))

    # Same starting weights -> the first loss must agree (a check that the comparison is fair).
    with torch.no_grad():
        first_ours = float(F.cross_entropy(ours(batches[0][0]).flatten(0, 1), batches[0][1].flatten()))
        first_hf = float(F.cross_entropy(forward_hf(hf, batches[0][0]).flatten(0, 1), batches[0][1].flatten()))

    models = {
        "ours": (ours, torch.optim.AdamW(ours.parameters(), lr=3e-4, weight_decay=0.1), forward_ours),
        "hf": (hf, torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.1), forward_hf),
    }
    for model, opt, fwd in models.values():
        run_steps(model, opt, batches, fwd, args.warmup, 0)

    tokens_per_round = args.batch * args.seq * args.steps
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    order_log = []
    for r in range(args.rounds):
        order = ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]
        order_log.append(order[0])
        for name in order:
            model, opt, fwd = models[name]
            elapsed, _ = run_steps(model, opt, batches, fwd, args.steps, args.warmup + r * args.steps)
            rates[name].append(tokens_per_round / elapsed)

    ours_tok_s, hf_tok_s = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    result = {
        "question": "Is our Transformer training step at least as fast as transformers.LlamaForCausalLM with the "
                    "same dimensions? (CPU fp32, forward+backward+AdamW, tokens/s, median of alternating rounds)",
        "preset": args.preset,
        "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                   "d_mlp": cfg.mlp_hidden, "vocab_size": cfg.vocab_size, "seq_len": args.seq, "batch": args.batch,
                   "tied_embeddings": cfg.tie_embeddings, "dtype": "float32", "device": "cpu"},
        "params": count_parameters(ours),
        "params_hf": sum(p.numel() for p in hf.parameters()),
        "hf_attn_implementation": hf.config._attn_implementation,
        "hf_use_cache": False,
        "loss": "mean cross-entropy over all batch*seq tokens, F.cross_entropy outside both models",
        "optimizer": "torch.optim.AdamW(lr=3e-4, weight_decay=0.1), default (foreach) implementation, both models",
        "first_loss": {"ours": first_ours, "hf": first_hf},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps": args.warmup,
        "tokens_per_step": args.batch * args.seq,
        "ours_tok_s": round(ours_tok_s, 1),
        "hf_tok_s": round(hf_tok_s, 1),
        "ratio": round(ours_tok_s / hf_tok_s, 4),
        "ratio_median_of_rounds": round(statistics.median(a / b for a, b in zip(rates["ours"], rates["hf"])), 4),
        "per_round": {"ours_tok_s": [round(x, 1) for x in rates["ours"]],
                      "hf_tok_s": [round(x, 1) for x in rates["hf"]],
                      "ratio": [round(a / b, 4) for a, b in zip(rates["ours"], rates["hf"])],
                      "first": order_log},
    }
    print(to_json(result))


if __name__ == "__main__":
    main()
