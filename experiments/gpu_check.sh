#!/usr/bin/env bash
# GPU check, about 8 minutes on one GPU: install the gpu extra, run the fast test subset on
# the GPU, time ResNet-20/18 train steps with and without GCGD, and run 2,000 steps of the
# gpu-cifar10-resnet20 setting, baseline vs GCGD (one seed each: a smoke-level comparison,
# not evidence). Everything goes to experiments/results/gpu_check/ with the device named.
#
#   bash experiments/gpu_check.sh                       # CIFAR-10 from $GCGD_DATA_DIR or ../shared/data
#   GCGD_DATA_DIR=/path/to/data bash experiments/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/gpu_check
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
T0=$(date +%s)

say "install (.venv-gpu, gpu extra)"
python3 -m venv .venv-gpu >> "$LOG" 2>&1
.venv-gpu/bin/python -m pip install --quiet --upgrade pip >> "$LOG" 2>&1
.venv-gpu/bin/python -m pip install --quiet -e ".[data,dev,gpu]" >> "$LOG" 2>&1 || say "install FAILED"
PY=.venv-gpu/bin/python
$PY - <<'PYEOF' 2>&1 | tee "$OUT/device.txt" | tee -a "$LOG"
import jax
d = jax.devices()[0]
print(f"jax {jax.__version__}; backend {jax.default_backend()}; {len(jax.devices())} device(s); {d.platform}: {d.device_kind}")
PYEOF

say "fast test subset on the GPU"
JAX_PLATFORMS= timeout 240 $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_methods.py -k "conform or selects or resolve" \
  tests/transforms/test_conformance.py -k "jit or donation or dtype" \
  tests/models/test_resnet.py tests/models/test_gc_ode.py \
  > "$OUT/tests.txt" 2>&1
say "tests: $(tail -1 "$OUT/tests.txt")"

say "train-step speed and memory"
timeout 180 $PY experiments/gpu_bench.py --out "$OUT" >> "$LOG" 2>&1 || say "gpu_bench FAILED (see log)"

DATA="${GCGD_DATA_DIR:-../shared/data}"
if [ -e "$DATA/cifar10-jpeg.tar.gz" ] || [ -d "$DATA/cifar10" ] || [ -d "$DATA/cifar-10-batches-py" ]; then
  for m in baseline gcgd; do
    extra=()
    [ "$m" = gcgd ] && extra=(--set corrections.chain=gc_w --set model.gc_ode=gradient)
    say "2,000 steps of gpu-cifar10-resnet20: $m"
    timeout 150 $PY -m gcgd_jax.train --config cifar10_resnet20 --data-dir "$DATA" \
      --set train.total_steps=2000 --set checkpoint.enabled=false --no-progress \
      "${extra[@]}" --overwrite --out "$OUT/runs/$m" > "$OUT/$m.txt" 2>&1 \
      || say "$m run FAILED or timed out (see $OUT/$m.txt)"
    tail -3 "$OUT/$m.txt" | tee -a "$LOG"
  done
else
  say "no CIFAR-10 under $DATA: the 2,000-step comparison was skipped"
fi
rm -rf "$OUT"/runs/*/checkpoints
say "done in $(( $(date +%s) - T0 )) s"
