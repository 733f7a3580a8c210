#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (device time is short: ~15 min in all, 10 per command).
# Runs, in this order, each bounded in time, and writes everything under "$OUT" (default benchmarks/results/gpu):
#   1. labkit doctor (what the machine is)
#   2. the Trainer's NCCL path under torchrun: DDP and FSDP2, bf16 (benchmarks/gpu_distributed_check.sh)
#   3. python -m benchmarks gpu_memory: every chapter's full config, capped at 12 GiB (peak memory and tokens/s),
#      and the further full configs of chapters 10 (SD U-Net, 256 px) and 11 (PixArt-α-B/2) under "jobs"
# Copy what comes back into benchmarks/results/ and commit it. A step that fails is logged and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python}
if ! "$PY" -c "import labkit" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[dev]" > "$OUT/install.log" 2>&1 || { echo "install failed: $OUT/install.log"; exit 1; }
fi
step() {  # step NAME SECONDS COMMAND...: run, log, never stop the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (log: $OUT/$name.log)" | tee -a "$OUT/summary.txt"
}
step doctor 60 "$PY" -m labkit doctor --json
step distributed 150 env OUT="$OUT" PY="$PY" bash benchmarks/gpu_distributed_check.sh
step gpu_memory 420 "$PY" -m benchmarks gpu_memory --budget-s 400 --job 10_unet=sd-256 --job "11_dit=PixArt-α-B/2" \
  --out "$OUT/gpu_memory.json"
cat "$OUT/summary.txt"
