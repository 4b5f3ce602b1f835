#!/usr/bin/env bash
# The GPU check for one lease of a CUDA machine without network (this workplace's nvidia-h200: one H200,
# 16 cores, its image's python3 with torch 2.11.0+cu130 on Python 3.12, nvcc 13.0), from the repository root.
#
# The call, through this workplace's device tool, after `bash bench/fetch_wheels.sh` here:
#
#   run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=450)
#
# The script keeps its own 420 s deadline (MIRAS_GPU_CHECK_S); timeout_s adds 30 s for the kill margins.
# Expected output: "=== STEP (timeout N s)" as each step starts, its log's last lines and "=== STEP: STATUS
# (S s)" as it ends, then the results table last: one row per step with its status, seconds, budget and what
# it found (toolchain facts; build: kernels, spills, OpenMP; smoke: op paths run and their distance from the
# CPU op; the benchmark's rows; test counts and the failing tests' names; the sanitizers' verdicts), then the
# benchmark table. After every step $OUT (where set) holds results.md (that table), results.json and
# logs.tar.gz (the results folder bench/results/<card>-<date>/ with every log; untar it into bench/results/
# and commit it). Exit status 0 when every step passed.
#
# Rerun on the same machine while it is warm (it stays warm 30 s after a call; a fresh machine has no state
# and runs everything, the build first, within the rerun's deadline):
#
#   run(command="MIRAS_GPU_RERUN=1 bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=270)
#
# skips every step that succeeded on the same sources (the build when miras_ext is installed with CUDA and
# csrc/, cmake/, python/ are unchanged; edited sources rebuild incrementally in build/) and reruns the rest
# within 240 s, adding to the same results folder.
#
#   bash bench/gpu_check.sh --plan       # the steps and their budgets, first call and rerun (no GPU needed)
#
# Steps, in order (each under its own timeout; a failing step does not stop the others, a failed build skips
# what needs it): facts, wheels, build, smoke, bench, tests, sanitizers (descriptions in describe() below).
# Budgets: each step's nominal seconds scale with the deadline, between a floor (below it a step is not
# worth starting) and twice the nominal. At run time a step's timeout is its budget's share of the time left
# (within the same bounds), so time saved early goes to all later steps and an overrun shrinks them.
#
# Environment: MIRAS_GPU_CHECK_S (deadline; default 420, rerun 240), MIRAS_GPU_STEPS (comma-separated step
# names, default all), MIRAS_GPU_RERUN=1, MIRAS_PYTHON (default python3), MIRAS_GPU_SANITIZERS (default
# "memcheck initcheck synccheck"; racecheck too if named), MIRAS_GPU_STATE (default build/gpu_check: the
# steps' state, the wheels' install folder), MIRAS_GPU_RESULTS (default bench/results/<card>-<date>).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

ALL_STEPS=(facts wheels build smoke bench tests sanitizers)
# Seconds per step at the 420 s deadline, and the least worth starting. facts and wheels import torch, which
# takes seconds on a fresh machine's cold disk cache.
declare -A NOMINAL=([facts]=15 [wheels]=15 [build]=145 [smoke]=30 [bench]=95 [tests]=62 [sanitizers]=53)
declare -A FLOOR=([facts]=5 [wheels]=5 [build]=90 [smoke]=15 [bench]=45 [tests]=30 [sanitizers]=25)
FINAL=5                # seconds kept for the results table and the tar at the end
FIRST_S=420 RERUN_S=240 MARGIN_S=30

describe() {
  case $1 in
    facts) echo "toolchain facts: python include dir and Python.h, torch, nvcc / gcc / cmake / ninja, OpenMP, GPU" ;;
    wheels) echo "FLA and missing pytest plugins from bench/wheels into \$MIRAS_GPU_STATE/site (--no-index)" ;;
    build) echo "pip install --no-build-isolation . with MIRAS_CUDA=ON, sm_90, -lineinfo; kernels, spills" ;;
    smoke) echo "bench/sanitizer_case.py --check-cpu: every op path once on CUDA, against the CPU op" ;;
    bench) echo "bench/gpu_bench.py --max-priority 1: GDN vs FLA at B8 T4K H16 D64 bf16, moneta vs SDPA" ;;
    tests) echo "pytest -m cuda with pytest-xdist and a per-test timeout; failing names listed" ;;
    sanitizers) echo "compute-sanitizer memcheck, initcheck, synccheck in parallel on six small cases" ;;
  esac
}

# --------------------------------------------------------------------------------------------- the plan

# plan DEADLINE STEP...: sets PLANNED (the steps that fit, in order) and BUDGET[step]. Each step gets its
# nominal seconds scaled to the deadline, within its floor and twice its nominal (fixed costs such as the
# facts do not grow with time); the steps held at a bound keep it and the others share the rest. When even
# the floors do not fit, the last steps are dropped (DROPPED).
declare -A BUDGET
plan() {
  local deadline=$1 s
  shift
  PLANNED=("$@")
  DROPPED=()
  while ((${#PLANNED[@]})); do
    local avail=$((deadline - FINAL)) fixed elastic changed=1 b
    declare -A held=()
    while ((changed)); do
      changed=0 fixed=0 elastic=0
      for s in "${PLANNED[@]}"; do
        if [[ -n ${held[$s]:-} ]]; then fixed=$((fixed + ${held[$s]})); else elastic=$((elastic + ${NOMINAL[$s]})); fi
      done
      for s in "${PLANNED[@]}"; do
        [[ -n ${held[$s]:-} ]] && continue
        b=$(((avail - fixed) * ${NOMINAL[$s]} / (elastic > 0 ? elastic : 1)))
        if ((b < ${FLOOR[$s]})); then
          held[$s]=${FLOOR[$s]} changed=1
        elif ((b > 2 * ${NOMINAL[$s]})); then
          held[$s]=$((2 * ${NOMINAL[$s]})) changed=1
        fi
        BUDGET[$s]=${held[$s]:-$b}
      done
    done
    unset held
    ((fixed <= avail)) && return 0
    DROPPED=("${PLANNED[-1]}" "${DROPPED[@]}")
    unset 'PLANNED[-1]'
  done
}

print_plan() {  # print_plan TITLE DEADLINE CALL STEP...
  local title=$1 deadline=$2 call=$3 s total=$FINAL
  shift 3
  plan "$deadline" "$@"
  echo "gpu_check plan: $title, deadline $deadline s"
  printf '  %-11s %6s %6s  %s\n' step budget floor what
  for s in "${PLANNED[@]}"; do
    printf '  %-11s %6d %6d  %s\n' "$s" "${BUDGET[$s]}" "${FLOOR[$s]}" "$(describe "$s")"
    total=$((total + ${BUDGET[$s]}))
  done
  printf '  %-11s %6d %6s  %s\n' final "$FINAL" "" "results table, tar of the logs"
  if ((${#DROPPED[@]})); then
    echo "  total $total of $deadline s: does not fit; dropped: ${DROPPED[*]}"
  elif ((total <= deadline)); then
    echo "  total $total of $deadline s: fits"
  else
    echo "  total $total of $deadline s: does not fit"
  fi
  echo "  call: $call"
}

selected_steps() {  # the steps MIRAS_GPU_STEPS names (default all), in the script's order
  local s want=",${MIRAS_GPU_STEPS:-$(IFS=,; echo "${ALL_STEPS[*]}")},"
  for s in "${ALL_STEPS[@]}"; do [[ $want == *",$s,"* ]] && echo "$s"; done
}

if [[ ${1:-} == --plan ]]; then
  mapfile -t sel < <(selected_steps)
  rerun_sel=()
  for s in "${sel[@]}"; do [[ $s == facts || $s == build ]] || rerun_sel+=("$s"); done
  print_plan "first call" "${MIRAS_GPU_CHECK_S:-$FIRST_S}" \
    "run(command=\"bash bench/gpu_check.sh\", carry=[\"bench/wheels\"], timeout_s=$((${MIRAS_GPU_CHECK_S:-$FIRST_S} + MARGIN_S)))" \
    "${sel[@]}"
  print_plan "rerun on the warm machine (MIRAS_GPU_RERUN=1; worst case: build present and unchanged, every step after it again)" \
    "$RERUN_S" "run(command=\"MIRAS_GPU_RERUN=1 bash bench/gpu_check.sh\", carry=[\"bench/wheels\"], timeout_s=$((RERUN_S + MARGIN_S)))" \
    "${rerun_sel[@]}"
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu_check.sh [--plan]" >&2
  exit 2
fi

# ----------------------------------------------------------------------------------------------- setup

RERUN=${MIRAS_GPU_RERUN:-0}
TOTAL=${MIRAS_GPU_CHECK_S:-$( ((RERUN)) && echo "$RERUN_S" || echo "$FIRST_S")}
START=$SECONDS
PY=$(command -v "${MIRAS_PYTHON:-python3}") || { echo "gpu_check: no ${MIRAS_PYTHON:-python3}" >&2; exit 2; }
[[ $PY == /* ]] || PY="$PWD/$PY"  # absolute (steps run from /tmp too), without resolving a virtualenv's link
STATE=${MIRAS_GPU_STATE:-build/gpu_check}
SITE=$STATE/site
mkdir -p "$SITE" || exit 2
STATE=$(cd "$STATE" && pwd) SITE=$(cd "$SITE" && pwd)
export PY STATE SITE PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# nvcc, compute-sanitizer and cuobjdump: on PATH, or in the usual CUDA folders.
for d in ${CUDA_HOME:+$CUDA_HOME/bin} /usr/local/cuda/bin /usr/local/cuda-*/bin; do
  if [[ -x $d/nvcc ]] && ! command -v nvcc >/dev/null; then PATH="$d:$PATH"; fi
done
export PATH

# fingerprint PATH...: one hash of the files' contents (no git needed: the device gets a copy of the tree),
# the results and the wheels left out.
fingerprint() {
  find "$@" -type f -not -path '*/__pycache__/*' -not -path 'bench/results/*' -not -path 'bench/wheels/*' -print0 \
    2>/dev/null | sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12
}
SRC_FP=$(fingerprint csrc cmake python CMakeLists.txt pyproject.toml)
ALL_FP=$(fingerprint csrc cmake python CMakeLists.txt pyproject.toml bench tests)

if ((!RERUN)); then rm -f "$STATE/steps.tsv" "$STATE/results_dir" "$STATE/calls"; fi
touch "$STATE/steps.tsv"
CALL=$(($(cat "$STATE/calls" 2>/dev/null || echo 0) + 1))
echo "$CALL" >"$STATE/calls"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [[ -n ${MIRAS_GPU_RESULTS:-} ]]; then
  RESULTS=$MIRAS_GPU_RESULTS
elif [[ -s $STATE/results_dir && -d $(cat "$STATE/results_dir") ]]; then
  RESULTS=$(cat "$STATE/results_dir")
else
  slug=$(printf '%s' "${card:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
  RESULTS="bench/results/${slug}-$(date -u +%Y-%m-%d)"
  n=2
  while [[ -e $RESULTS ]]; do RESULTS="bench/results/${slug}-$(date -u +%Y-%m-%d)-$n"; n=$((n + 1)); done
fi
mkdir -p "$RESULTS" || exit 2
echo "$RESULTS" >"$STATE/results_dir"
export RESULTS

# ----------------------------------------------------------------------------------------------- steps
# step_NAME runs the step (stdout and stderr go to $RESULTS/NAME.log); summary_NAME RC prints its one-line
# finding from the logs afterwards, also when the step timed out.

step_facts() {
  date -u
  echo "fact: machine: $(uname -m), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo)"
  if nvidia-smi; then
    echo "fact: gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
  else
    echo "fact: gpu: nvidia-smi failed or missing"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, os, sys, sysconfig
inc = sysconfig.get_paths()["include"]
print(f"fact: python: {sys.version.split()[0]}, Python.h {'present' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING'}"
      f" in {inc} ({sys.executable})")
try:
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"fact: torch: {torch.__version__}, CUDA {torch.version.cuda}, cxx11 abi "
          f"{int(torch.compiled_with_cxx11_abi())}, {dev}")
except Exception as exc:  # noqa: BLE001
    print(f"fact: torch: not importable ({type(exc).__name__}: {exc})")
found = []
for dist in ("pybind11", "scikit-build-core", "cmake", "ninja", "triton", "pytest", "pytest-xdist", "pytest-timeout",
             "fla-core"):
    try:
        found.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        found.append(f"{dist} -")
print("fact: packages: " + ", ".join(found))
EOF
  echo "fact: nvcc: $(nvcc --version 2>/dev/null | grep -oE 'release [0-9.]+, V[0-9.]+' || echo missing) ($(command -v nvcc))"
  echo "fact: gcc: $(g++ --version 2>/dev/null | head -n 1 || echo missing)"
  echo "fact: cmake: $(cmake --version 2>/dev/null | head -n 1 || echo missing); ninja $(ninja --version 2>/dev/null || echo missing)"
  local omp=/tmp/miras_omp_probe
  if printf '#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n' | g++ -fopenmp -x c++ - -o $omp 2>&1; then
    echo "fact: openmp: g++ -fopenmp builds and runs, $(OMP_DISPLAY_ENV=false $omp && echo ok)"
  else
    echo "fact: openmp: g++ -fopenmp FAILED"
  fi
  local san
  san=$(sanitizer_path)
  echo "fact: compute-sanitizer: ${san:-missing}${san:+, $("$san" --version 2>/dev/null | tail -n 1)}"
}
summary_facts() {
  grep -E '^fact: (gpu|python|torch|nvcc|gcc|openmp):' "$RESULTS/facts.log" | sed 's/^fact: //; s/ (\/[^)]*)$//' |
    cut -c1-150 | paste -sd';' - | sed 's/;/; /g'
}

step_wheels() {
  shopt -s nullglob
  local wheels=(bench/wheels/*.whl) missing=() w dist
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in bench/wheels/: run bash bench/fetch_wheels.sh where pip reaches PyPI and carry bench/wheels"
  fi
  for w in "${wheels[@]}"; do
    dist=$(basename "$w" | cut -d- -f1)
    if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
      echo "already there: $dist ($w not installed)"
    else
      missing+=("$w")
    fi
  done
  if ((${#missing[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${missing[@]}" ||
      return 1
  fi
  # Found, not imported: importing FLA imports torch, triton and transformers (seconds); the bench step does.
  (cd /tmp && "$PY" -c '
import importlib.metadata as md, importlib.util as u, sys
if u.find_spec("fla") is None:
    sys.exit(1)
print("fla-core", md.version("fla-core"), "installed")') ||
    { echo "FLA is not installed: its benchmark rows are skipped"; return 3; }
}
summary_wheels() {
  local log=$RESULTS/wheels.log
  local fla xdist timeout
  fla=$(grep -oE '^fla-core [^ ]+ installed' "$log" | tail -n 1)
  xdist=$("$PY" -c 'import importlib.metadata as m; print(m.version("pytest-xdist"))' 2>/dev/null || echo -)
  timeout=$("$PY" -c 'import importlib.metadata as m; print(m.version("pytest-timeout"))' 2>/dev/null || echo -)
  echo "${fla:-FLA not installed (FLA rows skipped)}; pytest-xdist $xdist, pytest-timeout $timeout$(
    grep -q '^no wheels' "$log" && echo '; bench/wheels was not carried')"
}

step_build() {
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
    -C cmake.define.MIRAS_CUDA=ON -C cmake.define.MIRAS_CUDA_ARCHS=90 -C cmake.define.CMAKE_CUDA_FLAGS=-lineinfo . ||
    return 1
  (cd /tmp && "$PY" -c '
import miras_ext
info = miras_ext.build_info()
print("build_info:", info)
assert "cuda" in info["backends"], "miras_ext was built without its CUDA backend"')
}
summary_build() {  # summary_build RC
  local log=$RESULTS/build.log kernels spills
  kernels=$(grep -cE "Compiling entry function" "$log")
  spills=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$log")
  echo "sm_90 -lineinfo: $kernels kernels compiled by ptxas in this call, $spills with spills;" \
    "OpenMP $(grep -qE 'Found OpenMP_CXX|Found OpenMP:' "$log" && echo found || echo 'not reported');" \
    "$(grep -oE "'backends': \[[^]]*\], 'cuda_archs': \[[^]]*\]" "$log" | tail -n 1)" \
    "$( (($1)) && grep -m1 -A2 -E 'CMake Error|error:|Error:' "$log" | tr -s ' \n' ' ' | cut -c1-200)"
}
build_present() {  # miras_ext is installed with CUDA and its sources are those of the last successful build
  [[ $(state_field build 2) == ok* && $(state_field build 5) == "$SRC_FP" ]] &&
    (cd /tmp && "$PY" -c 'import miras_ext, sys; sys.exit("cuda" not in miras_ext.build_info()["backends"])') 2>/dev/null
}

step_smoke() {
  "$PY" bench/sanitizer_case.py --check-cpu
}
summary_smoke() {
  { grep -E '^sanitizer_case: [0-9]+ of' "$RESULTS/smoke.log" || echo "no summary line: $(tail -n 1 "$RESULTS/smoke.log")"; } |
    tail -n 1 | sed 's/^sanitizer_case: //' | cut -c1-300
}

step_bench() {
  # FLA's first calls (Triton compile, autotune) fall outside --budget-s; --deadline-s bounds everything.
  local deadline=$((STEP_TIMEOUT - 8))
  "$PY" bench/gpu_bench.py --max-priority 1 --budget-s $((deadline / 2)) --deadline-s "$deadline" --case-s 0.5 \
    --out-dir "$RESULTS"
}
summary_bench() {
  if [[ -f $RESULTS/bench.json ]]; then
    "$PY" bench/gpu_check_results.py bench-summary "$RESULTS/bench.json"
  else
    echo "no bench.json: $(tail -n 1 "$RESULTS/bench.log" | cut -c1-160)"
  fi
}

step_tests() {
  local args=(-m cuda tests/cuda tests/test_bias_op.py tests/test_build.py -p no:cacheprovider -v -rfE)
  # A hung test is stopped at two thirds of the step's time, so the workers finish the others.
  local workers=$(($(nproc) / 2)) per_test=$((STEP_TIMEOUT * 2 / 3))
  ((workers > 8)) && workers=8
  if ! "$PY" -c 'import xdist' 2>/dev/null; then
    echo "pytest-xdist missing: the tests run one at a time"
  elif ((workers > 1)); then
    args+=(-n "$workers")
  fi
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout "$per_test")
  else
    echo "pytest-timeout missing: a test hung for $per_test s gets its traceback dumped, not stopped"
    args+=(-o "faulthandler_timeout=$per_test")
  fi
  echo "$PY -m pytest ${args[*]}"
  "$PY" -m pytest "${args[@]}"
  local rc=$?
  # Everything skipped (no device, a build without CUDA) is no result.
  if ! tail -n 1 "$RESULTS/tests.log" | grep -qE '[1-9][0-9]* passed'; then
    echo "gpu_check: no test passed"
    return 4
  fi
  return $rc
}
summary_tests() {
  local log=$RESULTS/tests.log last failed
  last=$(grep -E '^=+ .*([0-9]+ (passed|failed|skipped|errors?)|no tests ran).* in [0-9.]+s' "$log" | tail -n 1 | tr -d '=')
  if [[ -z $last ]]; then  # stopped from outside: count the per-test lines written so far
    last="stopped after $(grep -cE '(PASSED|FAILED|ERROR|SKIPPED)( +\[| tests/)' "$log") results:"
    last+=" $(grep -cE 'PASSED( +\[| tests/)' "$log") passed, $(grep -cE '(FAILED|ERROR)( +\[| tests/)' "$log") failed"
  fi
  failed=$(grep -E 'FAILED|ERROR' "$log" | grep -oE 'tests/[^ ]+::[^ ]+' | sort -u)
  echo "$(echo "$last" | sed 's/^ *//; s/ *$//')$([[ -n $failed ]] && echo "; failing ($(wc -l <<<"$failed")):" \
    "$(head -n 8 <<<"$failed" | sed 's/^tests\///' | paste -sd, - | sed 's/,/, /g')")"
}

sanitizer_path() {
  local c
  for c in "$(command -v compute-sanitizer)" /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer; do
    [[ -n $c && -x $c ]] && { echo "$c"; return; }
  done
}
step_sanitizers() {
  local san so tool filter=() pids=()
  san=$(sanitizer_path)
  if [[ -z $san ]]; then echo "compute-sanitizer not found"; return 3; fi
  so=$(cd /tmp && "$PY" -c 'import miras_ext._C as c; print(c.__file__)')
  if cuobjdump -sass "$so" 2>/dev/null | grep -oE 'Function : [^ ]+' | grep -q miras; then
    filter=(--kernel-name kns=miras)  # only miras_ext's kernels are instrumented: torch's run at full speed
  else
    echo "no kernel named *miras* found by cuobjdump in $so: checking every kernel (slower)"
  fi
  for tool in ${MIRAS_GPU_SANITIZERS:-memcheck initcheck synccheck}; do
    echo "$san --tool $tool --error-exitcode 1 ${filter[*]} $PY bench/sanitizer_case.py --cases sanitizer" \
      "> $RESULTS/sanitizer-$tool.log"
    # Without torch's caching allocator every tensor is its own allocation: an access past its end, or a read
    # of memory nothing wrote, is seen.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 $((STEP_TIMEOUT - 8)) "$san" --tool "$tool" --error-exitcode 1 \
      --print-limit 20 "${filter[@]}" "$PY" bench/sanitizer_case.py --cases sanitizer \
      >"$RESULTS/sanitizer-$tool.log" 2>&1 &
    pids+=($!)
  done
  local rc=0 p
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}
summary_sanitizers() {
  local tool log verdict out=()
  if grep -q '^compute-sanitizer not found' "$RESULTS/sanitizers.log" 2>/dev/null; then
    echo "compute-sanitizer not found"
    return
  fi
  for tool in ${MIRAS_GPU_SANITIZERS:-memcheck initcheck synccheck}; do
    log=$RESULTS/sanitizer-$tool.log
    if [[ ! -f $log ]]; then
      verdict="not run"
    elif grep -qiE 'device not supported|Unable to find injection|error 999' "$log"; then
      verdict="unsupported here ($(grep -m1 -iE 'not supported|injection|999' "$log" | cut -c1-80))"
    elif grep -qE '(ERROR|RACECHECK) SUMMARY' "$log"; then
      verdict=$(grep -oE '(ERROR|RACECHECK) SUMMARY: .*' "$log" | tail -n 1 | sed 's/.*SUMMARY: //')
      verdict+=", $(grep -oE '[0-9]+ of [0-9]+ cases ran.*' "$log" | tail -n 1)"
      local first
      first=$(grep -m1 -oE '(Invalid|Uninitialized|Barrier|Race|Misaligned|Out of bounds)[^.]*' "$log" | cut -c1-90)
      [[ -n $first ]] && verdict+=" (first: $first)"
    else
      verdict="no summary: $(tail -n 1 "$log" | cut -c1-80)"
    fi
    out+=("$tool: $verdict")
  done
  (IFS=';'; echo "${out[*]}") | sed 's/;/; /g'
}

export -f step_facts step_wheels step_build step_smoke step_bench step_tests step_sanitizers sanitizer_path

# ------------------------------------------------------------------------------------------ the runner

state_field() {  # state_field STEP N: field N of the step's row in steps.tsv
  awk -F'\t' -v s="$1" -v n="$2" '$1 == s {v = $n} END {print v}' "$STATE/steps.tsv"
}
record() {  # record STEP STATUS SECONDS BUDGET FINGERPRINT SUMMARY: the step's row (this call's number last),
  # replacing an earlier one
  awk -F'\t' -v s="$1" '$1 != s' "$STATE/steps.tsv" >"$STATE/steps.tsv.new"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(tr '\t\n' '  ' <<<"$6" | tr -s ' ' | sed 's/ *$//' | cut -c1-600)" "$CALL" \
    >>"$STATE/steps.tsv.new"
  mv "$STATE/steps.tsv.new" "$STATE/steps.tsv"
}
publish() {  # results.md and results.json in the results folder; with $OUT, those and a tar of the folder
  "$PY" bench/gpu_check_results.py publish "$STATE/steps.tsv" "$RESULTS" --card "${card:-unknown GPU}" \
    --mode "$( ((RERUN)) && echo "rerun (call $CALL)" || echo 'first call')" --deadline "$TOTAL" --elapsed $((SECONDS - START)) \
    --sources "$ALL_FP" --call "$CALL" --order "$(IFS=,; echo "${ALL_STEPS[*]}")" >/dev/null || echo "gpu_check: writing the results table failed"
  if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    cp "$RESULTS/results.md" "$RESULTS/results.json" "$OUT/" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  fi
}

FAILED=0
run_step() {  # run_step NAME: under its share of the time left, then its row, then publish
  local name=$1 fp=$ALL_FP
  [[ $name == build ]] && fp=$SRC_FP
  local left=$((START + TOTAL - SECONDS - FINAL)) rest=0 s
  for s in "${REMAINING[@]}"; do rest=$((rest + ${BUDGET[$s]})); done
  REMAINING=("${REMAINING[@]:1}")
  local t=$((left * ${BUDGET[$name]} / (rest > 0 ? rest : 1)))
  ((t > 2 * ${NOMINAL[$name]})) && t=$((2 * ${NOMINAL[$name]}))
  ((t < ${FLOOR[$name]})) && t=${FLOOR[$name]}
  if ((left < ${FLOOR[$name]})); then
    echo "=== $name: skipped, $left s left (its floor: ${FLOOR[$name]} s)"
    record "$name" "skipped: no time left" 0 "${BUDGET[$name]}" "$fp" "$left s left before the deadline"
    FAILED=1
    publish
    return 1
  fi
  ((t > left)) && t=$left
  echo "=== $name (timeout $t s; planned ${BUDGET[$name]} s)" | tee -a "$RESULTS/$name.log"
  local t0=$SECONDS rc before
  before=$(wc -l <"$RESULTS/$name.log")
  STEP_TIMEOUT=$t timeout -k 5 "$t" bash -c "step_$name" >>"$RESULTS/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status=ok
  if ((rc == 124 || rc == 137)); then
    status="timed out after $t s"
  elif ((rc != 0)); then
    status="failed (exit $rc)"
  fi
  ((rc != 0)) && FAILED=1
  tail -n "+$((before + 1))" "$RESULTS/$name.log" | tail -n 4 | cut -c1-160 | sed 's/^/    /'
  echo "=== $name: $status ($took s)"
  record "$name" "$status" "$took" "$t" "$fp" "$("summary_$name" "$rc" 2>&1)"
  publish
  return "$rc"
}

mapfile -t SELECTED < <(selected_steps)
TODO=()
for s in "${SELECTED[@]}"; do
  if ((RERUN)); then
    if [[ $s == build ]] && build_present; then
      echo "=== build: skipped, present and unchanged (sources $SRC_FP)"
      continue
    elif [[ $s != build && $(state_field "$s" 2) == ok* && $(state_field "$s" 5) == "$ALL_FP" ]]; then
      echo "=== $s: skipped, succeeded on an earlier call with the same sources"
      continue
    fi
  fi
  TODO+=("$s")
done
plan "$TOTAL" "${TODO[@]}"
for s in "${DROPPED[@]}"; do
  record "$s" "skipped: no time in the plan" 0 0 "-" "the ${TOTAL} s deadline holds only the steps before it"
  FAILED=1
done
echo "gpu_check: ${card:-no GPU found}; results in $RESULTS; deadline $TOTAL s; $( ((RERUN)) && echo rerun || echo 'first call');" \
  "steps: ${PLANNED[*]:-none}"
REMAINING=("${PLANNED[@]}")
build_ok=1
for s in "${PLANNED[@]}"; do
  if ((!build_ok)) && [[ $s == smoke || $s == bench || $s == tests || $s == sanitizers ]]; then
    REMAINING=("${REMAINING[@]:1}")
    record "$s" "skipped: build failed" 0 "${BUDGET[$s]}" "-" "needs the CUDA build"
    FAILED=1
    continue
  fi
  run_step "$s"
  rc=$?
  [[ $s == build ]] && ((rc != 0)) && build_ok=0
done
publish
echo
cat "$RESULTS/results.md"
if ((FAILED)); then
  echo "gpu_check: some steps failed or were skipped; results in $RESULTS"
  exit 1
fi
echo "gpu_check: every step passed; results in $RESULTS"
