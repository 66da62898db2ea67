"""diffusionlm's TOML-driven benchmarks on psann-lm: `diffusionlm-bench-infer` (its
`python -m benchmarking.bench_infer_latency`) and `diffusionlm-bench-tokenizer` (its
`bench_tokenizer`). Results are JSON lines on stdout, as its console logger printed them; no
files are written.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..errors import ConfigError
from . import guarded
from .diffusionlm import INFER_LAYOUT, _check_totals_of, _parser, check_mask_id, generate_options, read_layout

BENCH_INFER_LAYOUT = {
    **INFER_LAYOUT,
    "benchmark": {"warmup": (None, 1), "repeats": (None, 5), "perplexity": (None, False),
                  "perplexity_batch_size": (None, 8), "perplexity_max_batches": (None, None),
                  "perplexity_mc_draws": (None, 16), "perplexity_seed": (None, 0)},
    "data": {"np_dat_valid_path": (None, None), "total_val_tokens": (None, None)},
}
BENCH_TOKENIZER_LAYOUT = {
    "tokenizer": {"tokenizer_dir": (None, None), "vocab_path": (None, None), "merges_path": (None, None)},
    "benchmark": {"texts": (None, None), "text_path": (None, None), "repeats": (None, 5), "warmup": (None, 1)},
}


def _emit(kind: str, **sections) -> None:
    print(json.dumps({"kind": kind, **sections}), flush=True)


def _positive(path: str, section: dict, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{path}: [benchmark].{key} must be an integer >= {minimum}, got {value!r}.")


def infer_latency_main(argv: list[str] | None = None) -> int:
    """diffusionlm-bench-infer --config bench_infer.toml: warmup then timed reverse passes (latency,
    tokens/s, steps, block length, the average share of masked positions the model read), and with
    [benchmark].perplexity and a [data] memmap, the NELBO perplexity bound over it."""
    args = _parser("diffusionlm-bench-infer", "Time diffusion sampling (and a perplexity bound)").parse_args(argv)

    def run() -> int:
        values = read_layout(args.config, BENCH_INFER_LAYOUT, only=("inference.checkpoint",))
        inf, bench, data = values["inference"], values["benchmark"], values["data"]
        _positive(args.config, bench, "repeats", "perplexity_batch_size", "perplexity_mc_draws")
        _positive(args.config, bench, "warmup", minimum=0)
        if bench["perplexity"] and not data["np_dat_valid_path"]:
            raise ConfigError(f"{args.config}: [benchmark].perplexity needs [data].np_dat_valid_path.")
        options = generate_options(inf)
        if args.print_config:
            print(json.dumps({"toml": values, "psann": {"checkpoint": inf["checkpoint"], "generate": options}}, indent=2))
            return 0
        import torch  # lazy: --print-config and bad configs need no torch

        from .. import psannLM

        lm = psannLM.load(inf["checkpoint"], device=values["model"]["device"])
        if lm.model_config.objective != "diffusion":
            raise ConfigError(f"{inf['checkpoint']} is a {lm.model_config.objective} checkpoint; this benchmark times "
                              "diffusion sampling (use psannlm bench or benchmarks/generate.py for causal models).")
        check_mask_id(args.config, inf, lm)
        settings = lm.generation_settings(**options)
        mask_id, masked = lm.model_config.mask_token_id, []

        def count_masks(module, inputs):  # what share of the canvas each reverse step still has to fill
            masked.append(float((inputs[0] == mask_id).float().mean()))

        hook = lm.model.register_forward_pre_hook(count_masks)
        latencies = []
        try:
            for i in range(bench["warmup"] + bench["repeats"]):
                masked_before = len(masked)
                start = time.perf_counter()
                lm.generate(inf["prompt"], **options)
                if i >= bench["warmup"]:
                    latencies.append((time.perf_counter() - start) * 1000)
                    _emit("bench_infer", step=len(latencies), metrics={
                        "latency_ms": round(latencies[-1], 3),
                        "tokens_per_s": settings.max_new_tokens / (latencies[-1] / 1000),
                        "forward_passes": len(masked) - masked_before})
                else:
                    del masked[masked_before:]
        finally:
            hook.remove()
        median = statistics.median(latencies)
        _emit("bench_infer_summary",
              params={"steps": settings.steps, "gen_length": settings.max_new_tokens, "block_length": settings.block_length,
                      "temperature": settings.temperature, "mask_id": mask_id, "device": values["model"]["device"],
                      "repeats": bench["repeats"], "warmup": bench["warmup"]},
              metrics={"latency_ms_median": round(median, 3), "latency_ms_min": round(min(latencies), 3),
                       "latency_ms_max": round(max(latencies), 3),
                       "tokens_per_s_median": settings.max_new_tokens / (median / 1000),
                       "avg_mask_ratio": statistics.fmean(masked) if masked else None})
        if bench["perplexity"]:
            _emit("perplexity", params={"path": data["np_dat_valid_path"], "mc_draws": bench["perplexity_mc_draws"],
                                        "max_batches": bench["perplexity_max_batches"]},
                  metrics=_perplexity(args.config, lm, values, torch.device(values["model"]["device"])))
        return 0
    return guarded(run)


def _perplexity(path: str, lm, values: dict, device) -> dict:
    """The NELBO bound on the validation memmap, in windows of the model's context."""
    from ..data.prepare import read_token_array, token_windows  # lazy: torch, only with perplexity = true
    from ..objectives import objective_for  # lazy: as above

    data, bench = values["data"], values["benchmark"]
    _check_totals_of(path, data["np_dat_valid_path"], data["total_val_tokens"], lm.tokenizer.vocab_size)
    windows = token_windows(read_token_array(data["np_dat_valid_path"], lm.tokenizer.vocab_size), lm.tokenizer,
                            lm.model_config.max_seq_len)
    objective = objective_for(lm.model_config)
    sums = objective.validation_sums(lm.model.eval(), windows, bench["perplexity_batch_size"], device,
                                     pad_id=lm.tokenizer.pad_id, max_batches=bench["perplexity_max_batches"],
                                     draws=bench["perplexity_mc_draws"], seed=bench["perplexity_seed"])
    summary = objective.summary(sums)
    return {"nelbo_per_token": summary["loss"], "perplexity_bound": summary["ppl"],
            "nelbo_se": summary.get("nelbo_se"), "tokens": summary["tokens"]}


def tokenizer_main(argv: list[str] | None = None) -> int:
    """diffusionlm-bench-tokenizer --config bench_tokenizer.toml: encode and decode throughput
    (bytes/s and tokens/s, medians over the repeats) over the given texts."""
    args = _parser("diffusionlm-bench-tokenizer", "Time a tokenizer's encode and decode").parse_args(argv)

    def run() -> int:
        values = read_layout(args.config, BENCH_TOKENIZER_LAYOUT)
        tok_cfg, bench = values["tokenizer"], values["benchmark"]
        _positive(args.config, bench, "repeats")
        _positive(args.config, bench, "warmup", minimum=0)
        if bool(bench["texts"]) == bool(bench["text_path"]):
            raise ConfigError(f"{args.config}: give the texts as [benchmark].texts (a list) or text_path (a file), one "
                              "of the two.")
        if bool(tok_cfg["tokenizer_dir"]) == bool(tok_cfg["vocab_path"] or tok_cfg["merges_path"]):
            raise ConfigError(f"{args.config}: name the tokenizer as [tokenizer].tokenizer_dir, or vocab_path and "
                              "merges_path.")
        if args.print_config:
            print(json.dumps({"toml": values}, indent=2))
            return 0
        from ..tokenizers.cli import load_named_tokenizer  # lazy: --print-config and bad configs need no tokenizer backends

        tok = load_named_tokenizer(tok_cfg["tokenizer_dir"], tok_cfg["vocab_path"], tok_cfg["merges_path"],
                                   "[tokenizer].tokenizer_dir, or vocab_path and merges_path")
        texts = list(bench["texts"] or [])
        if bench["text_path"]:
            texts = [Path(bench["text_path"]).read_text(encoding="utf-8")]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if not n_bytes:
            raise ConfigError(f"{args.config}: the texts are empty; there is nothing to time.")
        encode_s, decode_s, ids = [], [], []
        for i in range(bench["warmup"] + bench["repeats"]):
            start = time.perf_counter()
            ids = [tok.encode(t) for t in texts]
            middle = time.perf_counter()
            decoded = [tok.decode(x) for x in ids]
            end = time.perf_counter()
            if i >= bench["warmup"]:
                encode_s.append(middle - start)
                decode_s.append(end - middle)
        n_tokens = sum(map(len, ids))
        encode, decode = statistics.median(encode_s), statistics.median(decode_s)
        _emit("bench_tokenizer", params={"kind": tok.kind, "vocab_size": tok.vocab_size, "texts": len(texts),
                                         "repeats": bench["repeats"], "warmup": bench["warmup"]},
              metrics={"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(1, n_tokens),
                       "encode_bytes_per_s": n_bytes / encode, "encode_tokens_per_s": n_tokens / encode,
                       "decode_bytes_per_s": n_bytes / decode, "decode_tokens_per_s": n_tokens / decode,
                       "round_trip": decoded == texts})
        return 0
    return guarded(run)
