"""How much memory does one huge document cost? Peak RSS of `psannlm data build` (BPE tokenizer)
on a file that is a single line with no newlines, and of `psannLMDataPrep` (byte tokenizer) with
and without a few training steps of a tiny model, against the file size. Also: what a loader's
self-check costs, the sha256 + max-id scan of a 1 GiB shard (`--verify-gib`).

Every measured step runs in a child process; its peak RSS comes from os.wait4 (the kernel's
ru_maxrss of that child). The training figure is compared with the same script on a 1 KB file,
so "extra" is what the huge document costs over the model, torch and the trainer. The text is
the TinyStories heads in ../shared/data with newlines and separators replaced by spaces, repeated
to the size asked (generated stories when ../shared is absent). Prints one JSON object.

    python benchmarks/huge_document.py [--build-mb 50] [--prep-mb 10 50] [--verify-gib 1] [--src DIR]

--src measures another source tree (e.g. `git archive HEAD src | tar -x -C /tmp/before`, then
--src /tmp/before/src) with the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TINYSTORIES, cpu_name, to_json

TRAIN_SCRIPT = r"""
import sys
from psann.lm import psannLM, psannLMDataPrep
path, steps, cache, run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dp = psannLMDataPrep([path], tokenizer="byte", max_length=128, val_split=0.01, cache_dir=cache)
print(dp.train_windows.data.n_tokens, flush=True)
if steps:
    lm = psannLM(d_model=64, n_layers=2, n_heads=4)
    lm.fit(dp, max_steps=steps, batch_tokens=2048, eval_interval_steps=0, eval_batches=2, checkpoint_dir=run,
           device="cpu", amp="fp32")
"""

VERIFY_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from psann.lm.data.tokens import scan_shard
path, gib = Path(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(0)
with open(path, "wb") as fh:
    for _ in range(int(gib * 16)):
        fh.write(rng.integers(0, 50000, size=32 << 20, dtype=np.uint16).tobytes())  # 64 MiB
times = []
for _ in range(3):
    start = time.perf_counter()
    scan_shard(path, np.dtype(np.uint16))
    times.append(time.perf_counter() - start)
path.unlink()
print(json.dumps({"gib": gib, "seconds_per_gib": round(min(times) / gib, 3), "runs": [round(t, 3) for t in times]}))
"""


def single_line_text(path: Path, n_bytes: int) -> None:
    """One line of about n_bytes: real stories with every newline and separator turned into a space."""
    sources = sorted(TINYSTORIES.glob("*.txt"))
    if sources:
        text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)
    else:
        from psann.lm.data.demo_corpus import generate_stories

        text = " ".join(generate_stories(2000, seed=0))
    text = " ".join(text.replace("<|endoftext|>", " ").split())  # no newlines, single spaces
    unit = text.encode("utf-8")
    with open(path, "wb") as fh:
        written = 0
        while written < n_bytes:
            piece = unit[:n_bytes - written]
            fh.write(piece)
            written += len(piece)
            if written < n_bytes:
                fh.write(b" ")
                written += 1


# The child's peak RSS is read by a small Python parent of its own: a child forked from this
# process would inherit this process's high-water mark (ru_maxrss survives exec).
WRAPPER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print('PEAK_RSS_KB', usage.ru_maxrss, file=sys.stderr)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measured(cmd: list[str], env: dict) -> dict:
    """Run cmd; its wall time and peak RSS (MB). A failure stops the benchmark with its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def psannlm(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from psann.cli import main; sys.exit(main())", *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build-mb", type=float, default=50)
    p.add_argument("--prep-mb", type=float, nargs="*", default=[10, 50], help="sizes for psannLMDataPrep / training")
    p.add_argument("--steps", type=int, default=3, help="training steps of the tiny model")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--verify-gib", type=float, default=1.0, help="size of the shard the self-check scans (0: skip)")
    p.add_argument("--src", help="psann source tree to measure (default: the installed one)")
    p.add_argument("--tmp", default=None, help="scratch directory (default: a new one in /tmp)")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=args.src) if args.src else dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    result = {"cpu": cpu_name(), "src": args.src or "installed"}
    with tempfile.TemporaryDirectory(prefix="psann-huge-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        tok_text = TINYSTORIES / "tinystories_v1_train_head2MiB.txt"
        if not tok_text.exists():
            tok_text = tmp / "tok.txt"
            single_line_text(tok_text, 2 << 20)
        subprocess.run(psannlm("tokenizer", "train", "--input", str(tok_text), "--vocab-size", str(args.vocab),
                               "--num-workers", "1", "--out", str(tmp / "tok")), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        big = tmp / "build.txt"
        single_line_text(big, int(args.build_mb * 1e6))
        mb = big.stat().st_size / 1e6
        run = measured(psannlm("data", "build", "--input", str(big), "--tokenizer", str(tmp / "tok"), "--out",
                               str(tmp / "ds"), "--val-fraction", "0"), env)
        result["build_bpe"] = {"file_mb": round(mb, 1), **run, "rss_per_file_mb": round(run["peak_rss_mb"] / mb, 2)}
        big.unlink()
        tiny = tmp / "tiny.txt"
        single_line_text(tiny, 1000)
        base = {}  # the same script on 1 KB: torch, the model and the trainer without the big document
        for steps in (0, args.steps):
            name = f"{'train' if steps else 'prep'}_byte_1kb"
            base[steps] = result[name] = measured([sys.executable, "-c", TRAIN_SCRIPT, str(tiny), str(steps),
                                                   str(tmp / f"c{name}"), str(tmp / f"r{name}")], env)
        for size in args.prep_mb:
            doc = tmp / f"prep{size}.txt"
            single_line_text(doc, int(size * 1e6))
            for steps in (0, args.steps):
                name = f"{'train' if steps else 'prep'}_byte_{size:g}mb"
                run = measured([sys.executable, "-c", TRAIN_SCRIPT, str(doc), str(steps), str(tmp / f"c{name}"),
                                str(tmp / f"r{name}")], env)
                run["extra_over_1kb_mb"] = round(run["peak_rss_mb"] - base[steps]["peak_rss_mb"], 1)
                result[name] = {"file_mb": round(doc.stat().st_size / 1e6, 1), **run}
            doc.unlink()
        if args.verify_gib:
            proc = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(tmp / "shard.bin"), str(args.verify_gib)],
                                  env=env, capture_output=True, text=True)
            result["verify_scan"] = json.loads(proc.stdout) if proc.returncode == 0 else "n/a (no scan_shard here)"
    print(to_json(result))


if __name__ == "__main__":
    main()
