#!/usr/bin/env bash
# The GPU check, for a CUDA machine without network (one H100, 16 cores), run from the repository root:
#
#   bash bench/gpu_check.sh
#
# within about 8 minutes (MIRAS_GPU_CHECK_S, default 450 s, is the deadline of the whole script):
#   1. prints nvidia-smi;
#   2. builds miras_ext in place with its CUDA backend for sm_90 (pip install --no-build-isolation, MIRAS_CUDA=ON,
#      MIRAS_CUDA_ARCHS=90) into the interpreter that holds the CUDA torch (MIRAS_PYTHON, default python3);
#   3. installs flash-linear-attention from the wheels in bench/wheels/ (bench/fetch_wheels.sh downloads them on a
#      machine with network; pip install --no-index --no-deps);
#   4. runs the CUDA tests against the CPU op: pytest -m cuda tests/cuda tests/test_bias_op.py;
#   5. runs compute-sanitizer memcheck and racecheck on bench/sanitizer_case.py (one small forward + backward per
#      kernel path), restricted to miras_ext's kernels;
#   6. runs bench/gpu_bench.py with the time that is left as its budget.
# Everything goes to bench/results/<card>-<date>/: summary.md (the steps, nvidia-smi, the versions),
# setup.log, build.log, pytest.log, sanitizer.log, bench.log, and the results table bench.md with bench.json.
#
# Each step runs under its own timeout: its cap below, shortened so that the steps after it keep their minimum.
# A failing step does not stop the next ones (a failed build skips what needs it); the script exits non-zero
# if any step failed or was skipped, after printing the summary and the results table.
#
# Through this workplace's device tool: first `bash bench/fetch_wheels.sh` here (bench/wheels/ is gitignored, so
# it travels only when carried), then run(command="bash bench/gpu_check.sh", carry=["bench/wheels"],
# timeout_s=540). With $OUT set the results folder is also copied there (8 files), so that it comes back;
# commit it under bench/results/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY=${MIRAS_PYTHON:-python3}
TOTAL=${MIRAS_GPU_CHECK_S:-450}
START=$SECONDS
export PY PYTHONUNBUFFERED=1

# nvcc and compute-sanitizer: on PATH, or in the usual CUDA folders.
for d in ${CUDA_HOME:+$CUDA_HOME/bin} /usr/local/cuda/bin /usr/local/cuda-*/bin; do
  if [[ -x $d/nvcc ]] && ! command -v nvcc >/dev/null; then PATH="$d:$PATH"; fi
done
export PATH

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${card:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
RESULTS="bench/results/${slug}-$(date -u +%Y-%m-%d)"
n=2
while [[ -e $RESULTS ]]; do RESULTS="bench/results/${slug}-$(date -u +%Y-%m-%d)-$n"; n=$((n + 1)); done
mkdir -p "$RESULTS"
export RESULTS

ROWS=()      # "| step | status | seconds | log |" lines for the summary
FAILED=0

# step NAME CAP RESERVE LOG FUNCTION: runs FUNCTION under `timeout`, at most CAP seconds and at most what is left
# before the deadline minus RESERVE (the minimum the later steps keep). The function sees STEP_TIMEOUT.
step() {
  local name=$1 cap=$2 reserve=$3 log=$4 fn=$5
  local left=$((START + TOTAL - SECONDS))
  local t=$((left - reserve))
  ((t > cap)) && t=$cap
  if ((t < 10)); then
    echo "=== $name: skipped, ${left} s left before the deadline" | tee -a "$RESULTS/$log"
    ROWS+=("| $name | skipped: no time left | 0 | $log |")
    FAILED=1
    return 1
  fi
  echo "=== $name (timeout ${t} s)" | tee -a "$RESULTS/$log"
  local s=$SECONDS rc before
  before=$(wc -l <"$RESULTS/$log")
  STEP_TIMEOUT=$t timeout -k 10 "$t" bash -c "$fn" >>"$RESULTS/$log" 2>&1
  rc=$?
  local took=$((SECONDS - s)) status="ok"
  if ((rc == 124 || rc == 137)); then
    status="timed out after ${t} s"
  elif ((rc != 0)); then
    status="failed (exit $rc)"
  fi
  ((rc != 0)) && FAILED=1
  tail -n "+$((before + 1))" "$RESULTS/$log" | tail -n 6 | sed 's/^/    /'
  echo "=== $name: $status (${took} s)"
  ROWS+=("| $name | $status | $took | $log |")
  return "$rc"
}

skip() {  # skip NAME LOG WHY
  echo "=== $1: skipped ($3)" | tee -a "$RESULTS/$2"
  ROWS+=("| $1 | skipped: $3 | 0 | $2 |")
  FAILED=1
}

setup_env() {
  date -u
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  echo "python: $(command -v "$PY")"
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
            "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  echo "nvcc: $(command -v nvcc || echo missing)"; nvcc --version 2>/dev/null | tail -n 2
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git metadata')"
  git status --short 2>/dev/null | head -n 20
}

build_ext() {
  MIRAS_CUDA=ON MIRAS_CUDA_ARCHS=90 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
    -C cmake.define.MIRAS_CUDA=ON -C cmake.define.MIRAS_CUDA_ARCHS=90 . || return 1
  echo "--- ptxas: kernels compiled / with spills"
  grep -cE "Compiling entry function" "$RESULTS/build.log" || true
  grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$RESULTS/build.log" | sort | uniq -c || true
  (cd /tmp && "$PY" -c '
import miras_ext
info = miras_ext.build_info()
print(info)
assert "cuda" in info["backends"], "miras_ext was built without its CUDA backend"
')
}

install_fla() {
  shopt -s nullglob
  local wheels=(bench/wheels/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in bench/wheels/: run bash bench/fetch_wheels.sh on a machine with network and carry bench/wheels"
    return 3
  fi
  "$PY" -m pip install --no-index --no-deps "${wheels[@]}" || return 1
  (cd /tmp && "$PY" -c 'import fla, fla.ops.gated_delta_rule as g; print("fla", fla.__version__, g.chunk_gated_delta_rule)')
}

run_pytest() {
  "$PY" -m pytest -q -m cuda -rfEs -p no:cacheprovider tests/cuda tests/test_bias_op.py
}

sanitizer() {  # sanitizer TOOL
  local san c
  san=$(command -v compute-sanitizer)
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
    [[ -z $san && -x $c ]] && san=$c
  done
  if [[ -z $san ]]; then echo "compute-sanitizer not found"; return 3; fi
  local so filter=()
  so=$(cd /tmp && "$PY" -c 'import miras_ext._C as c; print(c.__file__)')
  if cuobjdump -sass "$so" 2>/dev/null | grep -oE 'Function : [^ ]+' | sed 's/Function : //' | sort -u >/tmp/miras_kernels.txt \
     && grep -q miras /tmp/miras_kernels.txt; then
    echo "kernels in $so: $(wc -l </tmp/miras_kernels.txt), with 'miras' in the name: $(grep -c miras /tmp/miras_kernels.txt)"
    filter=(--kernel-name kns=miras)
  else
    echo "no kernel named *miras* found by cuobjdump in $so: checking every kernel (slower)"
  fi
  echo "$san --tool $1 ${filter[*]}"
  if [[ $1 == memcheck ]]; then
    # Without torch's caching allocator every tensor is its own allocation, so an access past its end is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 --print-limit 20 "${filter[@]}" \
      "$PY" bench/sanitizer_case.py
  else
    "$san" --tool racecheck --error-exitcode 1 --print-limit 20 "${filter[@]}" "$PY" bench/sanitizer_case.py
  fi
}

run_bench() {
  local budget=$((STEP_TIMEOUT - 45))
  ((budget < 15)) && budget=15
  "$PY" bench/gpu_bench.py --budget-s "$budget" --out-dir "$RESULTS"
}

export -f setup_env build_ext install_fla run_pytest sanitizer run_bench

nvidia-smi || echo "nvidia-smi failed"
echo "results: $RESULTS; deadline ${TOTAL} s"
#    name              cap  reserve (minimum of the steps after it)  log
step "environment"      20    0 setup.log     setup_env
if step "build"        240  190 build.log     build_ext; then
  step "install FLA"    30  160 setup.log     install_fla
  step "pytest (CUDA)" 110  120 pytest.log    run_pytest
  step "memcheck"       75   90 sanitizer.log "sanitizer memcheck"
  step "racecheck"      75   60 sanitizer.log "sanitizer racecheck"
  step "bench"         200    0 bench.log     run_bench
else
  for s in "install FLA:setup.log" "pytest (CUDA):pytest.log" "memcheck:sanitizer.log" "racecheck:sanitizer.log" \
           "bench:bench.log"; do
    skip "${s%%:*}" "${s##*:}" "build failed"
  done
fi

{
  echo "# GPU check: ${card:-unknown GPU}, $(date -u +%Y-%m-%d)"
  echo
  echo "bash bench/gpu_check.sh, $((SECONDS - START)) s of a ${TOTAL} s deadline; git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  grep -E "^torch |^triton |^fla " "$RESULTS/setup.log" 2>/dev/null
  grep -E "[0-9]+ (passed|failed|skipped|errors?)|no tests ran" "$RESULTS/pytest.log" 2>/dev/null | tail -n 1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases ran" "$RESULTS/sanitizer.log" 2>/dev/null
  echo '```'
} >"$RESULTS/summary.md"

echo
cat "$RESULTS/summary.md"
if [[ -f $RESULTS/bench.md ]]; then
  echo
  cat "$RESULTS/bench.md"
fi
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp -r "$RESULTS" "$OUT/" && echo "copied $RESULTS to \$OUT/$(basename "$RESULTS")"
fi
if ((FAILED)); then
  echo "gpu_check: some steps failed or were skipped (see above); results in $RESULTS"
  exit 1
fi
echo "gpu_check: all steps passed; results in $RESULTS"
