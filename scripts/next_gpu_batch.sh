#!/usr/bin/env bash
# The GPU measurements in one go (benchmarks/lm_plan.md): `psannlm bench suite --scale gpu` into
# reports/benchmarks/<timestamp>/, scripts/run_gpu_validation.py (GPU-01..04) into reports/gpu/<timestamp>/,
# the tiny-corpus baseline (BMRK-01) on datasets/lm/tiny_books.txt, then one HTML report.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/next_gpu_batch.sh [--out DIR] [--skip-validation] [-- SUITE_ARGS...]

Runs on a CUDA machine, from the repository root:
  1. psannlm bench suite --scale gpu --out DIR          (baseline run, throughput grid, memory, system.json)
  2. python scripts/run_gpu_validation.py --out reports/gpu   (GPU-01..GPU-04 into reports/gpu/<timestamp>/)
  3. BMRK-01: writes datasets/lm/tiny_books.txt (~50 MB of generated stories) if missing, then
     psannlm train --config examples/lm/configs/tiny_corpus_benchmark.yaml into DIR/tiny_corpus
  4. psannlm report DIR DIR/tiny_corpus --out DIR/report.html

  --out DIR           output directory (default: reports/benchmarks/<timestamp>)
  --skip-validation   skip step 2
  --skip-tiny-corpus  skip step 3
  -- SUITE_ARGS...    passed on to `psannlm bench suite` (e.g. -- --steps 500 --bases transformer,respsann)

PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
USAGE
}

out="reports/benchmarks/$(date +%Y%m%d-%H%M%S)"
validation=1
tiny=1
suite_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [[ $# -ge 2 ]] || { echo "error: --out needs a directory" >&2; exit 2; }; out="$2"; shift 2 ;;
        --skip-validation) validation=0; shift ;;
        --skip-tiny-corpus) tiny=0; shift ;;
        --) shift; suite_args=("$@"); break ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device is visible to $PYTHON; this batch is for GPU machines (on CPU run: psannlm bench suite)." >&2
    exit 1
fi

mkdir -p "$out"
echo "== bench suite (GPU scale) -> $out"
"$PYTHON" -m psann.cli bench suite --scale gpu --out "$out" ${suite_args[@]+"${suite_args[@]}"}
if [[ $validation -eq 1 ]]; then
    echo "== GPU validation -> reports/gpu/<timestamp>"
    "$PYTHON" scripts/run_gpu_validation.py --out reports/gpu
fi
runs=("$out")
if [[ $tiny -eq 1 ]]; then
    if [[ ! -f datasets/lm/tiny_books.txt ]]; then
        echo "== writing datasets/lm/tiny_books.txt (~50 MB)"
        "$PYTHON" -c "from psann.lm.data.demo_corpus import write_demo_corpus; write_demo_corpus('datasets/lm/tiny_books.txt', target_bytes=50_000_000, separator='<|endoftext|>')"
    fi
    echo "== tiny-corpus baseline (BMRK-01) -> $out/tiny_corpus"
    "$PYTHON" -m psann.cli train --config examples/lm/configs/tiny_corpus_benchmark.yaml \
        --train.checkpoint_dir="$out/tiny_corpus"
    runs+=("$out/tiny_corpus")
fi
echo "== report -> $out/report.html"
"$PYTHON" -m psann.cli report "${runs[@]}" --out "$out/report.html"
echo "done: $out"
