"""How fast is block-diffusion sampling, by steps and block length, next to autoregressive decoding?

One Transformer size for both (weights random: latency does not depend on them). The peer is the
same network as a causal model decoding the same number of tokens with its KV cache, measured in
the same run; ratios are diffusion latency / AR latency. Also: the saving from reusing logits on
steps that commit nothing (steps > tokens), against a sampler that runs the model every step.
Medians of --repeats runs. Prints one JSON object.

    python benchmarks/diffusion.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _common import cpu_name

from psann.lm.config import GenerateConfig, ModelConfig
from psann.lm.objectives.diffusion import DiffusionSampleStats, diffusion_generate
from psann.lm.objectives.causal import generate_tokens
from psann.lm.models import build_model, count_parameters


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--gen", type=int, default=64, help="tokens to generate")
    p.add_argument("--steps", default="16,32,64")
    p.add_argument("--blocks", default="8,32,64", help="block lengths")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    common = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                  max_seq_len=args.prompt + args.gen)
    mask_id = args.vocab
    diffusion = build_model(ModelConfig(**common, vocab_size=args.vocab + 1, objective="diffusion",
                                        mask_token_id=mask_id)).eval()
    causal = build_model(ModelConfig(**common, vocab_size=args.vocab)).eval()
    causal.load_state_dict({k: v[:args.vocab] if k in ("embed.weight", "lm_head.weight") else v
                            for k, v in diffusion.state_dict().items()})  # the same network, one id fewer
    grid, peers = [], {}
    for batch in map(int, args.batch.split(",")):
        prompts = torch.randint(0, args.vocab, (batch, args.prompt)).tolist()
        gen = GenerateConfig(max_new_tokens=args.gen, temperature=0.0)
        ar_s = median_time(lambda: generate_tokens(causal, prompts, gen, eos_id=None, pad_id=0,
                                                   max_seq_len=args.prompt + args.gen), args.repeats)
        peers[batch] = {"latency_s": round(ar_s, 4), "tok_per_s": round(batch * args.gen / ar_s, 1)}
        for steps in map(int, args.steps.split(",")):
            for block in map(int, args.blocks.split(",")):
                if args.gen % block or steps < args.gen // block:
                    continue
                run = lambda: diffusion_generate(diffusion, prompts, mask_id=mask_id, gen_length=args.gen,
                                                 block_length=block, steps=steps, temperature=0.0, pad_id=0)
                seconds = median_time(run, args.repeats)
                grid.append({"batch": batch, "steps": steps, "block_length": block, "latency_s": round(seconds, 4),
                             "tok_per_s": round(batch * args.gen / seconds, 1),
                             "latency_ratio_vs_ar": round(seconds / ar_s, 3)})
                print(json.dumps(grid[-1]), file=sys.stderr)
    reuse = {}
    prompts = torch.randint(0, args.vocab, (1, args.prompt)).tolist()
    for steps in (2 * args.gen, 4 * args.gen):
        timings = {}
        for reuse_logits in (True, False):
            stats = DiffusionSampleStats()

            def run():
                stats.forwards = stats.reused = stats.steps = 0
                diffusion_generate(diffusion, prompts, mask_id=mask_id, gen_length=args.gen, block_length=args.gen,
                                   steps=steps, temperature=0.0, pad_id=0, reuse_logits=reuse_logits, stats=stats)

            timings[reuse_logits] = (median_time(run, args.repeats), stats.forwards)
        reuse[steps] = {"with_reuse_s": round(timings[True][0], 4), "forwards_with_reuse": timings[True][1],
                        "without_reuse_s": round(timings[False][0], 4), "forwards_without_reuse": timings[False][1],
                        "speedup": round(timings[False][0] / timings[True][0], 2)}
    print(json.dumps({
        "question": __doc__.split("\n")[0],
        "setup": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab": args.vocab,
                  "params": count_parameters(diffusion), "prompt_tokens": args.prompt, "gen_tokens": args.gen,
                  "temperature": 0.0, "repeats": args.repeats, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "torch": torch.__version__},
        "peer_ar_kv_cache": peers,
        "grid": grid,
        "logit_reuse": reuse,
    }, indent=2))


if __name__ == "__main__":
    main()
