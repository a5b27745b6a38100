#!/usr/bin/env bash
# Everything a lent H100 session needs, in ONE device call (the lease is 15 min of device time in all, a
# machine start included, and one command may run 10 min): build zokernels._cuda, the GPU tests,
# compute-sanitizer over the CUDA ops, the benchmark suite with the time that is left, the README table.
#
#   device run: command "bash benchmarks/gpu_session.sh", timeout_s 590
#   here, after:  tar xzf <files_at>/session.tgz -C /tmp/gpu && cp /tmp/gpu/bench/*.{json,md,png} benchmarks/results/
#                 python -m benchmarks.report --readme
#
# Each stage has its own cap, so a failing or slow stage leaves time to the next; every log goes into
# $OUT/session.tgz and the stage table ($OUT/summary.txt) is printed last (the reply carries the tail).
# $OUT returns at most 8 files: summary.txt, session.tgz and the benchmark's .json/.md/.png.
# ZK_TOTAL_S (default 560) is the whole script's budget; ZK_SKIP="tests sanitizer" drops stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zokernels-gpu-session}
S=$(mktemp -d)
mkdir -p "$OUT" "$S/bench"
export PYTHONUNBUFFERED=1 ZOKERNELS_REQUIRE_CUDA=1 TRITON_CACHE_DIR="$S/triton-cache"
PY=${PYTHON:-python3}
TOTAL=${ZK_TOTAL_S:-560}
T0=$(date +%s)
left() { echo $((TOTAL - $(date +%s) + T0)); }
skipped() { [[ " ${ZK_SKIP:-} " == *" $1 "* ]]; }

stage() {  # stage NAME CAP_S CMD...: runs CMD under timeout CAP (never past the script's budget), log in $S
  local name=$1 cap=$2 rc t
  shift 2
  if skipped "$name"; then echo "$name | skipped (ZK_SKIP)" >> "$S/summary.txt"; return; fi
  ((cap > $(left) - 15)) && cap=$(($(left) - 15))
  if ((cap < 10)); then echo "$name | not run: budget spent" >> "$S/summary.txt"; return; fi
  t=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$S/$name.log" 2>&1
  rc=$?
  echo "$name | rc $rc$([ $rc = 124 ] && echo ' (timed out)') | $(($(date +%s) - t)) s of cap $cap s" >> "$S/summary.txt"
  tail -n 3 "$S/$name.log" | sed 's/^/    /' >> "$S/summary.txt"
}

finish() {
  cp "$S"/bench/*.json "$S"/bench/*.md "$S"/bench/*.png "$OUT"/ 2>/dev/null
  tar czf "$OUT/session.tgz" -C "$S" --exclude triton-cache .
  cp "$S/summary.txt" "$OUT/summary.txt"
  echo "== stages ($(($(date +%s) - T0)) s of $TOTAL s)"
  cat "$S/summary.txt"
}
trap finish EXIT

echo "stage | result | time" > "$S/summary.txt"
stage env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton, transformers; print(sys.version); \
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)'; nvcc --version"
stage build 150 "$PY" setup.py build_ext --inplace
stage report 60 "$PY" -m zokernels
stage tests 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
stage sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m zokernels.backends.cuda.selfcheck
# the benchmark suite stops starting new cases past --time-budget and checkpoints after every section
BUDGET=$(($(left) - 45))
stage bench $((BUDGET + 30)) "$PY" -m benchmarks --out "$S/bench" --time-budget "$BUDGET" \
  --e2e-reserve $((BUDGET * 170 / 480))
stage table 20 "$PY" -m benchmarks.report --readme --results "$S/bench"
