#!/usr/bin/env bash
# Back the micro benchmarks' GB/s with Nsight Compute DRAM counters (H100 session; not run in CI).
#
#   bash benchmarks/ncu.sh [OUT_DIR] [NUMEL]      # default OUT_DIR=benchmarks/results/ncu, NUMEL=2^28
#
# For each backend x kernel x dtype it profiles ONE call (cudaProfilerStart/Stop around it, see
# benchmarks/ncu_target.py) and writes ncu's CSV: dram__bytes_read.sum + dram__bytes_write.sum should
# be close to the "counted bytes" line the target prints (2 x numel x element size; 4 x numel for the
# RNG-only fill), and dram__throughput.avg.pct_of_peak_sustained_elapsed is the kernel's share of peak
# DRAM bandwidth. Needs `ncu` on PATH and GPU performance-counter access (ERR_NVGPUCTRPERM means the
# driver restricts counters to admins: run as root or set NVreg_RestrictProfilingToAdminUsers=0).
set -uo pipefail
OUT=${1:-benchmarks/results/ncu}
NUMEL=${2:-268435456}
PY=${PYTHON:-python}
METRICS=dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
command -v ncu >/dev/null || { echo "ncu (Nsight Compute CLI) not found on PATH" >&2; exit 2; }
mkdir -p "$OUT"
for backend in triton cuda; do
  for kernel in perturb_ update_restore update_sr perturbed_copy update_q16 fill_perturbation; do
    for dtype in bf16 fp32; do
      [ "$kernel" = update_sr ] && [ "$dtype" = fp32 ] && continue
      f="$OUT/$backend-$kernel-$dtype.csv"
      echo "== $backend $kernel $dtype -> $f"
      ncu --profile-from-start off --target-processes all --metrics "$METRICS" --csv \
          "$PY" -m benchmarks.ncu_target --backend "$backend" --kernel "$kernel" --dtype "$dtype" \
          --numel "$NUMEL" > "$f" 2> "$f.err" || echo "   failed (see $f.err)"
      grep -h "counted bytes" "$f" || true
    done
  done
done
