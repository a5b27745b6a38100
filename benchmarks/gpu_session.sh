#!/usr/bin/env bash
# Everything a lent H100 session needs, in ONE device call (the lease is 15 min of device time in all, a
# machine start included, and one command may run 10 min): the wheels the image lacks, build zokernels._cuda, the
# GPU tests, the benchmark suite with the time that is left but 110 s, the README table, compute-sanitizer over
# the CUDA and Triton ops.
#
#   here, first:  make gpu-wheels            (benchmarks/wheels/, ~3.2 MiB of py3-none-any wheels; ignored by git)
#   device run:   command "bash benchmarks/gpu_session.sh", timeout_s 590, carry ["benchmarks/wheels"]
#                 (ZK_TOTAL_S <= timeout_s - 30, and <= the limit_s the device reports: a lease with less time
#                 left gets a shorter limit)
#   here, after:  tar xzf <files_at>/session.tgz -C /tmp/gpu && cp /tmp/gpu/bench/*.{json,md} benchmarks/results/
#                 python -m benchmarks.report benchmarks/results/<file>.json   (redraws the .png if the image had
#                 no matplotlib: its bench log then says "plot skipped: matplotlib missing")
#                 python -m benchmarks.report --readme
#
# The image has no network: stage `wheels` installs, from $ZK_WHEELS (default benchmarks/wheels), each wheel of
# requirements/gpu-wheels.txt whose module the image cannot import, into $ZK_SITE (default build/gpu-site, kept
# on a warm machine for the next call), which every stage finds first on PYTHONPATH; a needed module without a
# wheel fails that stage with a line naming it (benchmarks/gpu_wheels.py).
#
# Each stage has its own cap, so a failing or slow stage leaves time to the next; $OUT is refreshed after every
# stage (a command killed at the device's limit still returns what was done). $OUT returns at most 8 files:
# summary.txt (the stage table, also printed last), session.tgz (every log, the benchmark results, the GPU
# tests' junit xml) and the benchmark's .json/.md/.png. Exit status: the number of failed stages.
# ZK_TOTAL_S (default 560) is the whole script's budget; ZK_SKIP="tests sanitizer" drops stages; ZK_BUILD=missing
# skips the build when zokernels._cuda already imports (a warm machine's earlier call built it); ZK_BENCH_ARGS
# adds options to `python -m benchmarks` (e.g. "--only masked"); ZK_WHEEL_LIST replaces requirements/gpu-wheels.txt.
#
# A second, benchmarks-only call fits in the same lease (start ~90 s + A <= 590 s + B <= 180 s + transfers), if it
# is made at once: the machine stays warm 30 s after a call, and keeps the built module and build/gpu-site:
#   A: bash benchmarks/gpu_session.sh                                   timeout_s 590, carry ["benchmarks/wheels"]
#   B: ZK_SKIP="env report tests sanitizer" ZK_BUILD=missing ZK_TOTAL_S=150 ZK_BENCH_ARGS="--only quant" \
#      bash benchmarks/gpu_session.sh                                    timeout_s 180, carry ["benchmarks/wheels"]
# B's bench gets 150 - 50 - 20 = 80 s for a part that A's results list as skipped (quant runs last in A); A's
# files come back before its reply, so B can be sent at once. Missed the warm window: B would need a new start
# (~90 s) and a rebuild (caps 60 + 150 s) that leave its bench no time; the summary says "not run".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zokernels-gpu-session}
S=$(mktemp -d)
mkdir -p "$OUT" "$S/bench"
export PYTHONUNBUFFERED=1 ZOKERNELS_REQUIRE_CUDA=1 TRITON_CACHE_DIR="$S/triton-cache"
export PY=${PYTHON:-python3}
WHEELS=${ZK_WHEELS:-benchmarks/wheels}
SITE=$(realpath -m "${ZK_SITE:-build/gpu-site}")
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # what stage wheels installs, for every later stage
read -ra BENCH_ARGS <<< "${ZK_BENCH_ARGS:-}"
LIST_OPT=()
[[ -n ${ZK_WHEEL_LIST:-} ]] && LIST_OPT=(--list "$ZK_WHEEL_LIST")
TOTAL=${ZK_TOTAL_S:-560}
[[ $TOTAL =~ ^[0-9]+$ ]] || { echo "ZK_TOTAL_S must be a whole number of seconds, got '$TOTAL'" >&2; exit 2; }
T0=$(date +%s)
FAILED=0
left() { echo $((TOTAL - $(date +%s) + T0)); }
skipped() { [[ " ${ZK_SKIP:-} " == *" $1 "* ]]; }

flush_out() {  # what $OUT returns, refreshed after every stage
  cp "$S"/bench/*.json "$S"/bench/*.md "$S"/bench/*.png "$OUT"/ 2>/dev/null
  cp "$S/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/session.tgz.part" -C "$S" --exclude triton-cache . && mv "$OUT/session.tgz.part" "$OUT/session.tgz"
}

stage() {  # stage NAME CAP_S CMD...: runs CMD under timeout CAP (never past the script's budget), log in $S
  local name=$1 cap=$2 rc t note=""
  shift 2
  if skipped "$name"; then echo "$name | skipped (ZK_SKIP)" >> "$S/summary.txt"; return; fi
  ((cap > $(left) - 15)) && cap=$(($(left) - 15))
  if ((cap < 10)); then
    echo "$name | not run: budget spent" >> "$S/summary.txt"
    FAILED=$((FAILED + 1))
    return
  fi
  t=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$S/$name.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  ((rc != 0)) && FAILED=$((FAILED + 1))
  echo "$name | rc $rc$note | $(($(date +%s) - t)) s of cap $cap s" >> "$S/summary.txt"
  tail -n 3 "$S/$name.log" | sed 's/^/    /' >> "$S/summary.txt"
  flush_out
}

finish() {
  flush_out
  echo "== stages ($(($(date +%s) - T0)) s of $TOTAL s, $FAILED failed)"
  cat "$S/summary.txt"
  rm -rf "$S"
  exit "$FAILED"
}
trap finish EXIT

echo "stage | result | time" > "$S/summary.txt"
stage env 30 bash -c 'set -e; nvidia-smi; "$PY" -c "import sys, torch, triton, transformers; print(sys.version); \
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"; nvcc --version'
stage wheels 60 "$PY" benchmarks/gpu_wheels.py install --wheels "$WHEELS" --site "$SITE" "${LIST_OPT[@]}"
if [[ ${ZK_BUILD:-always} == missing ]] && ! skipped build && "$PY" -c "import zokernels._cuda" 2>/dev/null; then
  echo "build | skipped (ZK_BUILD=missing: zokernels._cuda already imports)" >> "$S/summary.txt"
else
  stage build 150 "$PY" setup.py build_ext --inplace
fi
stage report 60 "$PY" -m zokernels
# -v and durations: a log that names the test that was running when the cap hit; the CUDA sanitizer test is
# the sanitizer stage's job
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=120)
stage tests 170 "$PY" -m pytest -m gpu -v -rs --durations=15 -p no:cacheprovider "${TIMEOUT_OPT[@]}" \
  --junitxml "$S/tests.xml" --deselect tests/test_cuda_backend.py::test_gpu_under_compute_sanitizer tests
# the benchmark suite stops starting new cases past --time-budget and checkpoints after every section; its own
# clock starts after torch is imported, hence the 50 s margin; 20 s stay for the table, 90 s for the sanitizer
RESERVE=20
skipped sanitizer || RESERVE=$((RESERVE + 90))
BUDGET=$(($(left) - 50 - RESERVE))
if skipped bench || ((BUDGET >= 60)); then  # stage reports a skipped bench itself
  stage bench $((BUDGET + 35)) "$PY" -m benchmarks --out "$S/bench" --time-budget "$BUDGET" \
    --e2e-reserve $((BUDGET * 170 / 480)) "${BENCH_ARGS[@]}"
else
  echo "bench | not run: $BUDGET s of budget left (< 60 s)" >> "$S/summary.txt"
  FAILED=$((FAILED + 1))
fi
stage table 20 "$PY" -m benchmarks.report --readme --results "$S/bench"
# one cudaMalloc per tensor, so that memcheck sees an access past a tensor's end
stage sanitizer 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 bash -c 'set -e
  compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m zokernels.selfcheck --backend cuda
  compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m zokernels.selfcheck --backend triton'
