#!/usr/bin/env bash
# The NCCL / CUDA path of labkit.distributed, on one GPU: torchrun --nproc_per_node=1 trains the tiny GPT of
# tests/test_labkit_distributed.py under DDP and under FSDP2 with bf16 mixed precision, checkpoints, and writes
# "$OUT/gpu_distributed.json". NOT RUN YET: no GPU was available when it was written.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python}
for strategy in ddp fsdp; do
  dir=$(mktemp -d)
  cat > "$dir/check.py" <<PYEOF
import json, sys, time, torch
sys.path.insert(0, "$PWD")
from tests.test_labkit_distributed import TinyGPT, get_batch
from labkit.train import TrainConfig, Trainer
torch.manual_seed(0)
cfg = TrainConfig(max_steps=20, lr=3e-3, warmup_steps=2, grad_accum=2, eval_every=10, eval_batches=2, amp="bf16",
                  strategy="$strategy", ckpt_path="$dir/ckpt", progress=False, live_plot=False)
t = Trainer(TinyGPT(), lambda s, g: [x.cuda() for x in get_batch(s, g)], config=cfg)
t0 = time.perf_counter(); hist = t.fit(); seconds = time.perf_counter() - t0
print(json.dumps({"strategy": "$strategy", "backend": torch.distributed.get_backend(), "device": str(t.device),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": seconds,
                  "first_loss": hist[0]["train_loss_step"], "final_val_loss": hist[-1]["val_loss"],
                  "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "checkpoint_files": sorted(p.name for p in __import__("pathlib").Path("$dir/ckpt").iterdir())}))
PYEOF
  OMP_NUM_THREADS=1 timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$dir/check.py" > "$dir/result.json"
  cp "$dir/result.json" "$OUT/gpu_distributed_$strategy.json"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = [json.loads(line) for s in ("ddp", "fsdp") for line in (out / f"gpu_distributed_{s}.json").read_text().splitlines() if line.startswith("{")]
(out / "gpu_distributed.json").write_text(json.dumps({"runs": runs}, indent=2))
print(json.dumps({"runs": runs}, indent=2))
assert all(r["backend"] == "nccl" and r["final_val_loss"] < r["first_loss"] for r in runs)
PYEOF
