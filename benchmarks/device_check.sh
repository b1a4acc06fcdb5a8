#!/usr/bin/env bash
# One GPU check, end to end, inside one 10-minute call with time to spare (budget 480 s): build
# with CUDA, CUDA + native Triton tests, GPU benchmarks (fused update GB/s, sampler providers on
# the 35M UNet, the compiled ones last), then a short table.
#
# Usage: benchmarks/device_check.sh [--dry-run] [--plan] [OUTDIR]   (OUTDIR: device_check_out)
#
# Made for a GPU machine with no network and no project venv: it uses the machine's python3
# (override with PYTHON=...), builds cpsample_fast._C in place with CPSAMPLE_BUILD_CUDA=1, and
# never installs anything. Every stage has a fixed time limit and the limits of all stages plus
# the summary's reserve add up to at most the budget (checked before anything runs; --plan prints
# the plan and exits). A failing stage is recorded and the next one still runs. Benchmark rows
# reach bench.csv as each provider is measured; a test stage runs pytest -v, so one killed by
# its limit still names the test it was in. OUTDIR ends with at most 7 files:
#   device_check.log   every stage's full output        stages.tsv   stage, status, rc, seconds
#   bench.csv          benchmark rows (benchmarks/README.md) bench_*.json  one per benchmark run
#   status.json        stages + machine inventory        summary.txt  the table printed last
#
# --dry-run runs the same stages on the CPU with tiny sizes (no CUDA build: an import check of
# the existing extension instead; Triton through its interpreter), to exercise the script here.
#
# Environment: CPSAMPLE_CHECK_BUDGET_S (total seconds, default 480), CPSAMPLE_CUDA_ARCHS
# (default 90: H100/H200 only, half the nvcc time of "80;90"), CPSAMPLE_CHECK_STEPS (DDIM steps
# of the sampler benchmark, default 10), PYTHON.
set -u -o pipefail

DRY=0
PLAN_ONLY=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET="${CPSAMPLE_CHECK_BUDGET_S:-480}"
RESERVE=20  # seconds kept for the summary stage
STEPS="${CPSAMPLE_CHECK_STEPS:-10}"
START=$(date +%s)
OUTDIR="${OUTDIR:-device_check_out}"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/device_check.log"
STAGES="$OUTDIR/stages.tsv"
STAGE_OUT="$(mktemp "${TMPDIR:-/tmp}/device_check_stage.XXXXXX")"
trap 'rm -f "$STAGE_OUT"' EXIT
: > "$LOG"
printf 'stage\tstatus\trc\tseconds\tlimit_s\tnote\n' > "$STAGES"

# The package imports from the checkout; Triton must run natively (tests/conftest.py would
# otherwise switch on its interpreter); compiled-kernel caches stay on local disk.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/cpsample_inductor_cache}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DEVICE=cpu
else
  export TRITON_INTERPRET=0
  DEVICE=cuda
fi

elapsed() { echo $(( $(date +%s) - START )); }

# The stage plan: name and time limit (seconds). Together with RESERVE they must fit the budget.
# GPU (one H200, measured nowhere yet, so generous where a hang would cost little):
#   build: nvcc for one arch + the torch binding with 16 jobs; cuda-tests: ~15 tests, the first
#   Triton launches compile; bench-sampler-eager: four eager providers and a float64 baseline of
#   4 samples; bench-matched: the demo's tiny digits UNet, protected DDIM-50 vs the quality-matched
#   DPM-Solver++ (issue 10's GPU ratio), seconds; bench-sampler-compiled: each torch.compile of the 35M step is ~1 min, so it goes
#   last and keeps whatever rows it finished.
if [ "$DRY" = 1 ]; then
  PLAN=(preflight:20 build:20 cuda-tests:40 triton-tests:70 bench-update:40 bench-sampler-eager:90 bench-matched:30 bench-sampler-compiled:150)
else
  PLAN=(preflight:20 build:140 ext-check:15 cuda-tests:50 triton-tests:40 bench-update:35 bench-sampler-eager:50 bench-matched:20 bench-sampler-compiled:90)
fi
declare -A LIMIT
TOTAL=$RESERVE
for entry in "${PLAN[@]}"; do
  LIMIT[${entry%%:*}]=${entry##*:}
  TOTAL=$(( TOTAL + ${entry##*:} ))
done

print_plan() {
  local t=0 name lim
  printf '%-24s %7s %9s\n' "stage" "limit_s" "ends_by_s"
  for entry in "${PLAN[@]}"; do
    name=${entry%%:*}; lim=${entry##*:}; t=$(( t + lim ))
    printf '%-24s %7s %9s\n' "$name" "$lim" "$t"
  done
  printf '%-24s %7s %9s\n' "summary (reserve)" "$RESERVE" "$(( t + RESERVE ))"
  printf 'total %ss of a %ss budget (%s)\n' "$TOTAL" "$BUDGET" "$([ "$TOTAL" -le "$BUDGET" ] && echo fits || echo DOES NOT FIT)"
}

print_plan
if (( TOTAL > BUDGET )); then
  echo "device_check.sh: the stage limits ($TOTAL s) exceed the budget ($BUDGET s)" >&2
  exit 2
fi
[ "$PLAN_ONLY" = 1 ] && exit 0

# run_stage NAME NOTE CMD...: time-boxed by the plan, logged, recorded; never aborts the script.
# Tests get SIGINT first (pytest then prints where it stopped), SIGKILL 5 s later.
run_stage() {
  local name="$1" note="$2"
  shift 2
  local limit="${LIMIT[$name]}"
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  if (( left < 5 )); then
    printf '%s\tskipped\t-\t0\t%s\t%s\n' "$name" "$limit" "no time left in the budget" >> "$STAGES"
    echo "[$(elapsed)s] $name: skipped (budget spent)"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "[$(elapsed)s] $name: running (limit ${limit}s)"
  {
    echo "================ $name (limit ${limit}s) $(date -u +%FT%TZ)"
    echo "\$ $*"
  } >> "$LOG"
  local t0 rc status
  t0=$(date +%s)
  timeout -s INT -k 5 "$limit" "$@" > "$STAGE_OUT" 2>&1
  rc=$?
  cat "$STAGE_OUT" >> "$LOG"
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  if [[ "$name" == *-tests ]]; then
    local tail_note last_test
    # pytest's last line (counts of passed / skipped) is the most useful note of a test stage
    tail_note="$(grep -E '(passed|failed|skipped|error|no tests ran)' "$STAGE_OUT" | tail -n 1 | tr '\t' ' ' | cut -c1-120)"
    [ -n "$tail_note" ] && note="$note; $tail_note"
    if [ "$status" = timeout ]; then
      # -v prints each test id as it starts: the last one is where the limit struck
      last_test="$(grep -oE '[^ ]+\.py::[^ ]+' "$STAGE_OUT" | tail -n 1)"
      note="$note; killed in ${last_test:-<before the first test>}"
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >> "$STAGES"
  echo "[$(elapsed)s] $name: $status (rc=$rc, $(( $(date +%s) - t0 ))s)"
  if [ "$status" != ok ]; then
    tail -n 15 "$STAGE_OUT" | sed 's/^/    | /'
  fi
  return 0
}

# pytest without the project's addopts (they need pytest-benchmark, which may be missing), -v so
# that each test id is printed as it starts; a test file that cannot be imported there
# (diffusers) must not stop the others
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -o addopts=-ra --continue-on-collection-errors)
EAGER=(reference reference+bf16 ddim fused)
# the GPU headline first: a stage cut short keeps the rows of the providers it finished
COMPILED=(reference reference+bf16 fused+compile+bf16 fused+cudagraph fused+compile)

run_stage preflight "python, modules, GPU" "$PY" benchmarks/device_check_report.py preflight "$OUTDIR"

if [ "$DRY" = 1 ]; then
  run_stage build "dry-run: import check of the existing extension, no rebuild" \
    "$PY" -c "from cpsample_fast.ops import _ext; print('build_info', _ext.build_info(), 'error', _ext.load_error())"
  run_stage cuda-tests "pytest -m cuda (all skip without a GPU)" "${PYTEST[@]}" -m cuda tests/test_ops.py tests/test_ext.py tests/test_noise.py tests/test_triton_kernels.py
  run_stage triton-tests "Triton kernels through the interpreter" "${PYTEST[@]}" tests/test_triton_kernels.py -k "not cuda"
  run_stage bench-update "fused update, tiny sizes" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite update --sizes 1e4 --out "$OUTDIR"
  run_stage bench-sampler-eager "tiny config, eager providers" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite sampler --accuracy-batch 2 \
    --out "$OUTDIR" --providers "${EAGER[@]}"
  run_stage bench-matched "quality-matched DDIM-50 vs DPM-Solver++, batch 8" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite matched --repeats 1 --warmup 0 \
    --out "$OUTDIR"
  run_stage bench-sampler-compiled "tiny config, compiled provider" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite sampler --accuracy-batch 2 \
    --steps 2 --repeats 1 --out "$OUTDIR" --providers reference fused+compile
else
  run_stage build "CUDA build in place (archs ${CPSAMPLE_CUDA_ARCHS:-90})" \
    env CPSAMPLE_BUILD_CUDA=1 CPSAMPLE_CUDA_ARCHS="${CPSAMPLE_CUDA_ARCHS:-90}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" setup.py build_ext --inplace
  run_stage ext-check "_C loads with its CUDA kernels for this GPU" \
    "$PY" -c "from cpsample_fast.ops import _ext, available_backends; i = _ext.build_info(); print(i, _ext.load_error(), available_backends('cuda')); assert i and i.get('cuda'), 'no CUDA kernels in _C'; assert 'cuda' in available_backends('cuda'), 'the built archs do not cover this GPU'"
  run_stage cuda-tests "pytest -m cuda, TRITON_INTERPRET=0" "${PYTEST[@]}" -m cuda tests
  run_stage triton-tests "Triton tests natively (TRITON_INTERPRET=0)" "${PYTEST[@]}" -k "triton" tests/test_triton_kernels.py tests/test_ops.py
  run_stage bench-update "fused update 1e5..1e8 per backend vs copy, checked against torch" \
    "$PY" -m cpsample_fast bench --device cuda --config gpu35m --suite update --repeats 5 --out "$OUTDIR"
  # float64 baseline on 4 samples only: on the 35M UNet the whole batch would eat the stage
  run_stage bench-sampler-eager "35M UNet, batch 64, ${STEPS} steps, eager providers" \
    "$PY" -m cpsample_fast bench --device cuda --config gpu35m --suite sampler --steps "$STEPS" \
    --repeats 3 --accuracy-batch 4 --out "$OUTDIR" --providers "${EAGER[@]}"
  run_stage bench-matched "digits UNet: DDIM-50 vs quality-matched DPM-Solver++, batch 128" \
    "$PY" -m cpsample_fast bench --device cuda --suite matched --repeats 3 --out "$OUTDIR"
  run_stage bench-sampler-compiled "35M UNet, compiled providers (rows kept as measured)" \
    "$PY" -m cpsample_fast bench --device cuda --config gpu35m --suite sampler --steps "$STEPS" \
    --repeats 3 --accuracy-batch 4 --out "$OUTDIR" --providers "${COMPILED[@]}"
fi

echo "[$(elapsed)s] summary"
"$PY" benchmarks/device_check_report.py summary "$OUTDIR" 2>&1 | tee -a "$LOG"
echo "results in $OUTDIR ($(elapsed)s)"
