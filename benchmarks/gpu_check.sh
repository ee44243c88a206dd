#!/usr/bin/env bash
# GPU check (issue 20): on a machine with a CUDA GPU, in under 8 minutes, from the repository root:
#   bash benchmarks/gpu_check.sh            (PYTHON=path/to/python to pick the interpreter; default .venv/bin/python)
# 1. the test suite's device tests (train.device: cuda, every precision; they skip without CUDA, so CI never needs one)
# 2. B1 (58M Llama, LoRA) and B3 (SmolLM2-135M, LoRA; only when the model is in sftlab's cache) in bf16-mixed, B1 in
#    fp32 for the ratio: tokens/s, MFU against the GPU's dense bf16 peak, peak memory (benchmarks/gpu_bench.py)
# 3. with 2+ GPUs: B1 bf16-mixed under `torchrun --nproc_per_node 2` (DDP, nccl)
# and prints one table. Each part has its own time limit; a part that fails or runs out of time is a table row
# saying so, and the script goes on.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
OUT=$(mktemp -d)
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device here; nothing to check" >&2
  exit 1
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n "$NGPU"

# 1. device tests (~1 min)
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/unit/train/test_device_precision.py -k "cuda" \
  >"$OUT/tests.txt" 2>&1
TESTS_RC=$?
TESTS=$(tail -n 1 "$OUT/tests.txt")

# 2./3. one JSON row per run (~1 min each)
run() {  # name, limit_s, command...
  local name=$1 limit=$2
  shift 2
  if timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
    tail -n 1 "$OUT/$name.json" >"$OUT/$name.row"
  else
    echo "{\"workload\": \"$name\", \"error\": \"exit $? (see $OUT/$name.err)\"}" >"$OUT/$name.row"
  fi
}
run B1-bf16 120 "$PY" -m benchmarks.gpu_bench --workload B1 --precision bf16-mixed --steps 30
run B1-fp32 120 "$PY" -m benchmarks.gpu_bench --workload B1 --precision fp32 --steps 30
if "$PY" -c 'import sys; from benchmarks.workloads import real_model_dir; import os; sys.exit(0 if os.path.isdir(real_model_dir()) else 1)' 2>/dev/null; then
  run B3-bf16 150 "$PY" -m benchmarks.gpu_bench --workload B3 --precision bf16-mixed --steps 20
else
  echo '{"workload": "B3", "error": "SmolLM2-135M-Instruct not in the cache (offline): skipped"}' >"$OUT/B3-bf16.row"
fi
if [ "$NGPU" -ge 2 ]; then
  run B1-ddp2 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m benchmarks.gpu_bench \
    --workload B1 --precision bf16-mixed --steps 30
fi

# the table
"$PY" - "$OUT" "$TESTS_RC" "$TESTS" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, pathlib, sys
out, rc, tests, secs = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print(f"\ndevice tests: {'ok' if rc == '0' else 'FAILED (rc ' + rc + ')'}: {tests}")
rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.row"))]
print("| run | gpus | precision | tokens/s | MFU (bf16 peak) | peak mem GB | loss first -> last |")
print("|---|---|---|---|---|---|---|")
for p, r in zip(sorted(out.glob("*.row")), rows):
    if "error" in r:
        print(f"| {p.stem} | | | {r['error']} | | | |")
        continue
    mfu = f"{r['mfu_bf16_peak']:.1%}" if r.get("mfu_bf16_peak") is not None else "?"
    a, b = r["loss_first_last"]
    print(f"| {p.stem} ({r['gpu']}) | {r['gpus']} | {r['precision']} | {r['tokens_per_s']:,} | {mfu} | "
          f"{r['peak_mem_gb']} | {a} -> {b} |")
print(f"\n{secs} s in all; raw rows in {out}")
PYEOF
