#!/usr/bin/env bash
# benchmarks/gpu_session.sh on CPU, in a Python shaped like the GPU machine's image: Python 3.12 with
# requirements/gpu-image.txt (torch 2.11.0 with its CUDA libraries, triton 3.6.0, transformers 5.17.0) and nothing
# the image lacks (no pytest, pybind11, gguf, matplotlib), over a copy of the working tree as a device call sends
# it (tracked and untracked-not-ignored files) plus the carried benchmarks/wheels. Every stage a CPU can run must
# pass: env (with a stand-in nvidia-smi), wheels (installs pytest, pybind11, ... offline), build (nvcc, pybind11
# from the wheels), report, tests (`pytest -m gpu`: every module collected, every test skipped on CPU), bench
# (--quick; the plot is skipped: no matplotlib), table. The sanitizer needs a GPU: skipped.
#
#   make gpu-rehearsal        (= bash benchmarks/gpu_rehearsal.sh)
#
# The venv (~2.7 GB of downloads, ~4.9 GB on disk, ~2.5 min on the 2-core machine) is made once in
# $ZK_REHEARSAL_VENV (default ~/.cache/zokernels/gpu-image-py312) and made again only when
# requirements/gpu-image.txt changes; benchmarks/wheels is fetched into the copy when it is missing or stale.
# Python 3.12: $ZK_REHEARSAL_PYTHON, else python3.12 on PATH or under pyenv. Exit status: 0 when every stage
# gave what it should, 1 otherwise (the stage table and the failing stages' logs are printed), 3 when this machine
# cannot rehearse (no Python 3.12 or no nvcc; the line says which).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ZK_REHEARSAL_VENV:-$HOME/.cache/zokernels/gpu-image-py312}
REQ=requirements/gpu-image.txt
T_START=$(date +%s)

find_py312() {
  local c
  for c in "${ZK_REHEARSAL_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12; do
    [[ -n $c ]] && "$c" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
      && { command -v "$c"; return 0; }
  done
  return 1
}
cannot() { echo "gpu-rehearsal: cannot rehearse here: $*" >&2; exit 3; }

PY312=$(find_py312) || cannot "no Python 3.12 (set ZK_REHEARSAL_PYTHON)"
command -v nvcc > /dev/null || cannot "no nvcc on PATH (the image has CUDA's compiler; the build stage needs it)"

# ---------------------------------------------------------------- the image's Python (cached)
mkdir -p "$(dirname "$VENV")"
exec 9> "$VENV.lock"
flock 9  # one builder at a time; the others wait and reuse it
STAMP="$(sha256sum "$REQ" | cut -c1-16) $($PY312 -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -f $VENV/.zk-stamp || $(cat "$VENV/.zk-stamp") != "$STAMP" ]]; then
  echo "gpu-rehearsal: making $VENV from $REQ with $PY312 (downloads ~2.7 GB once)"
  t=$(date +%s)
  free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print int($4 / 2^20)}')
  ((free_gb >= 8)) || cannot "$free_gb GB free under $(dirname "$VENV"); the venv takes ~5 GB (set ZK_REHEARSAL_VENV)"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" > "$VENV.pip.log" 2>&1 \
    || { grep -v "^WARNING: Location 'file:" "$VENV.pip.log" | tail -n 30; echo "gpu-rehearsal: pip failed" >&2; exit 1; }
  echo "$STAMP" > "$VENV/.zk-stamp"
  echo "gpu-rehearsal: venv made in $(($(date +%s) - t)) s, $(du -sh "$VENV" | cut -f1)"
fi
"$VENV/bin/python" -c "import sys, torch, triton, transformers, numpy
print('gpu-rehearsal: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'numpy', numpy.__version__)"

# ---------------------------------------------------------------- what a device call sends
W=$(mktemp -d /tmp/zk-gpu-rehearsal.XXXXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/tree" "$W/bin" "$W/out"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$W/tree"
if [[ -d benchmarks/wheels ]] && "$VENV/bin/python" -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_wheels as g
sys.exit(bool(g.check_dir('benchmarks/wheels', g.read_list())))" 2>/dev/null; then
  cp -r benchmarks/wheels "$W/tree/benchmarks/wheels"
else
  echo "gpu-rehearsal: benchmarks/wheels missing or stale: fetching into the copy (make gpu-wheels does it here)"
  "$VENV/bin/python" "$W/tree/benchmarks/gpu_wheels.py" fetch --dest "$W/tree/benchmarks/wheels"
fi
printf '#!/bin/sh\necho "nvidia-smi stand-in: rehearsal on CPU, no GPU"\n' > "$W/bin/nvidia-smi"
chmod +x "$W/bin/nvidia-smi"

# ---------------------------------------------------------------- the session, as on the device
set +e
env -u PYTHONPATH -u VIRTUAL_ENV -u TRITON_INTERPRET -u ZOKERNELS_BACKEND PATH="$W/bin:$PATH" OUT="$W/out" \
  PYTHON="$VENV/bin/python" ZK_SKIP=sanitizer ZK_BENCH_ARGS=--quick ZK_TOTAL_S="${ZK_REHEARSAL_TOTAL_S:-480}" \
  bash "$W/tree/benchmarks/gpu_session.sh" > "$W/session.log" 2>&1
rc=$?
set -e
mkdir -p "$W/s" && tar xzf "$W/out/session.tgz" -C "$W/s"

# ---------------------------------------------------------------- what each stage must have given
problems=()
row() { grep "^$1 | " "$W/out/summary.txt" || true; }
for st in env wheels build report tests bench table; do
  [[ $(row "$st") == "$st | rc 0 |"* ]] || problems+=("stage $st: $(row "$st")")
done
[[ $(row sanitizer) == "sanitizer | skipped"* ]] || problems+=("stage sanitizer: $(row sanitizer)")
((rc == 0)) || problems+=("gpu_session.sh exit status $rc (failed stages)")
grep -q "^wheels: installed .*pybind11" "$W/s/wheels.log" && grep -q "^wheels: installed .*pytest" "$W/s/wheels.log" \
  || problems+=("wheels: pybind11 and pytest were not installed from benchmarks/wheels")
grep -q "zokernels: compiled the CUDA extension" "$W/s/build.log" || problems+=("build: no CUDA extension compiled")
grep -q "plot skipped: matplotlib missing" "$W/s/bench.log" || problems+=("bench: no 'plot skipped' line")
ls "$W/s/bench/"*.json > /dev/null 2>&1 || problems+=("bench: no result JSON")
"$VENV/bin/python" - "$W/s/tests.xml" <<'EOF' || problems+=("tests: junit check failed (above)")
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
print(f"gpu-rehearsal: pytest -m gpu: {n['tests']} tests, {n['skipped']} skipped, {n['failures']} failed, "
      f"{n['errors']} errors")
# on CPU every GPU test skips (conftest); a test that ran and failed, or an error, is a regression
sys.exit(0 if n["tests"] > 0 and n["failures"] == 0 and n["errors"] == 0 and n["skipped"] == n["tests"] else 1)
EOF

# ---------------------------------------------------------------- the HF layer on the oldest supported transformers
# The image's transformers (5.17) is the oldest release zokernels.hf supports: its trainer and CLI-stage tests
# run here on CPU (pytest from the session's offline site; peft-only tests skip: the image has no peft).
if (cd "$W/tree" && env -u TRITON_INTERPRET -u ZOKERNELS_BACKEND PYTHONPATH="$W/tree/build/gpu-site:$W/tree" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_cli_stages.py > "$W/hf.log" 2>&1); then
  echo "gpu-rehearsal: transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)'):" \
    "$(grep -E '[0-9]+ passed' "$W/hf.log" | tail -n 1)"
else
  problems+=("tests/test_hf.py + test_cli_stages.py on the image's transformers: $(tail -n 15 "$W/hf.log")")
fi

cat "$W/out/summary.txt"
echo "gpu-rehearsal: $(($(date +%s) - T_START)) s in all (CPU)"
if ((${#problems[@]})); then
  printf 'gpu-rehearsal: FAILED: %s\n' "${problems[@]}"
  for log in "$W"/s/*.log; do echo "==== $(basename "$log") (last 40 lines)"; tail -n 40 "$log"; done
  exit 1
fi
echo "gpu-rehearsal: every CPU stage passed"
