#!/usr/bin/env bash
# GPU training-throughput check for an H100 user: tokens/s and MFU of the student's training step
# in bf16 on packed sequences (benchmarks/train_throughput.py), for the default student's
# architecture (SmolLM2-135M) and for the 0.5B-class target config (Qwen2.5-0.5B).
# Needs only torch + transformers with CUDA. Usage:
#   bash benchmarks/gpu_check.sh [results.jsonl]
# Target (issue 4): MFU >= 0.35 for qwen2.5-0.5b with packed sequences.
set -u
out=${1:-gpu_check.jsonl}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run() { "$py" "$here/train_throughput.py" --device cuda --dtype bf16 --out "$out" "$@" \
  || echo "FAILED: $*" | tee -a "$out.failed"; }
# the same step as the CPU figure, then the 0.5B-class config at growing batch, eager and compiled
run --arch smollm2-135m --seq-len 2048 --batch-size 16 --steps 10 --warmup 3
run --arch qwen2.5-0.5b --seq-len 2048 --batch-size 8 --steps 10 --warmup 3
run --arch qwen2.5-0.5b --seq-len 2048 --batch-size 8 --steps 10 --warmup 5 --compile
run --arch smollm2-135m --seq-len 2048 --batch-size 16 --steps 10 --warmup 5 --compile
"$py" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'arch':14} {'batch':>5} {'compile':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}")
for r in rows:
    print(f"{r['arch']:14} {r['batch_size']:>5} {str(r['compile']):>7} {r['tokens_per_s']:>10.0f} "
          f"{r['model_tflops_per_s']:>8.1f} {r['mfu'] or 0:>6.3f} {r.get('max_memory_gib', 0):>6.1f}")
PY
