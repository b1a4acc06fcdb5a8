#!/usr/bin/env bash
# One GPU check, end to end, within ~8 minutes: build with CUDA, CUDA + native Triton tests,
# GPU benchmarks (fused update GB/s, sampler providers on the 35M UNet), then a short table.
#
# Usage: benchmarks/device_check.sh [--dry-run] [OUTDIR]        (OUTDIR default: device_check_out)
#
# Made for a GPU machine with no network and no project venv: it uses the machine's python3
# (override with PYTHON=...), builds cpsample_fast._C in place with CPSAMPLE_BUILD_CUDA=1, and
# never installs anything. Every stage is time-boxed with `timeout`; a failing stage is recorded
# and the next one still runs. Whatever happens, OUTDIR ends with at most 7 files:
#   device_check.log   every stage's full output        stages.tsv   stage, status, rc, seconds
#   bench.csv          benchmark rows (STYLE.md §7)      bench_*.json  one per benchmark run
#   status.json        stages + machine inventory        summary.txt  the table printed last
#
# --dry-run runs the same stages on the CPU with tiny sizes (no CUDA build: an import check of
# the existing extension instead; Triton through its interpreter), to exercise the script here.
#
# Environment: CPSAMPLE_CHECK_BUDGET_S (total seconds, default 470), CPSAMPLE_CUDA_ARCHS
# (default 90: H100/H200 only, half the nvcc time of "80;90"), CPSAMPLE_CHECK_STEPS (DDIM steps
# of the sampler benchmark, default 10), PYTHON.
set -u -o pipefail

DRY=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET="${CPSAMPLE_CHECK_BUDGET_S:-470}"
RESERVE=25  # seconds kept for the summary stage
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

# run_stage NAME LIMIT_S NOTE CMD...: time-boxed, logged, recorded; never aborts the script.
run_stage() {
  local name="$1" limit="$2" note="$3"
  shift 3
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  if (( left < 10 )); then
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
  timeout -k 10 "$limit" "$@" > "$STAGE_OUT" 2>&1
  rc=$?
  cat "$STAGE_OUT" >> "$LOG"
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  # pytest's last line (counts of passed / skipped) is the most useful note of a test stage
  if [[ "$name" == *-tests ]]; then
    local tail_note
    tail_note="$(grep -E '(passed|failed|skipped|error|no tests ran)' "$STAGE_OUT" | tail -n 1 | tr '\t' ' ' | cut -c1-120)"
    [ -n "$tail_note" ] && note="$note; $tail_note"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >> "$STAGES"
  echo "[$(elapsed)s] $name: $status (rc=$rc, $(( $(date +%s) - t0 ))s)"
  if [ "$status" != ok ]; then
    tail -n 15 "$STAGE_OUT" | sed 's/^/    | /'
  fi
  return 0
}

# pytest without the project's addopts (they need pytest-benchmark, which may be missing);
# a test file that cannot be imported there (diffusers) must not stop the others
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra --continue-on-collection-errors)

run_stage preflight 30 "python, modules, GPU" "$PY" benchmarks/device_check_report.py preflight "$OUTDIR"

if [ "$DRY" = 1 ]; then
  run_stage build 60 "dry-run: import check of the existing extension, no rebuild" \
    "$PY" -c "from cpsample_fast.ops import _ext; print('build_info', _ext.build_info(), 'error', _ext.load_error())"
else
  run_stage build 170 "CUDA build in place (archs ${CPSAMPLE_CUDA_ARCHS:-90})" \
    env CPSAMPLE_BUILD_CUDA=1 CPSAMPLE_CUDA_ARCHS="${CPSAMPLE_CUDA_ARCHS:-90}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" setup.py build_ext --inplace
  run_stage ext-check 30 "_C loads with its CUDA kernels" \
    "$PY" -c "from cpsample_fast.ops import _ext; i = _ext.build_info(); print(i, _ext.load_error()); assert i and i.get('cuda'), 'no CUDA kernels in _C'"
fi

if [ "$DRY" = 1 ]; then
  run_stage cuda-tests 120 "pytest -m cuda (all skip without a GPU)" "${PYTEST[@]}" -m cuda tests/test_ops.py tests/test_ext.py tests/test_noise.py
  run_stage triton-tests 90 "Triton kernels through the interpreter" "${PYTEST[@]}" -x tests/test_triton_kernels.py -k "not cuda"
  run_stage bench-update 60 "fused update, tiny sizes" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite update --sizes 1e4 --out "$OUTDIR"
  run_stage bench-sampler 120 "tiny config, eager providers" \
    "$PY" -m cpsample_fast bench --device cpu --quick --suite sampler --out "$OUTDIR"
else
  run_stage cuda-tests 100 "pytest -m cuda, TRITON_INTERPRET=0" "${PYTEST[@]}" -m cuda tests
  run_stage triton-tests 60 "Triton tests natively (TRITON_INTERPRET=0)" "${PYTEST[@]}" -k "triton" tests/test_triton_kernels.py tests/test_ops.py
  run_stage bench-update 60 "fused update 1e5..1e8 per backend vs copy" \
    "$PY" -m cpsample_fast bench --device cuda --config gpu35m --suite update --repeats 5 --out "$OUTDIR"
  # Whatever time is left; rows are flushed per provider, so a cut-short run keeps the earlier
  # ones. Each compiled provider costs a compilation (~1-2 min): the GPU headline ones go first.
  run_stage bench-sampler 400 "35M UNet, batch 64, ${STEPS} steps, all providers" \
    "$PY" -m cpsample_fast bench --device cuda --config gpu35m --suite sampler --steps "$STEPS" \
    --repeats 3 --out "$OUTDIR" --providers reference reference+bf16 ddim fused \
    fused+compile+bf16 fused+cudagraph fused+compile
fi

echo "[$(elapsed)s] summary"
"$PY" benchmarks/device_check_report.py summary "$OUTDIR" 2>&1 | tee -a "$LOG"
echo "results in $OUTDIR ($(elapsed)s)"
