"""Is our byte-level BPE trainer as fast as Hugging Face tokenizers' Rust BpeTrainer, at what memory?

Each training runs in a fresh subprocess (so peak RSS belongs to that trainer alone); ours and HF
alternate for --rounds rounds per case; medians and the ratio ours/hf are reported. Cases:
TinyStories 2 MiB head at 10K vocab and Dickens (10 MB, with invalid UTF-8) at 32K, from
../shared/data. Also bytes/token of our 10K TinyStories tokenizer on the train head and on the
held-out valid head. Prints one JSON object.

    python benchmarks/tokenizer.py [--rounds 3] [--stream-gb 1]

--stream-gb N adds a memory check: our trainer on an N GB generated corpus (the demo story
generator, written to a temporary directory first), with peak RSS of the main process and of the
largest worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import cpu_name

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIAL = "<|endoftext|>"
CASES = {
    "tinystories_2MiB_10k": (SHARED / "tinystories" / "tinystories_v1_train_head2MiB.txt", 10_000),
    "dickens_10MB_32k": (SHARED / "prose" / "dickens.txt", 32_000),
}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss (the fallback off Linux)
    would carry over the peak of the parent that started us."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(trainer: str, path: str, vocab_size: int) -> None:
    """One training in this process; prints training seconds (imports excluded), peak RSS and the
    merge count."""
    if trainer == "ours":
        from psann.lm.tokenizers.bpe_train import train_bpe
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    start = time.perf_counter()
    if trainer == "ours":
        _, merges = train_bpe(path, vocab_size, [SPECIAL], progress=False)
        n_merges = len(merges)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer_obj = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([path], trainer_obj)
        n_merges = len(json.loads(tok.to_str())["model"]["merges"])
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "merges": n_merges}))


def run_child(trainer: str, path: Path, vocab_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", trainer, str(path), str(vocab_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bytes_per_token(path: Path, merges: list[tuple[bytes, bytes]]) -> float:
    """Encode each distinct pre-token once with the merges (lowest rank first), weight by count."""
    from psann.lm.tokenizers.bpe_train import GPT2_PATTERN, count_pretokens

    ranks = {pair: i for i, pair in enumerate(merges)}
    counts: Counter = count_pretokens(path.read_text(encoding="utf-8", errors="replace"), GPT2_PATTERN, [SPECIAL])
    total_bytes = total_tokens = 0
    for word, count in counts.items():
        parts = [bytes([b]) for b in word]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), 1 << 60))
            if (parts[best], parts[best + 1]) not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        total_bytes += len(word) * count
        total_tokens += len(parts) * count
    return total_bytes / total_tokens


def stream_child(path: str) -> None:
    """Our trainer on a large file; peak RSS of this process and of its largest worker."""
    from psann.lm.tokenizers.bpe_train import train_bpe

    start = time.perf_counter()
    _, merges = train_bpe(path, 32_000, [SPECIAL], progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 1), "mb_per_s": round(Path(path).stat().st_size / 1e6 / seconds, 2),
                      "main_peak_rss_mb": round(peak_rss_mb(), 1),
                      "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                      "merges": len(merges)}))


def streaming_memory(gigabytes: float) -> dict:
    from psann.lm.data.demo_corpus import write_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stories.txt"
        write_demo_corpus(path, target_bytes=int(gigabytes * 1e9), separator=SPECIAL)
        out = subprocess.run([sys.executable, __file__, "--stream-child", str(path)],
                             capture_output=True, text=True, check=True)
        return {"input_bytes": path.stat().st_size, "vocab_size": 32_000,
                **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--stream-child":
        stream_child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stream-gb", type=float, default=0, help="also train on a generated corpus of this size")
    args = p.parse_args()
    result = {"question": __doc__.split("\n")[0], "cpu": cpu_name(), "rounds": args.rounds, "cases": {}}
    for name, (path, vocab_size) in CASES.items():
        if not path.exists():
            sys.exit(f"missing {path}: this benchmark reads ../shared/data")
        runs = {"ours": [], "hf": []}
        inputs = {"ours": path, "hf": path}
        note = "same file"
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # HF's trainer stops with "stream did not contain valid UTF-8"
            inputs["hf"] = Path(tempfile.mkdtemp()) / path.name
            inputs["hf"].write_text(raw.decode("utf-8", errors="replace"), encoding="utf-8")
            note = "HF trains on a UTF-8-sanitised copy (made before timing): it rejects the original's invalid bytes"
        del raw
        for r in range(args.rounds):
            for trainer in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                runs[trainer].append(run_child(trainer, inputs[trainer], vocab_size))
        med = {t: statistics.median(x["seconds"] for x in runs[t]) for t in runs}
        rss = {t: statistics.median(x["peak_rss_mb"] for x in runs[t]) for t in runs}
        result["cases"][name] = {
            "input_bytes": path.stat().st_size, "vocab_size": vocab_size, "inputs": note,
            "ours_s": round(med["ours"], 3), "hf_s": round(med["hf"], 3), "ratio": round(med["ours"] / med["hf"], 3),
            "ours_peak_rss_mb": round(rss["ours"], 1), "hf_peak_rss_mb": round(rss["hf"], 1),
            "merges": {t: runs[t][0]["merges"] for t in runs},
            "per_round_s": {t: [round(x["seconds"], 3) for x in runs[t]] for t in runs},
        }
    from psann.lm.tokenizers.bpe_train import train_bpe

    path, vocab_size = CASES["tinystories_2MiB_10k"]
    _, merges = train_bpe(path, vocab_size, [SPECIAL], progress=False)
    result["bytes_per_token_tinystories_10k"] = {
        "train_head": round(bytes_per_token(path, merges), 3),
        "valid_head": round(bytes_per_token(SHARED / "tinystories" / "tinystories_v1_valid_head.txt", merges), 3),
    }
    result["encoding"] = encoding_throughput(path, vocab_size, args.rounds)
    if args.stream_gb:
        result["streaming"] = streaming_memory(args.stream_gb)
    print(json.dumps(result, indent=2))


def encoding_throughput(train_path: Path, vocab_size: int, rounds: int) -> dict:
    """MB/s encoding the TinyStories valid head (one thread): our BPETokenizer.encode vs raw
    tiktoken with the same ranks (`encode_ordinary`: our engine without special-token handling)
    vs HF tokenizers loading the same vocabulary (to_hf)."""
    from tokenizers import Tokenizer

    from psann.lm.tokenizers.bpe import BPETokenizer
    from psann.lm.tokenizers.bpe_train import train_bpe

    vocab, merges = train_bpe(train_path, vocab_size, [SPECIAL], progress=False)
    ours = BPETokenizer(vocab, merges, [SPECIAL])
    hf_dir = Path(tempfile.mkdtemp())
    ours.to_hf(hf_dir)
    hf = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    text = (SHARED / "tinystories" / "tinystories_v1_valid_head.txt").read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    engines = {"ours": ours.encode, "tiktoken": ours._enc.encode_ordinary, "hf": lambda t: hf.encode(t).ids}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds + 1):  # the first round warms caches and is dropped
        for name, encode in engines.items():
            start = time.perf_counter()
            encode(text)
            times[name].append(time.perf_counter() - start)
    speed = {name: round(mb / statistics.median(t[1:]), 2) for name, t in times.items()}
    same = ours.encode(text) == hf.encode(text).ids
    return {"text": "tinystories_v1_valid_head.txt", "mb": round(mb, 3), "mb_per_s": speed,
            "ratio_vs_tiktoken": round(speed["ours"] / speed["tiktoken"], 3),
            "ratio_vs_hf": round(speed["ours"] / speed["hf"], 3), "ids_identical_to_hf": same}


if __name__ == "__main__":
    main()
