#!/usr/bin/env bash
# The GPU check: one command, offline, in at most ~9 minutes on one GPU (stages in
# experiments/gpu_check.py). Nothing is installed: it runs the machine's own python3 and
# packages with this checkout on PYTHONPATH.
#
#   1. preflight (< 1 min): versions, JAX sees the GPU, one jitted train step of each
#      variant, an orbax round trip. On failure it stops here (exit 1) with one line naming
#      the stage, the package versions and the place it broke: fix, then run again.
#   2. the fast test subset on the GPU;
#   3. train steps, ours vs PyTorch on the same GPU (ResNet-20 and ResNet-18), and the
#      seed-parallel step per replica;
#   4. gpu-cifar10-resnet20, baseline vs GCGD at budgets 1.0 and 0.8, 8 seeds per arm
#      trained in parallel: the suite run by its own runner (experiments.suites.compare,
#      --seed-parallel), with train.total_steps chosen from step costs measured first to fit
#      the time left (reported as shortened when under He et al.'s 64k steps) and the
#      suite's report (RESULTS.md) rebuilt after every arm.
#
# Data: CIFAR-10's JPEG copy in an ignored folder of the checkout, prepared once with
#
#   mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/
#
# and carried to the device machine (carry: [".gpu_data"]). Everything goes to $OUT (the
# device tool's results folder) or experiments/results/gpu_check/: 8 files (gpu_check.log,
# preflight.json, tests.txt, bench.json, bench.md, main.json, main.md = the suite's
# RESULTS.md, main.tar.gz); the device tool brings back at most 8 files, 2 folders down, so
# under $OUT the suite's folder (runs/<method>/b<budget>/s<seed>/, RESULTS.md, plots) is
# written outside it and travels as main.tar.gz (unpack it into
# experiments/results/gpu_check/); without $OUT it is experiments/results/gpu_check/
# gpu-cifar10-resnet20/ itself.
#
#   bash experiments/gpu_check.sh             # on the GPU machine
#   bash experiments/gpu_check.sh --dry-run   # the same code on the CPU, tiny (~2-4 min)
#
# Settings (environment): GCGD_PYTHON (default python3), GCGD_GPU_BUDGET_S (seconds for the
# whole command, default 540), GCGD_DATA_DIR (default .gpu_data), GCGD_COMMIT (recorded in
# the results when the checkout has no .git), JAX_COMPILATION_CACHE_DIR (default
# $TMPDIR/gcgd_jax_xla_cache), GCGD_SUITE_DIR (the suite's folder; it must hold no runs).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
BUDGET="${GCGD_GPU_BUDGET_S:-540}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
  BUDGET="${GCGD_GPU_BUDGET_S:-400}"  # the CPU compiles GCGD's step for ~40 s
  export JAX_PLATFORMS=cpu
fi
PY="${GCGD_PYTHON:-python3}"
OUTDIR="${OUT:-experiments/results/gpu_check}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # peak memory is each process's own
export GCGD_CACHE_DIR="${GCGD_CACHE_DIR:-${TMPDIR:-/tmp}/gcgd_cache}"
# JAX's persistent compilation cache: a program compiled once (preflight, calibration)
# is not compiled again by a later stage or process that builds the same one.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/gcgd_jax_xla_cache}"
T0=$(date +%s)
DEADLINE=$(( T0 + BUDGET ))
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

say "gpu_check ${DRY[*]:-} on $(hostname); python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1); budget ${BUDGET} s"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

say "1/4 preflight"
PRE_LIMIT=75
[ ${#DRY[@]} -gt 0 ] && PRE_LIMIT=200
if ! timeout "$PRE_LIMIT" "$PY" -m experiments.gpu_check preflight --out "$OUTDIR" "${DRY[@]}" 2>&1 | tee -a "$LOG"; then
  say "preflight FAILED: the line starting 'PREFLIGHT FAILED' above names the stage and versions"
  exit 1
fi

say "2/4 fast tests on the device"
TESTS=(tests/transforms/test_conformance.py tests/models/test_resnet.py
       "tests/train/test_replicas.py::test_two_replicas_equal_two_sequential_runs")
[ ${#DRY[@]} -gt 0 ] && TESTS=("tests/train/test_replicas.py::test_config_errors")
timeout $(( $(left) > 300 ? 100 : 30 )) "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" \
  "${TESTS[@]}" > "$OUTDIR/tests.txt" 2>&1
say "tests: exit $? — $(tail -1 "$OUTDIR/tests.txt")"

say "3/4 train steps: ours vs PyTorch, seed-parallel"
BENCH_END=$(( $(date +%s) + ( $(left) * ${GCGD_BENCH_SHARE:-40} / 100 ) ))
BENCH_LIMIT=$(( BENCH_END - $(date +%s) + 10 ))
# A dry run checks every case however loaded the CPU (each case has its own 150 s limit).
[ ${#DRY[@]} -gt 0 ] && BENCH_LIMIT=$(( BENCH_LIMIT > 600 ? BENCH_LIMIT : 600 ))
timeout "$BENCH_LIMIT" "$PY" -m experiments.gpu_check bench --out "$OUTDIR" \
  --deadline "$BENCH_END" "${DRY[@]}" >> "$LOG" 2>&1 || say "bench FAILED or timed out (see log)"
[ -f "$OUTDIR/bench.md" ] && cat "$OUTDIR/bench.md" | tee -a "$LOG" > /dev/null

say "4/4 gpu-cifar10-resnet20: baseline vs GCGD, seeds in parallel ($(left) s left)"
DATA="${GCGD_DATA_DIR:-.gpu_data}"
if [ ${#DRY[@]} -eq 0 ] && [ ! -e "$DATA/cifar10-jpeg.tar.gz" ] && [ ! -d "$DATA/cifar10" ]; then
  say "no CIFAR-10 in $DATA: prepare it with 'mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/' and carry .gpu_data; the main event is skipped"
else
  # The suite's folder: beside $OUT (whose files come back only 8 and 2 folders down; the
  # runs travel in main.tar.gz), else in the results folder (the stage refuses one that
  # already holds runs: move it away first).
  if [ -n "${GCGD_SUITE_DIR:-}" ]; then
    SUITE_DIR="$GCGD_SUITE_DIR"
  elif [ -n "${OUT:-}" ]; then
    SUITE_TMP="$(mktemp -d "${TMPDIR:-/tmp}/gcgd_gpu_suite.XXXXXX")"
    trap 'rm -rf "$SUITE_TMP"' EXIT
    SUITE_DIR="$SUITE_TMP/gpu-cifar10-resnet20"
  else
    SUITE_DIR="$OUTDIR/gpu-cifar10-resnet20"
  fi
  # A dry run checks every code path however loaded the CPU: it is not cut at the deadline.
  MAIN_LIMIT=$(( $(left) + 5 ))
  [ ${#DRY[@]} -gt 0 ] && MAIN_LIMIT=$(( MAIN_LIMIT > 480 ? MAIN_LIMIT : 480 ))
  timeout "$MAIN_LIMIT" "$PY" -m experiments.gpu_check main --out "$OUTDIR" \
    --suite-dir "$SUITE_DIR" --deadline "$DEADLINE" --data-dir "$DATA" "${DRY[@]}" >> "$LOG" 2>&1 \
    || say "main event FAILED or timed out (see log; main.md and main.json hold the arms that finished)"
fi
rm -f "$OUTDIR/main.tar.gz.part"  # an archive cut while being written (the last one stays)
[ -f "$OUTDIR/main.md" ] && tee -a "$LOG" < "$OUTDIR/main.md" > /dev/null
say "done in $(( $(date +%s) - T0 )) s"
