#!/usr/bin/env bash
# One chunk of a pre-registered study (experiments/studies/STUDY.toml, run by
# experiments/studies/STUDY.py) on the lent GPU machine, within one device-tool command.
# Nothing is installed: it runs the machine's own python3 and packages with this checkout on
# PYTHONPATH, and stops in time (GCGD_GPU_BUDGET_S):
#
#   1. JAX must see a GPU (else it stops at once: exit 1; no run starts on the CPU);
#   2. the study's runner on a copy of experiments/results/STUDY/ (so a carried checkpoint
#      and the committed runs are where it looks), the runs in order, skipping the finished
#      ones, resuming an interrupted one:
#        python -m experiments.studies.STUDY --no-report --deadline D --data-dir .gpu_data
#      where D leaves time to pack: no run starts after D, the run going at D is stopped
#      and recorded as interrupted (run.json), and resumes in the next chunk from its last
#      epoch checkpoint;
#   3. packs the copy's runs/ into $OUT/STUDY_runs.tar.gz: every run's files (metrics.jsonl,
#      config.toml, run.json, run.log) and the checkpoints/ of unfinished runs only (an
#      interrupted run's, a few MiB for the LocalMixer M/8/16); the log is
#      $OUT/gpu_study.log (the chunk's lines, each run's exit and time, what is done, and
#      which checkpoints folder the next chunk must carry).
#
# Before a chunk, here:
#   - data, once: mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/
#   - commit: the runs record GCGD_COMMIT (the machine's copy has no .git), so the tree
#     must be that commit's: `git status --porcelain` shows nothing outside
#     experiments/results/, and an interrupted run's files from the last chunk
#     (metrics.jsonl, config.toml, run.json, run.log: untracked, they travel) stay as
#     unpacked, uncommitted;
#   - carry: ".gpu_data" and, when the last chunk left a run interrupted, its checkpoints
#     folder (the last log names it), e.g.
#     "experiments/results/forward_cifar10/runs/tune/cifar10/bp/lr0.03/s1000/checkpoints".
#
# Then, through the device tool (<hash>: the 40 hex digits `git rev-parse HEAD` prints here,
# written into the command: the machine has no git; what travels, ~35 MB, stays under the
# tool's 64 MiB: the tree ~11 MB, the data 19 MB, a checkpoint ~4 MB):
#
#   run(command="GCGD_COMMIT=<hash> bash experiments/gpu_study.sh forward_cifar10",
#       carry=[".gpu_data", "<the interrupted run's checkpoints folder, if any>"],
#       timeout_s=600)
#
# (the chunk ends ~520 s after it starts; the tool's start and transfers come on top, so one
# chunk fits a 15-minute device lease once, with no time for a second).
# and after it, here: tar -xzf <files_at>/forward_cifar10_runs.tar.gz -C
# experiments/results/forward_cifar10/ (it holds runs/...), keep gpu_study.log's lines for
# the commit message, commit the finished runs (their metrics.jsonl, config.toml, run.json,
# run.log; checkpoints are ignored by git), and rebuild the report with
# `python -m experiments.studies.forward_cifar10 --report-only`.
#
#   bash experiments/gpu_study.sh STUDY             # on the GPU machine
#   bash experiments/gpu_study.sh STUDY --dry-run   # the same code on the CPU, tiny (~40 s)
#
# --dry-run: the CPU, an empty results folder (nothing is copied), tiny runs (synthetic 8x8
# images, the LocalMixer S/1/1, 200 short epochs), --allow-dirty, three chunks: the first's
# deadline (GCGD_DRY_CUT_S, default 12 s) stops its first run, the second (--max-runs 1)
# resumes it to the end, the third's deadline stops the next run; then the same packing
# (one finished run, one unfinished with its checkpoints). ~40 s on the 2-core CPU.
#
# Settings (environment): GCGD_PYTHON (default python3), GCGD_GPU_BUDGET_S (seconds for the
# whole command, default 540), GCGD_DATA_DIR (default .gpu_data), GCGD_COMMIT (the commit
# the runs record where the checkout has no .git; required there), JAX_COMPILATION_CACHE_DIR
# (default $TMPDIR/gcgd_jax_xla_cache), GCGD_CACHE_DIR (decoded data, default
# $TMPDIR/gcgd_cache: the first run of a chunk decodes CIFAR-10's JPEGs, the others reuse
# them). Without $OUT the results go to $TMPDIR/gcgd_gpu_study_STUDY/.
set -uo pipefail
cd "$(dirname "$0")/.."
STUDY="${1:-}"
if [ -n "$STUDY" ] && [ ! -f "experiments/studies/$STUDY.toml" ]; then
  echo "gpu_study.sh: no study '$STUDY' (no experiments/studies/$STUDY.toml)" >&2
fi
if [ -z "$STUDY" ] || [ ! -f "experiments/studies/$STUDY.toml" ]; then
  echo "usage: bash experiments/gpu_study.sh STUDY [--dry-run]  (STUDY: experiments/studies/STUDY.toml)" >&2
  exit 2
fi
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
PY="${GCGD_PYTHON:-python3}"
BUDGET="${GCGD_GPU_BUDGET_S:-540}"
PACK_S=30  # after the deadline: the last run's stop (SIGTERM, at most 10 s to SIGKILL), packing
OUTDIR="${OUT:-${TMPDIR:-/tmp}/gcgd_gpu_study_$STUDY}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_study.log"
ARCHIVE="$OUTDIR/${STUDY}_runs.tar.gz"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # peak memory is each run's own
export GCGD_CACHE_DIR="${GCGD_CACHE_DIR:-${TMPDIR:-/tmp}/gcgd_cache}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/gcgd_jax_xla_cache}"
T0=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gcgd_gpu_study.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STUDY_DIR="$WORK/$STUDY"
mkdir -p "$STUDY_DIR"
ARGS=(--out "$STUDY_DIR" --no-report)
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  ARGS+=(--allow-dirty)
  for o in data.name=synthetic "data.synthetic_image_shape=[8, 8, 3]" data.synthetic_train_size=64 \
           data.synthetic_test_size=32 model.mixer=S/1/1 data.batch_size=16 \
           data.eval_batch_size=32 train.epochs=200; do
    ARGS+=(--set "$o")
  done
else
  ARGS+=(--data-dir "${GCGD_DATA_DIR:-.gpu_data}")
  [ -d "experiments/results/$STUDY" ] && cp -a "experiments/results/$STUDY/." "$STUDY_DIR/"
fi

say "gpu_study $STUDY$([ "$DRY" = 1 ] && echo ' --dry-run') on $(hostname); budget $BUDGET s; commit ${GCGD_COMMIT:-(from git)}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
if [ "$DRY" = 0 ] && ! "$PY" -c 'import jax; b = jax.default_backend(); print("jax", jax.__version__, b, jax.devices()); raise SystemExit(b != "gpu")' 2>&1 | tee -a "$LOG"; then
  say "JAX sees no GPU (above): no run started"
  exit 1
fi

# chunk DEADLINE [ARGS...]: the study's runner until DEADLINE (Unix seconds); the timeout
# is a backstop only (the runner stops its run at the deadline itself).
chunk() {
  local deadline=$1 limit
  shift
  limit=$(( deadline - $(date +%s) + 20 ))
  [ "$limit" -lt 30 ] && limit=30
  timeout "$limit" "$PY" -m "experiments.studies.$STUDY" "${ARGS[@]}" --deadline "$deadline" "$@" \
    2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "chunk: exit $rc"
}
if [ "$DRY" = 1 ]; then
  say "dry run: chunk 1, its deadline in ${GCGD_DRY_CUT_S:-12} s"
  chunk $(( $(date +%s) + ${GCGD_DRY_CUT_S:-12} ))
  say "dry run: chunk 2 resumes the interrupted run"
  chunk $(( $(date +%s) + 300 )) --max-runs 1
  say "dry run: chunk 3 leaves the next run interrupted (packed with its checkpoints)"
  chunk $(( $(date +%s) + ${GCGD_DRY_CUT_S:-12} ))
else
  chunk $(( T0 + BUDGET - PACK_S ))
fi

# Pack runs/: every run's files, and the checkpoints/ of the runs not finished (every run
# the runner started has a run.json).
LIST="$WORK/files.txt"
CARRY=()
: > "$LIST"
if [ -d "$STUDY_DIR/runs" ]; then
  while IFS= read -r record; do
    run="${record%/run.json}"
    (cd "$STUDY_DIR" && find "$run" -maxdepth 1 -type f ! -name .lock | sort) >> "$LIST"
    if ! tail -n 1 "$STUDY_DIR/$run/metrics.jsonl" 2>/dev/null | grep -q '"kind": "summary"' \
        && [ -d "$STUDY_DIR/$run/checkpoints" ]; then
      echo "$run/checkpoints" >> "$LIST"
      CARRY+=("experiments/results/$STUDY/$run/checkpoints")
    fi
  done < <(cd "$STUDY_DIR" && find runs -name run.json | sort)
fi
if tar -czf "$ARCHIVE" -C "$STUDY_DIR" --files-from="$LIST"; then
  say "packed ${STUDY}_runs.tar.gz ($(du -k "$ARCHIVE" | cut -f1) KiB, $(wc -l < "$LIST") paths): unpack it into experiments/results/$STUDY/"
else
  say "packing FAILED"
fi
DONE="$("$PY" -m "experiments.studies.$STUDY" --list --out "$STUDY_DIR" 2>&1)"
echo "$DONE" >> "$LOG"
say "$(grep -c ' done$' <<< "$DONE") of $(wc -l <<< "$DONE") runs of the study finished"
for c in "${CARRY[@]+"${CARRY[@]}"}"; do
  say "unfinished: the next chunk carries $c"
done
say "done in $(( $(date +%s) - T0 )) s"
