#!/usr/bin/env bash
# The GPU measurements in one go: `psannlm bench suite --scale gpu` and scripts/run_gpu_validation.py
# into reports/benchmarks/<timestamp>/, then one HTML report of the suite.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/next_gpu_batch.sh [--out DIR] [--skip-validation] [-- SUITE_ARGS...]

Runs on a CUDA machine, from the repository root:
  1. psannlm bench suite --scale gpu --out DIR          (baseline run, throughput grid, memory, system.json)
  2. python scripts/run_gpu_validation.py --out DIR/validation   (bf16 parity, grid at 124M, multi-GPU parity)
  3. psannlm report DIR --out DIR/report.html

  --out DIR           output directory (default: reports/benchmarks/<timestamp>)
  --skip-validation   run only the suite and the report
  -- SUITE_ARGS...    passed on to `psannlm bench suite` (e.g. -- --steps 500 --bases transformer,respsann)

PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
USAGE
}

out="reports/benchmarks/$(date +%Y%m%d-%H%M%S)"
validation=1
suite_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [[ $# -ge 2 ]] || { echo "error: --out needs a directory" >&2; exit 2; }; out="$2"; shift 2 ;;
        --skip-validation) validation=0; shift ;;
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
    echo "== GPU validation -> $out/validation/<timestamp>"
    "$PYTHON" scripts/run_gpu_validation.py --out "$out/validation"
fi
echo "== report -> $out/report.html"
"$PYTHON" -m psann.cli report "$out" --out "$out/report.html"
echo "done: $out"
