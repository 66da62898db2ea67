"""How fast is the data path: building shards (1 vs 2 workers, with and without filters), loading
batches, and does memory stay flat while streaming 1e9 tokens?

Peers, each run in the same process: the build against the bare tokenizer (`encode_batch` over
the same documents, no pipeline); the shard loader against the classic `get_batch` on an
in-memory array; streaming RSS against reading through one long-lived memmap. Prints one JSON
object. Needs ../shared/data.

    python benchmarks/data.py [--stream-tokens 1e9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import cpu_name

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_throughput(tmp: Path) -> dict:
    from psann.lm.data.build import BuildConfig, build_dataset
    from psann.lm.data.filters import FilterConfig
    from psann.lm.data.sources import iter_documents_from, resolve_inputs
    from psann.lm.tokenizers import load_tokenizer
    from psann.lm.tokenizers.bpe import BPETokenizer
    from psann.lm.tokenizers.bpe_train import train_bpe

    source = SHARED / "prose" / "dickens.txt"
    vocab, merges = train_bpe(SHARED / "tinystories" / "tinystories_v1_train_head2MiB.txt", 8192, ["<|endoftext|>"],
                              progress=False)
    BPETokenizer(vocab, merges, ["<|endoftext|>"]).save(tmp / "tok")
    mb = source.stat().st_size / 1e6
    docs = [d for _, d in iter_documents_from(resolve_inputs([str(source)]), separator="\n\n")]
    tok = load_tokenizer(tmp / "tok")
    start = time.perf_counter()
    for i in range(0, len(docs), 256):
        tok.encode_batch(docs[i:i + 256], add_bos=True, add_eos=True)
    bare = mb / (time.perf_counter() - start)
    filters = FilterConfig(english=True, exact_dedup=True, near_dedup=True,
                           decontaminate=[str(p) for p in sorted((SHARED / "eval").glob("*.jsonl"))])
    out = {"input": "dickens.txt (blank-line documents)", "mb": round(mb, 2),
           "bare_tokenizer_mb_per_s": round(bare, 2)}
    for name, workers, f in (("plain_1_worker", 1, FilterConfig()), ("plain_2_workers", 2, FilterConfig()),
                             ("all_filters_1_worker", 1, filters), ("all_filters_2_workers", 2, filters)):
        start = time.perf_counter()
        index = build_dataset(BuildConfig(inputs=[str(source)], tokenizer=str(tmp / "tok"), out=str(tmp / name),
                                          separator="blank", workers=workers, progress=False, filters=f))
        speed = mb / (time.perf_counter() - start)
        out[name] = {"mb_per_s": round(speed, 2), "ratio_vs_bare_tokenizer": round(speed / bare, 3),
                     "removed": index["removed"], "train_tokens": index["tokens"]["train"]}
    return out


def write_random_shards(directory: Path, n_tokens: int, shard_tokens: int = 1 << 27) -> None:
    """A built-dataset directory of random uint16 tokens (BOS every 512 tokens) without tokenising."""
    from psann.lm.data.tokens import FORMAT, FORMAT_VERSION, INDEX_FILE

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, left, i = [], n_tokens, 0
    while left > 0:
        n = min(shard_tokens, left)
        with open(directory / f"train_{i:05d}.bin", "wb") as fh:
            for lo in range(0, n, 1 << 24):
                block = rng.integers(2, 32000, size=min(1 << 24, n - lo), dtype=np.uint16)
                block[(lo + np.arange(block.shape[0])) % 512 == 0] = 1
                fh.write(block.tobytes())
        np.save(directory / f"train_{i:05d}.docs.npy", np.arange(0, n, 512, dtype=np.int64))
        shards.append({"file": f"train_{i:05d}.bin", "docs_file": f"train_{i:05d}.docs.npy", "tokens": n,
                       "documents": -(-n // 512)})
        left, i = left - n, i + 1
    (directory / INDEX_FILE).write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 32000, "bos_id": 1,
        "eos_id": 0, "tokenizer_fingerprint": "random", "shards": {"train": shards, "val": []}}))


def loader_speed(directory: Path) -> dict:
    import torch

    from psann.lm.data.shards import Loader, Windows
    from psann.lm.data.shards import ShardedTokens, get_batch

    data = ShardedTokens(directory)
    in_memory = data.read(0, min(data.n_tokens, 1 << 26)).astype(np.uint16)
    out = {"batch": "32 x 1024 tokens"}
    for name, make in (("shard_loader_random", lambda: Loader(Windows(data, 1024), 32, mode="random")),
                       ("shard_loader_sequential", lambda: Loader(Windows(data, 1024), 32, mode="sequential"))):
        loader, times = make(), []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(50):
                loader.next_batch()
            times.append(50 / (time.perf_counter() - start))
        out[name] = round(statistics.median(times), 1)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            get_batch(in_memory, 32, 1024, torch.device("cpu"))
        times.append(50 / (time.perf_counter() - start))
    out["get_batch_in_memory"] = round(statistics.median(times), 1)
    out["ratio_random_vs_get_batch"] = round(out["shard_loader_random"] / out["get_batch_in_memory"], 3)
    return out


def streaming_rss(directory: Path, n_tokens: int) -> dict:
    from psann.lm.data.shards import Loader, Windows
    from psann.lm.data.shards import ShardedTokens

    data = ShardedTokens(directory)
    B, L = 64, 1024
    batches = n_tokens // (B * L)
    loader = Loader(Windows(data, L), B, mode="sequential")
    before, peak, start = rss_mb(), 0.0, time.perf_counter()
    for i in range(batches):
        loader.next_batch()
        if i % 200 == 0:
            peak = max(peak, rss_mb())
    ours = {"tokens": batches * B * L, "seconds": round(time.perf_counter() - start, 1),
            "rss_growth_mb": round(max(peak, rss_mb()) - before, 1)}
    # Peer: the same sequential reads through long-lived memmaps (pages stay mapped and counted).
    maps = [np.memmap(directory / s["file"], dtype=np.uint16, mode="r") for s in data.shards]
    before, peak, pos = rss_mb(), 0.0, 0
    for i in range(batches):
        shard, off = divmod(pos, data.shards[0]["tokens"])
        rows = [np.array(maps[min(shard, len(maps) - 1)][off + r * L:off + r * L + L + 1], dtype=np.int64) for r in range(B)]
        pos += B * L
        if i % 200 == 0:
            peak = max(peak, rss_mb())
    del rows
    return {"ours": ours, "long_lived_memmap_rss_growth_mb": round(max(peak, rss_mb()) - before, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stream-tokens", type=float, default=1e9)
    args = p.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"missing {SHARED}: this benchmark reads ../shared/data")
    result = {"question": __doc__.split("\n")[0], "cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["build"] = build_throughput(tmp)
        write_random_shards(tmp / "random", int(args.stream_tokens))
        result["loader_batches_per_s"] = loader_speed(tmp / "random")
        result["streaming"] = streaming_rss(tmp / "random", int(args.stream_tokens))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
