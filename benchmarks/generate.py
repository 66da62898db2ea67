"""How fast is our KV-cache generation vs HF generate() on the same weights, and vs our own no-cache recompute?

Greedy decoding (temperature 0), batch 1, a 16-token prompt, exactly 256 new tokens on every side
(no EOS: HF gets eos_token_id=None and min_new_tokens=max_new_tokens). The HF model is built from
ours with psann.lm.models.hf_interop.to_hf_llama (identical weights, sdpa attention, its default
DynamicCache). Rounds alternate the order of the three contenders; medians are reported.
Tokens/s counts new tokens only and includes the prompt prefill. Prints one JSON object.

    python benchmarks/generate.py                 # ~10.7M params, context 512
    python benchmarks/generate.py --preset tiny   # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from _common import apply_preset, cpu_name, preset_parser, to_json

PRESETS = {
    "default": dict(d_model=288, n_layers=6, n_heads=6, n_kv_heads=None, vocab=8192, context=512,
                    prompt=16, new=256, rounds=7, warmup=1),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, context=320,
                 prompt=16, new=256, rounds=3, warmup=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = preset_parser(__doc__.split("\n")[0], PRESETS)
    args = apply_preset(p.parse_args(argv), PRESETS)
    if args.context < args.prompt + args.new:
        p.error(f"--context ({args.context}) must hold prompt + new tokens ({args.prompt + args.new}) "
                "so that no side slides its window")
    return args


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    import transformers

    from psann.lm.config import GenerateConfig, ModelConfig
    from psann.lm.objectives.causal import generate_tokens
    from psann.lm.models import build_model, count_parameters
    from psann.lm.models.hf_interop import to_hf_llama

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab, max_seq_len=args.context, tie_embeddings=args.tied, dropout=0.0)
    ours = build_model(cfg).eval()
    hf = to_hf_llama(ours, attn_implementation="sdpa").eval()
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    gen_cfg = GenerateConfig(max_new_tokens=args.new, temperature=0.0)

    def run_ours(use_cache: bool) -> list[int]:
        return generate_tokens(ours, [prompt], gen_cfg, eos_id=None, pad_id=0, max_seq_len=args.context,
                               use_cache=use_cache)[0]

    def run_hf() -> list[int]:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new,
                          min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    contenders = {"ours_cache": lambda: run_ours(True), "hf": run_hf, "ours_nocache": lambda: run_ours(False)}
    tokens: dict[str, list[int]] = {}
    for name, fn in contenders.items():
        for _ in range(args.warmup):
            tokens[name] = fn()
    for name, toks in tokens.items():
        if len(toks) != args.new:
            raise RuntimeError(f"{name} generated {len(toks)} tokens, expected {args.new}")

    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    orders = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        orders.append(order)
        for name in order:
            t0 = time.perf_counter()
            toks = contenders[name]()
            elapsed = time.perf_counter() - t0
            rates[name].append(len(toks) / elapsed)

    med = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "question": "How fast is our KV-cache generation vs HF generate() on the same weights, and vs our own "
                    "no-cache recompute? (greedy, batch 1, CPU fp32, new tokens/s incl. prefill, medians)",
        "preset": args.preset,
        "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                   "d_mlp": cfg.mlp_hidden, "vocab_size": cfg.vocab_size, "context": cfg.max_seq_len,
                   "tied_embeddings": cfg.tie_embeddings, "dtype": "float32", "device": "cpu"},
        "params": count_parameters(ours),
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "batch": 1,
        "hf_attn_implementation": hf.config._attn_implementation,
        "hf_generate": "generate(do_sample=False, max_new_tokens=min_new_tokens=new, eos_token_id=None), DynamicCache",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rounds": args.rounds,
        "ours_cache_tok_s": round(med["ours_cache"], 1),
        "hf_tok_s": round(med["hf"], 1),
        "ours_nocache_tok_s": round(med["ours_nocache"], 1),
        "ratio_vs_hf": round(med["ours_cache"] / med["hf"], 4),
        "speedup_vs_nocache": round(med["ours_cache"] / med["ours_nocache"], 3),
        "ratio_vs_hf_median_of_rounds": round(statistics.median(a / b for a, b in zip(rates["ours_cache"], rates["hf"])), 4),
        "speedup_vs_nocache_median_of_rounds": round(
            statistics.median(a / b for a, b in zip(rates["ours_cache"], rates["ours_nocache"])), 3),
        "greedy_tokens_agree_with_hf": leading_agreement(tokens["ours_cache"], tokens["hf"]),
        "greedy_tokens_agree_cache_vs_nocache": leading_agreement(tokens["ours_cache"], tokens["ours_nocache"]),
        "per_round": {name: [round(x, 1) for x in v] for name, v in rates.items()} | {"order": orders},
    }
    print(to_json(result))


if __name__ == "__main__":
    main()
